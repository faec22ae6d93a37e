"""Lion (Chen et al. 2023) over a whole (device, dtype) group in one Triton launch.

Same layout as adamw.py: launcher ``lion_`` packs, ``_lion_kernel`` computes.
See NOTE [triton multi-tensor] and NOTE [explicit RNE in Triton].
"""

from __future__ import annotations

import triton
import triton.language as tl
from torch import Tensor

from fastopt.triton_kernels import multi_tensor as mt
from fastopt.triton_kernels.adamw import _TL_DTYPE
from fastopt.triton_kernels.rounding import narrow


@triton.jit(
    do_not_specialize_on_alignment=[
        "chunks_ptr",
        "rows_ptr",
        "lr_ptr",
        "grad_mul_ptr",
        "found_inf_ptr",
    ]
)
def _lion_kernel(
    chunks_ptr,  # *i64 [n_chunks]: (tensor index << 32) | chunk index, one per program
    rows_ptr,  # *i64 [n_tensors, ROW_WIDTH]: numel, (unused), &param, &grad, &exp_avg, &master
    lr_hi,  # fp32 } lr = (lr_hi + lr_lo) * *lr_ptr in fp64 (NOTE [double scalars through fp32 arguments])
    lr_lo,  # fp32 }
    lr_ptr,  # *fp64 0-dim
    wd_hi,  # fp32 } weight_decay = wd_hi + wd_lo
    wd_lo,  # fp32 }
    one_minus_beta1,  # fp32: 1 - beta1, the lerp weight of the update direction
    one_minus_beta2,  # fp32: 1 - beta2, the lerp weight of the momentum
    grad_sign,  # fp32: -1.0 when maximize, else 1.0
    grad_mul_ptr,  # *fp32 0-dim: unscale * clip coefficient
    found_inf_ptr,  # *fp32 0-dim: non-zero means write nothing
    P_DTYPE: tl.constexpr,  # storage dtype of params (and exp_avg unless MASTER)
    G_DTYPE: tl.constexpr,  # storage dtype of grads
    MASTER: tl.constexpr,  # fp32 master/exp_avg; param written as the rounded master
    ALIGNED: tl.constexpr,  # every address is 16-byte aligned
    ROW_WIDTH: tl.constexpr,  # int64 words per tensor row
    BLOCK: tl.constexpr,  # elements per inner iteration
    CHUNK: tl.constexpr,  # elements per program
):
    # Same fp32 values compiled and interpreted (see _adamw_kernel).
    lr64 = (
        tl.cast(lr_hi, tl.float32).to(tl.float64) + tl.cast(lr_lo, tl.float32).to(tl.float64)
    ) * tl.load(lr_ptr)
    weight_decay = tl.cast(wd_hi, tl.float32).to(tl.float64) + tl.cast(wd_lo, tl.float32).to(
        tl.float64
    )
    one_minus_beta1 = tl.cast(one_minus_beta1, tl.float32)
    one_minus_beta2 = tl.cast(one_minus_beta2, tl.float32)
    grad_sign = tl.cast(grad_sign, tl.float32)
    if tl.load(found_inf_ptr) == 0.0:
        row, start, n = mt.locate_chunk(chunks_ptr, rows_ptr, ROW_WIDTH, CHUNK)
        S_DTYPE: tl.constexpr = tl.float32 if MASTER else P_DTYPE
        p_ptr = mt.array_ptr(row, 0, P_DTYPE, ALIGNED)
        g_ptr = mt.array_ptr(row, 1, G_DTYPE, ALIGNED)
        m_ptr = mt.array_ptr(row, 2, S_DTYPE, ALIGNED)
        w_ptr = mt.array_ptr(row, 3, tl.float32, ALIGNED) if MASTER else p_ptr

        lr = lr64.to(tl.float32)
        decay = (1.0 - lr64 * weight_decay).to(tl.float32)
        grad_mul = tl.load(grad_mul_ptr) * grad_sign
        # Full chunks unmasked, the last chunk masked; one body (see adamw.py).
        is_tail = (start + CHUNK > n).to(tl.int32)
        for MASKED in tl.static_range(2):
            if is_tail == MASKED:
                end = n if MASKED else start + CHUNK
                for block_start in range(start, end, BLOCK):
                    offs, mask = mt.block_offsets(block_start, n, BLOCK, MASKED)
                    g = tl.load(g_ptr + offs, mask=mask, other=0.0).to(tl.float32) * grad_mul
                    w = tl.load(w_ptr + offs, mask=mask, other=0.0).to(tl.float32)
                    m = tl.load(m_ptr + offs, mask=mask, other=0.0).to(tl.float32)
                    # c = lerp(m, g, 1 - beta1) with torch.lerp's two formulas, as the reference.
                    c = tl.where(
                        one_minus_beta1 < 0.5,
                        m + one_minus_beta1 * (g - m),
                        g - (g - m) * (1.0 - one_minus_beta1),
                    )
                    # sign(0) = 0, and a NaN stays NaN (as in update_math.h) so a
                    # non-finite gradient without a norm pass is visible in the weights.
                    update = tl.where(c > 0.0, 1.0, tl.where(c < 0.0, -1.0, c))
                    w = w * decay
                    w = w - lr * update
                    m = tl.where(
                        one_minus_beta2 < 0.5,
                        m + one_minus_beta2 * (g - m),
                        g - (g - m) * (1.0 - one_minus_beta2),
                    )
                    if S_DTYPE == tl.float32:
                        tl.store(m_ptr + offs, m, mask=mask)
                    else:
                        tl.store(m_ptr + offs, narrow(m, S_DTYPE), mask=mask)
                    if MASTER:
                        tl.store(w_ptr + offs, w, mask=mask)
                    if P_DTYPE == tl.float32:
                        tl.store(p_ptr + offs, w, mask=mask)
                    else:
                        tl.store(p_ptr + offs, narrow(w, P_DTYPE), mask=mask)


def lion_(
    params: list[Tensor],
    grads: list[Tensor],
    exp_avgs: list[Tensor],
    master_params: list[Tensor],
    *,
    lr: float | Tensor,
    beta1: float,
    beta2: float,
    weight_decay: float,
    maximize: bool,
    grad_scale: Tensor | None,
    found_inf: Tensor | None,
) -> None:
    """In-place Lion over contiguous tensors of one device and param dtype; no host sync."""
    if not params:
        return
    (lr_hi, lr_lo, lr_ptr), grad_mul, found = mt.update_scalars(
        params[0].device, lr, grad_scale, found_inf
    )
    master = bool(master_params)
    for g_dtype, pick in mt.by_grad_dtype(grads):
        p = pick(params)
        arrays = [p, pick(grads), pick(exp_avgs), pick(master_params) if master else p]
        table = mt.launch_table(arrays)
        if table.n_chunks == 0:
            continue
        _lion_kernel[(table.n_chunks,)](
            table.chunks, table.rows,
            lr_hi, lr_lo, lr_ptr, *mt.split_double(weight_decay),
            1.0 - beta1, 1.0 - beta2, -1.0 if maximize else 1.0,
            grad_mul, found,
            P_DTYPE=_TL_DTYPE[params[0].dtype], G_DTYPE=_TL_DTYPE[g_dtype],
            MASTER=master, ALIGNED=table.aligned,
            ROW_WIDTH=mt.ROW_WIDTH, BLOCK=mt.block_size(), CHUNK=mt.CHUNK,
            num_warps=mt.NUM_WARPS,
        )  # fmt: skip
