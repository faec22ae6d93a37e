"""Sum of squares of every (unscaled, value-clipped) gradient of a group, in one Triton launch.

Each program squares and sums one chunk (NOTE [triton multi-tensor]) in fp32
and writes one partial; the partials are summed in fp64 by one small torch
reduction. No atomics, so the result is deterministic run to run.
"""

from __future__ import annotations

import torch
import triton.language as tl
from torch import Tensor

from fastopt.triton_kernels import elementwise as em
from fastopt.triton_kernels import multi_tensor as mt
from fastopt.triton_kernels.interpreter import device_fn

# The one array slot of a norm row.
GRAD = tl.constexpr(0)


def grad_sumsq(
    grads: list[Tensor], *, grad_mul: Tensor | None = None, max_grad_value: float | None = None
) -> Tensor:
    r""":math:`\sum_i \sum_j \mathrm{clamp}(g_{ij} \cdot \text{grad\_mul}, -c, c)^2` over the
    gradients (one device, one dtype) as an fp32 0-dim tensor; c = ``max_grad_value``
    (None: no clamp), grad_mul None: 1.

    One launch; the per-chunk fp32 partials are added in fp64. No host sync.
    """
    if not grads:
        return torch.zeros((), dtype=torch.float32)
    device = grads[0].device
    table = mt.launch_table([grads], [grads[0].dtype])
    if table.n_chunks == 0:
        return torch.zeros((), dtype=torch.float32, device=device)
    partials = torch.empty(table.n_chunks, dtype=torch.float32, device=device)
    # The update's transform up to the norm's own clip coefficient (SPEC §3 order).
    transform = mt.grad_transform(device, grad_mul, max_grad_value)
    mt.launch(
        _sumsq_kernel, table, partials_ptr=partials, transform=transform,
        G_DTYPE=mt.TL_DTYPE[grads[0].dtype],
    )  # fmt: skip
    return partials.sum(dtype=torch.float64).float()


@mt.kernel
def _sumsq_kernel(
    chunks_ptr,  # *i64 [n_chunks]: one chunk entry per program (NOTE [triton multi-tensor])
    rows_ptr,  # *i64 [n_tensors, ROW_WIDTH]: numel, (unused), &grad
    partials_ptr,  # *fp32 [n_chunks]: this program's sum of squares
    transform,  # elementwise.GradTransform: grad_mul and max_grad_value (sign and clip_coef 1)
    G_DTYPE: tl.constexpr,  # storage dtype of the gradients
    ALIGNED: tl.constexpr,  # every address is 16-byte aligned
):
    row, start, n = mt.locate_chunk(chunks_ptr, rows_ptr)
    g_ptr = mt.array_ptr(row, GRAD, G_DTYPE, ALIGNED)
    acc = mt.for_each_block(_sumsq_block, (g_ptr, em.grad_scalars(transform)), start, n)
    tl.store(partials_ptr + tl.program_id(0), tl.sum(acc, axis=0))


@device_fn
def _sumsq_block(args, offs, mask):
    """The squares of one block of transformed gradients (masked lanes load 0)."""
    g_ptr, transform = args
    g = em.transform_grad(em.load(g_ptr, offs, mask), transform)
    return g * g
