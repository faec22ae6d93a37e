"""Bytes per parameter of each optimizer-state mode, measured from the state tensors.

For every mode: a model of ~1.3M parameters (a few matrices, one vector), one
optimizer step so that every state exists, then the bytes of every tensor in
``optimizer.state`` (``step`` scalars included) divided by the parameter
count: "optimizer" is what the optimizer owns, "total" adds the parameter and
its gradient as they are stored. "moved" is the floor of memory traffic of
one step (no clipping) from the same sizes (SPEC §5's rule): the gradient,
the weight's storage (the fp32 master alone; else the param, and its
remainder) and every moment read, the param, master or remainder and every
moment written. docs/compressed_state.md has the table.

``--rss`` also measures each mode's peak resident memory: a fresh process per
mode with 64M parameters in 64 tensors, two steps, ``ru_maxrss`` after minus
the resident size before the model was made (parameters, gradients, state and
whatever a step allocates), with glibc's mmap threshold fixed low so freed
temporaries do not stay in the high-water mark.

    python -m benchmarks.bytes_per_param [--rss]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys

import torch

import fastopt

SHAPES = [(512, 512), (1024, 512), (512, 1024), (64, 256), (1024,)]
F32, BF16 = torch.float32, torch.bfloat16

# name -> (optimizer class, param dtype, grad dtype, master_weights, state_dtype)
MODES = {
    "AdamW fp32": (fastopt.AdamW, F32, F32, False, None),
    "AdamW fp32 params, bf16 moments": (fastopt.AdamW, F32, F32, False, BF16),
    "AdamW fp32 params, int8 moments": (fastopt.AdamW, F32, F32, False, "int8"),
    "AdamW bf16 params, bf16 moments, no master (not exact)": (fastopt.AdamW, BF16, BF16, False, None),
    "AdamW bf16 params, int8 moments, no master (not exact)": (fastopt.AdamW, BF16, BF16, False, "int8"),
    "AdamW bf16 + fp32 master (master_weights=True)": (fastopt.AdamW, BF16, BF16, True, None),
    "AdamW bf16 + remainder, fp32 moments": (fastopt.AdamW, BF16, BF16, "remainder", None),
    "AdamW bf16 + remainder, bf16 moments": (fastopt.AdamW, BF16, BF16, "remainder", BF16),
    "AdamW bf16 + remainder, int8 moments": (fastopt.AdamW, BF16, BF16, "remainder", "int8"),
    "Lion bf16 + remainder, bf16 moment": (fastopt.Lion, BF16, BF16, "remainder", BF16),
    "Lion bf16 + remainder, int8 moment": (fastopt.Lion, BF16, BF16, "remainder", "int8"),
    "Lion bf16, int8 moment, no master (not exact)": (fastopt.Lion, BF16, BF16, False, "int8"),
    "AdEMAMix bf16 + remainder, bf16 moments": (fastopt.AdEMAMix, BF16, BF16, "remainder", BF16),
    "AdEMAMix bf16 + remainder, int8 moments": (fastopt.AdEMAMix, BF16, BF16, "remainder", "int8"),
}  # fmt: skip


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def build(cls, p_dtype, g_dtype, master, state_dtype, shapes):
    params = [torch.nn.Parameter(torch.randn(s, dtype=p_dtype)) for s in shapes]
    opt = cls(params, master_weights=master, state_dtype=state_dtype, backend="cpu")
    for p in params:
        p.grad = torch.randn(p.shape, dtype=g_dtype)
    opt.step()
    return params, opt


def measure(cls, p_dtype, g_dtype, master, state_dtype) -> dict:
    """Parameters, optimizer-owned bytes, param + grad bytes and the bytes one step
    moves, after one step."""
    params, opt = build(cls, p_dtype, g_dtype, master, state_dtype, SHAPES)
    n = sum(p.numel() for p in params)
    owned = moved = 0
    for p in params:
        st = opt.state[p]
        owned += sum(_nbytes(t) for t in st.values() if isinstance(t, torch.Tensor))
        moments = sum(_nbytes(t) for k, t in st.items() if k.startswith("exp_avg"))
        if "master_param" in st:  # the fp32 master stands in for the param's read
            weight_read, weight_written = _nbytes(st["master_param"]), _nbytes(st["master_param"])
        else:
            extra = _nbytes(st["master_remainder"]) if "master_remainder" in st else 0
            weight_read, weight_written = _nbytes(p) + extra, extra
        moved += _nbytes(p.grad) + weight_read + moments  # reads
        moved += _nbytes(p) + weight_written + moments  # writes
    model = sum(_nbytes(p) + _nbytes(p.grad) for p in params)
    return dict(n=n, owned=owned, model=model, moved=moved)


def _rss_child(name: str) -> dict:
    torch.set_num_threads(2)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    shapes = [(1024, 1024)] * 64
    params, opt = build(*MODES[name], shapes)
    opt.step()
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    n = sum(p.numel() for p in params)
    return dict(n=n, peak_mb=(peak - before) / 1024)


def measure_rss(name: str) -> dict:
    code = (
        "import json, sys; from benchmarks import bytes_per_param as b; "
        "print('@@' + json.dumps(b._rss_child(sys.argv[1])))"
    )
    # a fixed small mmap threshold: freed temporaries leave the high-water mark
    # honest (NOTE [malloc and peak RSS] in benchmarks/harness.py)
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_=str(64 * 1024),
               MALLOC_TRIM_THRESHOLD_=str(64 * 1024))  # fmt: skip
    out = subprocess.run([sys.executable, "-c", code, name], capture_output=True, text=True,
                         check=True, env=env).stdout  # fmt: skip
    return json.loads(next(ln for ln in out.splitlines() if ln.startswith("@@"))[2:])


def main(argv=None) -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rss", action="store_true", help="peak RSS per mode at 64M parameters")
    args = ap.parse_args(argv)
    head = "| mode | optimizer B/param | total B/param | moved B/param/step |"
    if args.rss:
        head += " peak RSS at 64M params (MB) | RSS B/param |"
    print(head)
    print("|---" * (head.count("|") - 1) + "|")
    for name, spec in MODES.items():
        r = measure(*spec)
        row = (f"| {name} | {r['owned'] / r['n']:.3f} | {(r['owned'] + r['model']) / r['n']:.3f} "
               f"| {r['moved'] / r['n']:.2f} |")  # fmt: skip
        if args.rss:
            m = measure_rss(name)
            row += f" {m['peak_mb']:.0f} | {m['peak_mb'] * 2**20 / m['n']:.2f} |"
        print(row, flush=True)


if __name__ == "__main__":
    main()
