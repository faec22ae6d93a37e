"""GPU benchmark of the Triton backend: GB/s against the bytes of SPEC §5.

    python benchmarks/bench_triton_gpu.py [--numel 268435456] [--tensors 200] [--reps 50]

Exits 0 with "skipped: no CUDA device" on a machine without a GPU. Each row:
median and spread (p10/p90) of one step over ``--reps`` timed repetitions
(CUDA events, after warm-up), effective GB/s = SPEC §5 bytes / median time,
the ratio to torch.optim.AdamW fused and foreach (fp32 AdamW; torch has no
Lion), stamped by the shared harness (machine, versions, commit, date) plus
the GPU name. Timing uses CUDA events, which a GPU step needs (the harness's
wall-clock rounds are for CPU contenders).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

try:  # run as `python -m benchmarks.bench_triton_gpu`
    from benchmarks import harness
except ImportError:  # run as `python benchmarks/bench_triton_gpu.py`
    import harness  # type: ignore[no-redef]


def spec_bytes(opt: str, mode: str, clip: bool) -> int:
    """SPEC §5 bytes per parameter, from the shared harness formula."""
    import torch

    p_dtype = torch.float32 if mode == "fp32" else torch.bfloat16
    return harness.min_bytes_per_param(
        opt, param_dtype=p_dtype, master_weights=mode == "bf16-master", extra_grad_read=clip
    )


def split_sizes(numel: int, tensors: int) -> list[int]:
    """A model-like mix: a few large matrices and many small vectors, summing to numel."""
    import torch

    gen = torch.Generator().manual_seed(0)
    weights = torch.rand(tensors, generator=gen) ** 4 + 1e-4
    sizes = (weights / weights.sum() * numel).long().clamp(min=1)
    sizes[0] += numel - int(sizes.sum())
    return [int(s) for s in sizes]


def time_ms(fn, reps: int, warmup: int = 5) -> list[float]:
    import torch

    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return sorted(times)


def make_state(opt: str, mode: str, sizes: list[int]):
    import torch

    dev = torch.device("cuda")
    p_dtype = torch.float32 if mode == "fp32" else torch.bfloat16
    params = [torch.randn(n, device=dev).to(p_dtype) for n in sizes]
    grads = [torch.randn(n, device=dev).to(p_dtype) for n in sizes]
    s_dtype = torch.float32
    m = [torch.zeros(n, device=dev, dtype=s_dtype) for n in sizes]
    v = [torch.zeros(n, device=dev, dtype=s_dtype) for n in sizes] if opt == "adamw" else []
    master = [p.float() for p in params] if mode == "bf16-master" else []
    steps = [torch.ones((), device=dev) for _ in sizes]
    return params, grads, m, v, master, steps


def bench_row(opt: str, mode: str, clip: bool, sizes: list[int], reps: int) -> dict:
    import torch

    from fastopt.backends import triton as tb

    params, grads, m, v, master, steps = make_state(opt, mode, sizes)
    grad_mul = torch.ones((), device="cuda")
    found_inf = torch.zeros((), device="cuda")

    def step():
        scale = grad_mul
        if clip:
            norm = tb.grad_sumsq(grads).sqrt()
            scale = (1.0 / (norm + 1e-6)).clamp(max=1.0)
        if opt == "adamw":
            tb.adamw_(params, grads, m, v, [], master, steps, lr=1e-4, beta1=0.9, beta2=0.999, eps=1e-8,
                      weight_decay=0.01, amsgrad=False, maximize=False, grad_scale=scale, found_inf=found_inf)  # fmt: skip
        else:
            tb.lion_(params, grads, m, master, lr=1e-5, beta1=0.9, beta2=0.99, weight_decay=0.01,
                     maximize=False, grad_scale=scale, found_inf=found_inf)  # fmt: skip

    times = time_ms(step, reps)
    numel = sum(sizes)
    median = times[len(times) // 2]
    row = {
        "op": opt,
        "mode": mode,
        "clip": clip,
        "numel": numel,
        "tensors": len(sizes),
        "median_ms": round(median, 4),
        "p10_ms": round(times[len(times) // 10], 4),
        "p90_ms": round(times[(9 * len(times)) // 10], 4),
        "bytes_per_param": spec_bytes(opt, mode, clip),
        "GB/s": round(spec_bytes(opt, mode, clip) * numel / (median * 1e-3) / 1e9, 1),
    }
    if opt == "adamw" and mode == "fp32" and not clip:
        ps = [torch.nn.Parameter(p) for p in params]
        for p, g in zip(ps, grads, strict=False):
            p.grad = g
        for impl in ("fused", "foreach"):
            torch_opt = torch.optim.AdamW(ps, lr=1e-4, weight_decay=0.01, **{impl: True})
            t = time_ms(torch_opt.step, reps)
            row[f"torch_{impl}_ms"] = round(t[len(t) // 2], 4)
            row[f"speedup_vs_torch_{impl}"] = round(t[len(t) // 2] / median, 2)
    return row


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--numel", type=int, default=2**27, help="total parameters (default 2^27)")
    parser.add_argument("--tensors", type=int, default=200, help="number of parameter tensors")
    parser.add_argument("--reps", type=int, default=50)
    parser.add_argument("--json", action="store_true", help="one JSON object per row")
    args = parser.parse_args(argv)

    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        print("skipped: TRITON_INTERPRET is set (this benchmark times compiled GPU kernels)")
        return 0
    import torch

    if not torch.cuda.is_available():
        print("skipped: no CUDA device")
        return 0

    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    info = harness.machine_stamp(extra_packages=("triton",))
    info["gpu"] = torch.cuda.get_device_name()
    sizes = split_sizes(args.numel, args.tensors)
    rows = []
    for opt in ("adamw", "lion"):
        for mode in ("fp32", "bf16-master"):
            for clip in (False, True):
                row = {**bench_row(opt, mode, clip, sizes, args.reps), **info}
                rows.append(row)
                if args.json:
                    print(json.dumps(row), flush=True)
                else:
                    extra = "".join(
                        f"  x{row[k]:.2f} vs torch {k.rsplit('_', 1)[-1]}"
                        for k in row
                        if k.startswith("speedup")
                    )
                    print(
                        f"{opt:5} {mode:11} clip={clip!s:5} {row['median_ms']:8.3f} ms "
                        f"[{row['p10_ms']:.3f}, {row['p90_ms']:.3f}]  {row['GB/s']:7.1f} GB/s "
                        f"({row['bytes_per_param']} B/param){extra}",
                        flush=True,
                    )
    if not args.json:
        print(json.dumps(info))
    return 0


if __name__ == "__main__":
    sys.exit(main())
