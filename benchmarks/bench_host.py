"""Host-overhead benchmark: what one ``opt.step()`` costs per tensor, and two many-tensor workloads.

    PYTHONPATH=. python -m benchmarks.bench_host              # full run (~3 min on an idle 2-core box)
    PYTHONPATH=. python -m benchmarks.bench_host --quick      # smoke run for CI: seconds
    PYTHONPATH=. python -m benchmarks.bench_host --markdown bench_host.md --json bench_host.json

Part 1 (host): N one-element fp32 CPU tensors, every one with a gradient, N in
100 / 1,000 / 10,000 / 50,000. The arithmetic is N floats, so the step time is
the optimizer's per-tensor bookkeeping: gathering lists, argument packing,
dispatch. Reported as µs of step time per tensor (median step / N).

Part 2 (bandwidth + host): "4000 tensors x 4096 fp32" and GPT-2 small's real
parameter shapes (148 tensors, 124M parameters; ``--gpt2-vocab`` scales the
embedding down where memory is short, and the table says so), in ms per step
with GB/s at SPEC §5's minimum bytes.

Contenders, side by side in one process (harness.time_interleaved, rotated
rounds, GC off inside a round): torch.optim.AdamW(fused=True) -- the
baseline of every ratio -- torch.optim.AdamW(foreach=True), fastopt.AdamW
(backend="cpu") and fastopt.AdamW(backend="cpu", max_grad_norm=1.0). The last
row does more work than the others (the global norm and the clip factor); it is
there to show what in-kernel clipping costs on the host, not as a like-for-like
race. The contender factories and the GPT-2 shapes are bench_cpu's, so both
tables time the same objects.

Torch threads are set to the number of cores this process may run on (the
stamp line "torch threads" says how many were used); ``--threads`` overrides.
A step shorter than 20 ms is repeated within a round and the round records
the mean (harness.time_interleaved), so "median" is the median over rounds of
per-round means; "spread" is the interquartile range over the median.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass

import torch

try:  # run as `python -m benchmarks.bench_host` or imported by pytest
    from benchmarks import bench_cpu, harness
except ImportError:  # run as `python benchmarks/bench_host.py`
    import bench_cpu  # type: ignore[no-redef]
    import harness  # type: ignore[no-redef]

BASELINE = "torch AdamW fused"
FASTOPT = "fastopt AdamW cpu"
FASTOPT_CLIP = "fastopt AdamW cpu, max_grad_norm=1.0"
CONTENDERS: tuple[tuple[str, bench_cpu.Factory], ...] = (
    (BASELINE, bench_cpu.torch_adamw("fused")),
    ("torch AdamW foreach", bench_cpu.torch_adamw("foreach")),
    (FASTOPT, bench_cpu.fastopt_adamw()),
    (FASTOPT_CLIP, bench_cpu.fastopt_adamw(clip=True)),
)
# Issue 11's goals. Host: at most this many µs per tensor at this many tensors.
HOST_TARGET = (10_000, 0.25)
# Workloads: fastopt at least this many times as fast as torch fused.
WORKLOAD_TARGETS = {"many": 3.0, "gpt2": 1.1}
NOISY_FRACTION = bench_cpu.NOISY_FRACTION
GPT2_VOCAB = 50257


def default_threads() -> int:
    """The cores this process may run on (its affinity mask), not the machine's total."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


@dataclass(frozen=True)
class Plan:
    tensor_counts: tuple[int, ...]
    host_rounds: int
    many: list  # shapes of the "4000 x 4096" workload
    gpt2: list  # shapes of the GPT-2 small workload
    gpt2_label: str
    workload_rounds: int


def full_plan(gpt2_vocab: int = GPT2_VOCAB) -> Plan:
    label = "GPT-2 small shapes" + (
        "" if gpt2_vocab == GPT2_VOCAB else f" (vocabulary scaled down to {gpt2_vocab})"
    )
    return Plan(
        tensor_counts=(100, 1_000, 10_000, 50_000),
        host_rounds=30,
        many=[(4096,)] * 4000,
        gpt2=bench_cpu.gpt2_small_shapes(vocab=gpt2_vocab),
        gpt2_label=label,
        workload_rounds=15,
    )


def quick_plan() -> Plan:
    return Plan(
        tensor_counts=(100, 1_000),
        host_rounds=3,
        many=[(4096,)] * 400,
        gpt2=bench_cpu.gpt2_small_shapes(n_layer=1, vocab=4096, n_ctx=256),
        gpt2_label="GPT-2 small shapes, 1 layer, vocabulary 4096, context 256 (quick)",
        workload_rounds=3,
    )


def time_contenders(shapes: list, rounds: int, log: Callable[[str], object]) -> dict:
    """Build every contender on the same data, time them interleaved, summarise against the baseline."""
    data = bench_cpu.make_data(shapes, torch.float32)
    n_params, n_tensors = data.numel, len(data.params)
    built, missing = [], []
    for name, factory in CONTENDERS:
        try:
            built.append(bench_cpu.build_contender(name, factory, data))
        except Exception as exc:
            missing.append({"contender": name, "reason": bench_cpu._missing_reason(exc)})
            log(f"  skipping {name}: {missing[-1]['reason']}")
    del data
    load = harness.OtherLoad()
    timings = harness.time_interleaved(built, rounds=rounds) if built else {}
    other = load.fraction()
    del built
    base = timings.get(BASELINE)
    rows = []
    for name, _ in CONTENDERS:
        if name not in timings:
            continue
        t = timings[name]
        rows.append(
            {
                "contender": name,
                **t.summary(),
                "us_per_tensor": t.median / n_tensors * 1e6,
                "ratio_vs_fused": base.median / t.median if base else None,
            }
        )
        log(f"  {name}: {t.median * 1e3:.3f} ms/step")
    return {
        "n_tensors": n_tensors,
        "n_params": n_params,
        "other_processes_cpu_fraction": other,
        "rows": rows,
        "missing": missing,
    }


def run_host(n_tensors: int, rounds: int, log) -> dict:
    log(f"host: {n_tensors} one-element tensors ...")
    res = time_contenders([(1,)] * n_tensors, rounds, log)
    res["rounds"] = rounds
    return res


def run_workloads(plan: Plan, log) -> list[dict]:
    out = []
    specs = (
        ("many", f"{len(plan.many)} tensors x 4096 fp32", plan.many),
        ("gpt2", plan.gpt2_label, plan.gpt2),
    )
    for key, title, shapes in specs:
        log(f"workload: {title} ...")
        res = time_contenders(shapes, plan.workload_rounds, log)
        res.update(key=key, title=title, rounds=plan.workload_rounds)
        for r in res["rows"]:
            clip = r["contender"] == FASTOPT_CLIP
            bpp = harness.min_bytes_per_param("adamw", extra_grad_read=clip)
            r["bytes_per_param"] = bpp
            r["gbps"] = bpp * res["n_params"] / r["median_s"] / 1e9
        out.append(res)
    return out


def evaluate_targets(result: dict) -> list[dict]:
    targets = []
    n_goal, us_goal = HOST_TARGET
    for h in result["host"]:
        if h["n_tensors"] != n_goal:
            continue
        for r in h["rows"]:
            if r["contender"] == FASTOPT:
                targets.append(
                    {
                        "what": f"fastopt at {n_goal:,} tensors",
                        "target": f"<= {us_goal} us/tensor",
                        "measured": f"{r['us_per_tensor']:.2f} us/tensor",
                        "met": r["us_per_tensor"] <= us_goal,
                    }
                )
    for w in result["workloads"]:
        goal = WORKLOAD_TARGETS.get(w["key"])
        row = next((r for r in w["rows"] if r["contender"] == FASTOPT), None)
        if goal is None or row is None or row["ratio_vs_fused"] is None:
            continue
        targets.append(
            {
                "what": f"fastopt, {w['title']}",
                "target": f">= {goal:.1f}x torch fused",
                "measured": f"{row['ratio_vs_fused']:.2f}x",
                "met": row["ratio_vs_fused"] >= goal,
            }
        )
    return targets


def _ratio(r: dict) -> str:
    return "n/a" if r["ratio_vs_fused"] is None else f"{r['ratio_vs_fused']:.2f}"


def _name(r: dict) -> str:
    return f"**{r['contender']}**" if r["contender"] == BASELINE else r["contender"]


def render_markdown(result: dict) -> str:
    title = "## fastopt host-overhead benchmark" + (
        " (QUICK smoke run: small sizes, 3 rounds, not a measurement)" if result["quick"] else ""
    )
    lines = [("" if result["complete"] else "**INCOMPLETE RUN: partial results**\n\n") + title, ""]
    lines += harness.stamp_lines(result["stamp"])
    lines += [
        f"- torch threads set to {result['threads']} (the cores this process may use: "
        f"{default_threads()}); load average at start "
        f"{' '.join(f'{x:.2f}' for x in result['load_average_start'])}, at end "
        f"{' '.join(f'{x:.2f}' for x in result.get('load_average_end', ()))}; other processes "
        f"used {result.get('other_processes_cpu_fraction', 0.0) * 100:.0f}% of the CPUs over the run",
        "- contenders interleaved in one process; median = median over rounds of the per-round mean "
        "step (steps under 20 ms repeat within a round); spread = IQR / median; "
        "x fused = torch fused median / contender median (above 1: faster than torch fused)",
        "",
    ]
    if result["host"]:
        lines += [
            "### Host overhead: one-element fp32 tensors, all with gradients",
            "",
            "| tensors | contender | us/tensor | ms/step | spread | x fused | other procs |",
            "|---:|---|---:|---:|---:|---:|---:|",
        ]
        for h in result["host"]:
            label = f"{h['n_tensors']:,}"
            for r in h["rows"]:
                lines.append(
                    f"| {label} | {_name(r)} | {r['us_per_tensor']:.2f} | {r['median_s'] * 1e3:.3f} | "
                    f"{r['iqr_frac'] * 100:.1f}% | {_ratio(r)} | "
                    f"{h['other_processes_cpu_fraction'] * 100:.0f}% |"
                )
                label = ""
        lines.append("")
    if result["workloads"]:
        lines += [
            "### Many-tensor workloads",
            "",
            "| workload | contender | ms/step | spread | GB/s | x fused |",
            "|---|---|---:|---:|---:|---:|",
        ]
        for w in result["workloads"]:
            label = (
                f"{w['title']} [{w['n_tensors']} tensors, {w['n_params'] / 1e6:.1f}M params; "
                f"other procs {w['other_processes_cpu_fraction'] * 100:.0f}% CPU]"
            )
            for r in w["rows"]:
                lines.append(
                    f"| {label} | {_name(r)} | {r['median_s'] * 1e3:.1f} | {r['iqr_frac'] * 100:.1f}% | "
                    f"{r['gbps']:.1f} | {_ratio(r)} |"
                )
                label = ""
        lines += [
            "",
            "GB/s: SPEC §5 minimum bytes (28 B/param; 32 with the norm pass) over the median step.",
            "",
        ]
    parts = result["host"] + result["workloads"]
    noisy = [p for p in parts if p["other_processes_cpu_fraction"] > NOISY_FRACTION]
    if noisy:
        lines += [
            f"**WARNING: other processes used more than {NOISY_FRACTION:.0%} of the CPUs during "
            f"{len(noisy)} of the {len(parts)} measurements (column 'other procs'); those numbers are "
            "contaminated, rerun on an idle machine.**",
            "",
        ]
    missing = [m for p in parts for m in p["missing"]]
    if missing:
        lines += ["Missing contenders:", ""]
        lines += [f"- {m['contender']}: {m['reason']}" for m in missing]
        lines.append("")
    if result.get("targets"):
        lines += ["Targets (issue 11):", "", "| what | target | measured | |", "|---|---|---:|---|"]
        for t in result["targets"]:
            lines.append(
                f"| {t['what']} | {t['target']} | {t['measured']} | {'met' if t['met'] else 'MISSED'} |"
            )
    return "\n".join(lines).rstrip() + "\n"


def run(
    quick: bool = False,
    threads: int | None = None,
    gpt2_vocab: int = GPT2_VOCAB,
    host_rounds: int | None = None,
    workload_rounds: int | None = None,
    parts: str = "host,workloads",
    tensor_counts: tuple[int, ...] | None = None,
    wait_idle: float = 0.0,
    log=print,
    on_update: Callable[[dict], object] | None = None,
) -> dict:
    threads = threads or default_threads()
    torch.set_num_threads(threads)
    plan = quick_plan() if quick else full_plan(gpt2_vocab)
    if host_rounds or workload_rounds or tensor_counts:
        plan = Plan(
            tensor_counts or plan.tensor_counts,
            host_rounds or plan.host_rounds,
            plan.many,
            plan.gpt2,
            plan.gpt2_label,
            workload_rounds or plan.workload_rounds,
        )
    wanted = {p.strip() for p in parts.split(",")}
    unknown = wanted - {"host", "workloads"}
    if unknown:
        raise SystemExit(f"unknown part(s) {sorted(unknown)}; choose from host, workloads")
    whole = harness.OtherLoad()
    result = {
        "complete": False,
        "quick": quick,
        "threads": threads,
        "stamp": harness.machine_stamp(),
        "load_average_start": harness.load_average(),
        "host": [],
        "workloads": [],
    }

    def update() -> None:
        result["load_average_end"] = harness.load_average()
        result["other_processes_cpu_fraction"] = whole.fraction()
        # quick sizes are not the workloads: no verdict on them
        result["targets"] = [] if quick else evaluate_targets(result)
        if on_update is not None:
            on_update(result)

    def wait() -> None:
        if wait_idle > 0:
            log(f"  waited {harness.wait_for_idle(wait_idle):.0f} s for the CPUs to go quiet")

    if "host" in wanted:
        for n in plan.tensor_counts:
            wait()
            result["host"].append(run_host(n, plan.host_rounds, log))
            update()
    if "workloads" in wanted:
        wait()
        result["workloads"] = run_workloads(plan, log)
    result["complete"] = True
    update()
    return result


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument(
        "--quick", action="store_true", help="100 and 1,000 tensors, small workloads, 3 rounds"
    )
    ap.add_argument(
        "--threads", type=int, default=None, help="torch threads (default: this process's cores)"
    )
    ap.add_argument(
        "--gpt2-vocab",
        type=int,
        default=GPT2_VOCAB,
        help="vocabulary of the GPT-2 workload's wte (default 50257, the real one)",
    )
    ap.add_argument(
        "--host-rounds", type=int, default=None, help="rounds per tensor count (default 30)"
    )
    ap.add_argument(
        "--workload-rounds", type=int, default=None, help="rounds per workload (default 15)"
    )
    ap.add_argument(
        "--only", default="host,workloads", help="host, workloads or both (comma-separated)"
    )
    ap.add_argument(
        "--tensors",
        default=None,
        help="comma-separated tensor counts of the host part (default 100,1000,10000,50000)",
    )
    ap.add_argument(
        "--wait-idle",
        type=float,
        default=0.0,
        metavar="S",
        help="before each measurement, wait up to S seconds for other processes to leave the CPUs idle",
    )
    ap.add_argument("--json", default=None, help="write the full result (raw per-round times) here")
    ap.add_argument("--markdown", default=None, help="also write the markdown tables here")
    args = ap.parse_args(argv)
    log = lambda msg: print(msg, file=sys.stderr, flush=True)  # noqa: E731 - progress to stderr

    save = harness.result_writer(args.markdown, args.json, render_markdown)

    result = run(
        quick=args.quick,
        threads=args.threads,
        gpt2_vocab=args.gpt2_vocab,
        host_rounds=args.host_rounds,
        workload_rounds=args.workload_rounds,
        parts=args.only,
        tensor_counts=tuple(int(n) for n in args.tensors.split(",")) if args.tensors else None,
        wait_idle=args.wait_idle,
        log=log,
        on_update=save,
    )
    print(render_markdown(result))
    return result


if __name__ == "__main__":
    main()
