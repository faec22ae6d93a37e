"""Bytes per parameter of each optimizer-state mode, measured from the state tensors.

For every mode: a model of ~1M parameters (a few matrices, one vector), one
optimizer step so that every state exists, then the bytes of every tensor in
``optimizer.state`` (``step`` scalars included) divided by the parameter
count: "optimizer" is what the optimizer owns, "total" adds the parameter and
its gradient as they are stored. docs/compressed_state.md has the table.

    python -m benchmarks.bytes_per_param
"""

from __future__ import annotations

import torch

import fastopt

SHAPES = [(512, 512), (1024, 512), (512, 1024), (64, 256), (1024,)]

# name -> (optimizer class, param dtype, grad dtype, master_weights, state_dtype)
MODES = {
    "AdamW fp32": (fastopt.AdamW, torch.float32, torch.float32, False, None),
    "AdamW bf16 params, bf16 moments, no master": (fastopt.AdamW, torch.bfloat16, torch.bfloat16,
                                                   False, None),
    "AdamW bf16 + fp32 master (master_weights=True)": (fastopt.AdamW, torch.bfloat16,
                                                       torch.bfloat16, True, None),
    "AdamW bf16 + remainder, fp32 moments": (fastopt.AdamW, torch.bfloat16, torch.bfloat16,
                                             "remainder", None),
    "AdamW bf16 + remainder, bf16 moments": (fastopt.AdamW, torch.bfloat16, torch.bfloat16,
                                             "remainder", torch.bfloat16),
    "AdamW fp32 params, bf16 moments": (fastopt.AdamW, torch.float32, torch.float32, False,
                                        torch.bfloat16),
    "Lion bf16 + remainder, fp32 moment": (fastopt.Lion, torch.bfloat16, torch.bfloat16,
                                           "remainder", None),
    "Lion bf16 + remainder, bf16 moment": (fastopt.Lion, torch.bfloat16, torch.bfloat16,
                                           "remainder", torch.bfloat16),
    "AdEMAMix bf16 + remainder, bf16 moments": (fastopt.AdEMAMix, torch.bfloat16,
                                                torch.bfloat16, "remainder", torch.bfloat16),
}  # fmt: skip


def measure(cls, p_dtype, g_dtype, master, state_dtype) -> tuple[int, int, int]:
    """(parameters, optimizer-owned bytes, param + grad bytes) after one step."""
    params = [torch.nn.Parameter(torch.randn(s).to(p_dtype)) for s in SHAPES]
    opt = cls(params, master_weights=master, state_dtype=state_dtype, backend="cpu")
    for p in params:
        p.grad = torch.randn(p.shape).to(g_dtype)
    opt.step()
    n = sum(p.numel() for p in params)
    owned = sum(
        t.numel() * t.element_size()
        for st in opt.state.values()
        for t in st.values()
        if isinstance(t, torch.Tensor)
    )
    model = sum(p.numel() * p.element_size() + p.grad.numel() * p.grad.element_size()
                for p in params)  # fmt: skip
    return n, owned, model


def main() -> None:
    print(f"{'mode':48} {'optimizer B/param':>18} {'total B/param':>14}")
    for name, spec in MODES.items():
        n, owned, model = measure(*spec)
        print(f"{name:48} {owned / n:18.3f} {(owned + model) / n:14.3f}")


if __name__ == "__main__":
    main()
