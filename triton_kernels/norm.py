"""Sum of squares of every gradient of a group, in one Triton launch.

Each program squares and sums one chunk (NOTE [triton multi-tensor]) in fp32
and writes one partial; the partials are summed in fp64 by one small torch
reduction. No atomics, so the result is deterministic run to run.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from fastopt.triton_kernels import multi_tensor as mt
from fastopt.triton_kernels.adamw import _TL_DTYPE


@triton.jit(do_not_specialize_on_alignment=["chunks_ptr", "rows_ptr", "partials_ptr"])
def _sumsq_kernel(
    chunks_ptr,  # *i64 [n_chunks]: (tensor index << 32) | chunk index, one per program
    rows_ptr,  # *i64 [n_tensors, ROW_WIDTH]: numel, (unused), &grad
    partials_ptr,  # *fp32 [n_chunks]: this program's sum of squares
    G_DTYPE: tl.constexpr,  # storage dtype of the gradients
    ALIGNED: tl.constexpr,  # every address is 16-byte aligned
    ROW_WIDTH: tl.constexpr,  # int64 words per tensor row
    BLOCK: tl.constexpr,  # elements per inner iteration
    CHUNK: tl.constexpr,  # elements per program
):
    row, start, n = mt.locate_chunk(chunks_ptr, rows_ptr, ROW_WIDTH, CHUNK)
    g_ptr = mt.array_ptr(row, 0, G_DTYPE, ALIGNED)
    # Full chunks unmasked, the last chunk masked; one body (see adamw.py).
    acc = tl.zeros([BLOCK], dtype=tl.float32)
    is_tail = (start + CHUNK > n).to(tl.int32)
    for MASKED in tl.static_range(2):
        if is_tail == MASKED:
            end = n if MASKED else start + CHUNK
            for block_start in range(start, end, BLOCK):
                offs, mask = mt.block_offsets(block_start, n, BLOCK, MASKED)
                g = tl.load(g_ptr + offs, mask=mask, other=0.0).to(tl.float32)
                acc += g * g
    tl.store(partials_ptr + tl.program_id(0), tl.sum(acc, axis=0))


def grad_sumsq(grads: list[Tensor]) -> Tensor:
    """sum_i sum_j g_ij^2 over all gradients (one device) as an fp32 0-dim tensor.

    One launch per gradient dtype present; the per-chunk fp32 partials are
    added in fp64.
    """
    if not grads:
        return torch.zeros((), dtype=torch.float32)
    device = grads[0].device
    totals = []
    for g_dtype, pick in mt.by_grad_dtype(grads):
        table = mt.launch_table([pick(grads)])
        if table.n_chunks == 0:
            continue
        partials = torch.empty(table.n_chunks, dtype=torch.float32, device=device)
        _sumsq_kernel[(table.n_chunks,)](
            table.chunks, table.rows, partials,
            G_DTYPE=_TL_DTYPE[g_dtype], ALIGNED=table.aligned,
            ROW_WIDTH=mt.ROW_WIDTH, BLOCK=mt.block_size(), CHUNK=mt.CHUNK,
            num_warps=mt.NUM_WARPS,
        )  # fmt: skip
        totals.append(partials.sum(dtype=torch.float64))
    if not totals:
        return torch.zeros((), dtype=torch.float32, device=device)
    total = totals[0] if len(totals) == 1 else torch.stack(totals).sum()
    return total.float()
