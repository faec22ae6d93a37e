"""What a run reports: ``metrics.jsonl``, ``curves.png`` and the progress bar."""

from __future__ import annotations

import json
import math
from pathlib import Path

METRICS = "metrics.jsonl"
CURVES = "curves.png"


class Metrics:
    """Append-only ``metrics.jsonl``, one JSON object per optimizer step or evaluation.

    ``enabled=False`` (every rank but 0 under ``--parallel``) writes nothing.
    """

    def __init__(self, path: Path, resume_step: int | None, *, enabled: bool = True) -> None:
        self.path = path
        self.file = None
        if not enabled:
            return
        if resume_step is None:
            path.write_text("")
        elif path.exists():
            # drop what was logged after the checkpoint: those steps are about to be redone
            keep = [
                line
                for line in path.read_text().splitlines()
                if line.strip() and json.loads(line).get("step", 0) <= resume_step
            ]
            path.write_text("".join(line + "\n" for line in keep))
        self.file = open(path, "a")  # noqa: SIM115 - closed in close()

    def log(self, record: dict) -> None:
        if self.file is None:
            return
        # strict JSON has no inf/nan (a skipped step's grad norm): write null instead
        clean = {
            k: None if isinstance(v, float) and not math.isfinite(v) else v
            for k, v in record.items()
        }
        self.file.write(json.dumps(clean, allow_nan=False) + "\n")
        self.file.flush()

    def records(self) -> list[dict]:
        """What has been logged so far (nothing where disabled)."""
        return [] if self.file is None else read_metrics(self.path)

    def close(self) -> None:
        if self.file is not None:
            self.file.close()


def read_metrics(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def plot_curves(metrics_path: Path, png_path: Path, unigram: float | None = None) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = read_metrics(metrics_path)
    train = [r for r in records if "loss" in r and "candidate" not in r]
    val = [r for r in records if "val_loss" in r and "candidate" not in r]
    fig, (ax_loss, ax_lr) = plt.subplots(
        2, 1, figsize=(7, 6), sharex=True, gridspec_kw={"height_ratios": [3, 1]}
    )
    steps = [r["step"] for r in train]
    ax_loss.plot(
        steps,
        [math.nan if r["loss"] is None else r["loss"] for r in train],
        lw=0.8,
        alpha=0.6,
        label="train loss",
    )
    if val:
        ax_loss.plot(
            [r["step"] for r in val],
            [r["val_loss"] for r in val],
            "o-",
            label="val loss",
        )
    if unigram is not None:
        ax_loss.axhline(unigram, color="gray", ls="--", lw=1, label=f"byte unigram ({unigram:.2f})")
    ax_loss.set_ylabel("cross-entropy (nats/byte)")
    ax_loss.legend()
    ax_loss.grid(alpha=0.3)
    ax_lr.plot(steps, [r["lr"] for r in train], color="C2")
    ax_lr.set_ylabel("lr")
    ax_lr.set_xlabel("optimizer step")
    ax_lr.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(png_path, dpi=110)
    plt.close(fig)


class Progress:
    """tqdm bar with loss, lr, tokens/s and the optimizer's share of the step time."""

    def __init__(
        self, enabled: bool, total: int, initial: int, desc: str, *, quiet: bool = False
    ) -> None:
        """``quiet`` (every rank but 0 under ``--parallel``): no bar and no messages."""
        self.bar = None
        self.tok_s = None
        self.opt_frac = None
        self.quiet = quiet
        if enabled and not quiet:
            try:
                from tqdm import tqdm
            except ImportError:  # tqdm is in the [train] extra; train without a bar
                print("(no progress bar: pip install tqdm)", flush=True)
                return
            self.bar = tqdm(total=total, initial=initial, desc=desc, dynamic_ncols=True, leave=True)

    def update(self, rec: dict) -> None:
        # exponential moving averages so the numbers are readable while they change
        tok_s = rec["tokens_step"] / max(rec["step_time"], 1e-9)
        frac = rec["opt_time"] / max(rec["step_time"], 1e-9)
        self.tok_s = tok_s if self.tok_s is None else 0.9 * self.tok_s + 0.1 * tok_s
        self.opt_frac = frac if self.opt_frac is None else 0.9 * self.opt_frac + 0.1 * frac
        if self.bar is not None:
            self.bar.set_postfix(
                loss=f"{rec['loss']:.3f}",
                lr=f"{rec['lr']:.2e}",
                tok_s=f"{self.tok_s:,.0f}",
                opt=f"{100 * self.opt_frac:.1f}%",
                refresh=False,
            )
            self.bar.update(1)

    def reset(self, total: int, done: int = 0) -> None:
        if self.bar is not None:
            self.bar.reset(total=total)
            self.bar.update(done)

    def write(self, msg: str) -> None:
        if self.quiet:
            return
        if self.bar is not None:
            self.bar.write(msg)
        else:
            print(msg, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
