"""Training quality of the compressed-state modes (SPEC §8): fastopt-train runs, one per mode.

Runs ``python -m fastopt.train`` for each mode below (same seed, data and
schedule; only the optimizer's storage differs), two runs at a time with one
torch thread each, then prints the final validation loss of each against its
baseline (fp32 moments for the fp32 runs, fp32 masters for the bf16 runs) and
plots the validation curves into docs/compressed_state_quality.png.

    python scripts/state_quality.py [--steps 2000] [--only NAME,...] [--jobs 2]
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import subprocess
import sys
import time

ROOT = pathlib.Path(__file__).resolve().parents[1]

# name -> (baseline name, extra fastopt-train arguments)
MODES = {
    "fp32": (None, ["--precision", "fp32"]),
    "fp32+bf16-moments": ("fp32", ["--precision", "fp32", "--state-dtype", "bf16"]),
    "fp32+int8-moments": ("fp32", ["--precision", "fp32", "--state-dtype", "int8"]),
    "bf16+fp32-master": (None, ["--precision", "bf16", "--master-weights", "fp32"]),
    "bf16+remainder": ("bf16+fp32-master", ["--precision", "bf16", "--master-weights", "remainder"]),
    "bf16+remainder+int8": (
        "bf16+fp32-master",
        ["--precision", "bf16", "--master-weights", "remainder", "--state-dtype", "int8"],
    ),
}


def run_dir(out: pathlib.Path, name: str, steps: int) -> pathlib.Path:
    return out / f"{name}-{steps}"


def val_curve(path: pathlib.Path) -> list[tuple[int, float]]:
    recs = [json.loads(x) for x in (path / "metrics.jsonl").read_text().splitlines() if x.strip()]
    return [(r["step"], r["val_loss"]) for r in recs if "val_loss" in r]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=2000)
    ap.add_argument("--only", default=",".join(MODES))
    ap.add_argument("--jobs", type=int, default=2)
    ap.add_argument("--out", default=str(ROOT / "runs" / "quality"))
    ap.add_argument("--plot", default=str(ROOT / "docs" / "compressed_state_quality.png"))
    ap.add_argument("--no-run", action="store_true", help="only read finished runs")
    args = ap.parse_args()
    out = pathlib.Path(args.out)
    names = args.only.split(",")
    if not args.no_run:
        queue = list(names)
        running: list[tuple[str, subprocess.Popen, float]] = []
        env = dict(os.environ, OMP_NUM_THREADS="1")
        while queue or running:
            while queue and len(running) < args.jobs:
                name = queue.pop(0)
                cmd = [sys.executable, "-m", "fastopt.train", "--steps", str(args.steps),
                       "--out", str(run_dir(out, name, args.steps)), "--threads", "1",
                       "--no-progress", "--no-plot", "--eval-every", "100",
                       *MODES[name][1]]  # fmt: skip
                run_dir(out, name, args.steps).mkdir(parents=True, exist_ok=True)
                log = open(run_dir(out, name, args.steps).with_suffix(".log"), "w")
                running.append((name, subprocess.Popen(cmd, stdout=log, stderr=log, env=env,
                                                       cwd=ROOT), time.time()))  # fmt: skip
            time.sleep(2)
            for item in list(running):
                name, proc, start = item
                if proc.poll() is not None:
                    running.remove(item)
                    print(f"{name}: exit {proc.returncode} after {time.time() - start:.0f} s",
                          flush=True)  # fmt: skip
    curves = {n: val_curve(run_dir(out, n, args.steps)) for n in names}
    print(f"\n{args.steps} steps | mode | final val loss (nats/byte) | vs baseline")
    for n in names:
        base = MODES[n][0]
        final = curves[n][-1][1]
        delta = "" if base is None or base not in curves else f"{final - curves[base][-1][1]:+.4f}"
        print(f"| {n} | {final:.4f} | {delta} |")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4), sharey=True)
    for n in names:
        ax = axes[0] if n.startswith("fp32") else axes[1]
        steps, vals = zip(*curves[n])
        ax.plot(steps, vals, label=n)
    for ax, title in zip(axes, ("fp32 params", "bf16 params (autocast)")):
        ax.set_title(title)
        ax.set_xlabel("step")
        ax.set_ylim(top=2.2)
        ax.legend()
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("validation loss (nats/byte)")
    fig.suptitle(f"fastopt-train, {args.steps} steps: compressed optimizer state vs fp32 state")
    fig.tight_layout()
    fig.savefig(args.plot, dpi=110)
    print(f"plot: {args.plot}")


if __name__ == "__main__":
    main()
