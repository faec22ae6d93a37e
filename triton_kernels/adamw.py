"""AdamW over a whole (device, dtype) group in one Triton launch.

Launcher ``adamw_`` (host: checks and packs) and kernel ``_adamw_kernel``
(device: only computes) in one file. The math is SPEC §2 / the reference
backend; see NOTE [triton multi-tensor] for how one launch covers many tensors
and NOTE [explicit RNE in Triton] for the narrowing stores.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from fastopt.triton_kernels import multi_tensor as mt
from fastopt.triton_kernels.rounding import narrow

# NOTE [interpreter cost of jit calls]
# Under TRITON_INTERPRET=1 every call of a nested @triton.jit function re-patches
# triton.language (~0.2-0.6 ms each with triton 3.8), so the kernels call
# helpers only per program or per block, never per element: the multi-tensor
# table walk shared by all three kernels (``mt.locate_chunk``, ``mt.array_ptr``,
# ``mt.block_offsets``; together they cost ~25% more interpreted time than the
# inlined code did, for identical PTX) and ``narrow`` for bf16/fp16 stores.
# Arithmetic idioms (the fp64 rebuild of split scalars, the lerp) stay inline:
# a helper there would add calls without removing a shared block. The chunk
# loop is written once inside a two-way ``tl.static_range`` (masked tail /
# unmasked full chunk) instead of a helper called from two branches. Compiled,
# both forms inline the same way.


@triton.jit(
    do_not_specialize_on_alignment=[
        "chunks_ptr",
        "rows_ptr",
        "lr_ptr",
        "grad_mul_ptr",
        "found_inf_ptr",
    ]
)
def _adamw_kernel(
    chunks_ptr,  # *i64 [n_chunks]: (tensor index << 32) | chunk index, one per program
    rows_ptr,  # *i64 [n_tensors, ROW_WIDTH]: numel, &step, &param, &grad, &exp_avg, &exp_avg_sq, &max_exp_avg_sq, &master
    lr_hi,  # fp32 } lr = (lr_hi + lr_lo) * *lr_ptr, in fp64 (NOTE [double scalars through fp32 arguments]):
    lr_lo,  # fp32 } a Python lr split in two and lr_ptr -> 1.0, or 1.0 + 0.0 and a tensor lr
    lr_ptr,  # *fp64 0-dim
    wd_hi,  # fp32 } weight_decay = wd_hi + wd_lo
    wd_lo,  # fp32 }
    beta1_hi,  # fp32 } beta1 = beta1_hi + beta1_lo, for the bias correction 1 - beta1^t
    beta1_lo,  # fp32 }
    beta2_hi,  # fp32 } beta2 = beta2_hi + beta2_lo, for the bias correction 1 - beta2^t
    beta2_lo,  # fp32 }
    one_minus_beta1,  # fp32: 1 - beta1 (in double on the host), the lerp weight
    beta2,  # fp32
    one_minus_beta2,  # fp32: 1 - beta2 (in double on the host)
    eps,  # fp32
    grad_sign,  # fp32: -1.0 when maximize, else 1.0
    grad_mul_ptr,  # *fp32 0-dim: unscale * clip coefficient, multiplies every gradient
    found_inf_ptr,  # *fp32 0-dim: non-zero means write nothing
    P_DTYPE: tl.constexpr,  # storage dtype of params (and of exp_avg* unless MASTER)
    G_DTYPE: tl.constexpr,  # storage dtype of grads
    AMSGRAD: tl.constexpr,  # read/write max_exp_avg_sq
    MASTER: tl.constexpr,  # fp32 master/exp_avg*; param written as the rounded master
    ALIGNED: tl.constexpr,  # every address is 16-byte aligned (NOTE [triton multi-tensor])
    ROW_WIDTH: tl.constexpr,  # int64 words per tensor row
    BLOCK: tl.constexpr,  # elements per inner iteration
    CHUNK: tl.constexpr,  # elements per program
):
    # Float arguments arrive as fp32 when compiled and as Python floats in the
    # interpreter; the casts make both see the same fp32 values.
    lr = (
        tl.cast(lr_hi, tl.float32).to(tl.float64) + tl.cast(lr_lo, tl.float32).to(tl.float64)
    ) * tl.load(lr_ptr)
    weight_decay = tl.cast(wd_hi, tl.float32).to(tl.float64) + tl.cast(wd_lo, tl.float32).to(
        tl.float64
    )
    beta1_64 = tl.cast(beta1_hi, tl.float32).to(tl.float64) + tl.cast(beta1_lo, tl.float32).to(
        tl.float64
    )
    beta2_64 = tl.cast(beta2_hi, tl.float32).to(tl.float64) + tl.cast(beta2_lo, tl.float32).to(
        tl.float64
    )
    one_minus_beta1 = tl.cast(one_minus_beta1, tl.float32)
    beta2 = tl.cast(beta2, tl.float32)
    one_minus_beta2 = tl.cast(one_minus_beta2, tl.float32)
    eps = tl.cast(eps, tl.float32)
    grad_sign = tl.cast(grad_sign, tl.float32)
    if tl.load(found_inf_ptr) == 0.0:
        row, start, n = mt.locate_chunk(chunks_ptr, rows_ptr, ROW_WIDTH, CHUNK)
        S_DTYPE: tl.constexpr = tl.float32 if MASTER else P_DTYPE
        p_ptr = mt.array_ptr(row, 0, P_DTYPE, ALIGNED)
        g_ptr = mt.array_ptr(row, 1, G_DTYPE, ALIGNED)
        m_ptr = mt.array_ptr(row, 2, S_DTYPE, ALIGNED)
        v_ptr = mt.array_ptr(row, 3, S_DTYPE, ALIGNED)
        vmax_ptr = mt.array_ptr(row, 4, S_DTYPE, ALIGNED)
        w_ptr = mt.array_ptr(row, 5, tl.float32, ALIGNED) if MASTER else p_ptr

        # Per-tensor scalars in fp64, rounded once to fp32, as the reference
        # does them on Python floats; the step count differs per tensor.
        t = tl.load(tl.load(row + 1).to(tl.pointer_type(tl.float32))).to(tl.float64)
        # beta^t as exp(t ln beta); beta = 0 is clamped to 1e-300, whose t-th
        # power (t >= 1) is 0 in double just the same, without a log(0).
        bc1 = 1.0 - tl.exp(t * tl.log(tl.maximum(beta1_64, 1e-300)))
        bc2 = 1.0 - tl.exp(t * tl.log(tl.maximum(beta2_64, 1e-300)))
        step_size = (lr / bc1).to(tl.float32)
        bc2_sqrt = tl.sqrt(bc2).to(tl.float32)
        decay = (1.0 - lr * weight_decay).to(tl.float32)
        grad_mul = tl.load(grad_mul_ptr) * grad_sign

        # A full chunk loops a constant trip count under an all-true constant
        # mask, which the compiler drops (unmasked accesses can be 128-bit
        # vectors); a tensor's last chunk is masked and loops only over what
        # it holds. One body, instantiated for both (NOTE above).
        is_tail = (start + CHUNK > n).to(tl.int32)
        for MASKED in tl.static_range(2):
            if is_tail == MASKED:
                end = n if MASKED else start + CHUNK
                for block_start in range(start, end, BLOCK):
                    offs, mask = mt.block_offsets(block_start, n, BLOCK, MASKED)
                    g = tl.load(g_ptr + offs, mask=mask, other=0.0).to(tl.float32) * grad_mul
                    w = tl.load(w_ptr + offs, mask=mask, other=0.0).to(tl.float32)
                    m = tl.load(m_ptr + offs, mask=mask, other=0.0).to(tl.float32)
                    v = tl.load(v_ptr + offs, mask=mask, other=0.0).to(tl.float32)
                    # SPEC §2 in the reference's order of operations (torch.lerp's
                    # two formulas for m, addcmul for v, addcdiv for the step).
                    w = w * decay
                    m = tl.where(
                        one_minus_beta1 < 0.5,
                        m + one_minus_beta1 * (g - m),
                        g - (g - m) * (1.0 - one_minus_beta1),
                    )
                    v = v * beta2 + one_minus_beta2 * g * g
                    v_used = v
                    if AMSGRAD:
                        vmax = tl.load(vmax_ptr + offs, mask=mask, other=0.0).to(tl.float32)
                        vmax = tl.maximum(vmax, v, propagate_nan=tl.PropagateNan.ALL)
                        v_used = vmax
                    denom = tl.div_rn(tl.sqrt_rn(v_used), bc2_sqrt) + eps
                    w = w - step_size * tl.div_rn(m, denom)
                    if S_DTYPE == tl.float32:
                        tl.store(m_ptr + offs, m, mask=mask)
                        tl.store(v_ptr + offs, v, mask=mask)
                        if AMSGRAD:
                            tl.store(vmax_ptr + offs, vmax, mask=mask)
                    else:
                        tl.store(m_ptr + offs, narrow(m, S_DTYPE), mask=mask)
                        tl.store(v_ptr + offs, narrow(v, S_DTYPE), mask=mask)
                        if AMSGRAD:
                            tl.store(vmax_ptr + offs, narrow(vmax, S_DTYPE), mask=mask)
                    if MASTER:
                        tl.store(w_ptr + offs, w, mask=mask)
                    # The parameter: the weight itself, or the master rounded to nearest even.
                    if P_DTYPE == tl.float32:
                        tl.store(p_ptr + offs, w, mask=mask)
                    else:
                        tl.store(p_ptr + offs, narrow(w, P_DTYPE), mask=mask)


_TL_DTYPE = {torch.float32: tl.float32, torch.bfloat16: tl.bfloat16, torch.float16: tl.float16}


def adamw_(
    params: list[Tensor],
    grads: list[Tensor],
    exp_avgs: list[Tensor],
    exp_avg_sqs: list[Tensor],
    max_exp_avg_sqs: list[Tensor],
    master_params: list[Tensor],
    steps: list[Tensor],
    *,
    lr: float | Tensor,
    beta1: float,
    beta2: float,
    eps: float,
    weight_decay: float,
    amsgrad: bool,
    maximize: bool,
    grad_scale: Tensor | None,
    found_inf: Tensor | None,
) -> None:
    """In-place AdamW over contiguous tensors of one device and param dtype.

    One launch per gradient dtype present (one in practice). The kernel reads
    lr (if a tensor), the steps, ``grad_scale`` and ``found_inf`` on the
    device; nothing here synchronises.
    """
    if not params:
        return
    (lr_hi, lr_lo, lr_ptr), grad_mul, found = mt.update_scalars(
        params[0].device, lr, grad_scale, found_inf
    )
    master = bool(master_params)
    for g_dtype, pick in mt.by_grad_dtype(grads):
        p = pick(params)
        # Unused table slots repeat the param address; the kernel never touches them.
        arrays = [
            p,
            pick(grads),
            pick(exp_avgs),
            pick(exp_avg_sqs),
            pick(max_exp_avg_sqs) if amsgrad else p,
            pick(master_params) if master else p,
        ]
        table = mt.launch_table(arrays, pick(steps))
        if table.n_chunks == 0:
            continue
        _adamw_kernel[(table.n_chunks,)](
            table.chunks, table.rows,
            lr_hi, lr_lo, lr_ptr, *mt.split_double(weight_decay),
            *mt.split_double(beta1), *mt.split_double(beta2),
            1.0 - beta1, beta2, 1.0 - beta2, eps, -1.0 if maximize else 1.0,
            grad_mul, found,
            P_DTYPE=_TL_DTYPE[params[0].dtype], G_DTYPE=_TL_DTYPE[g_dtype],
            AMSGRAD=bool(amsgrad), MASTER=master, ALIGNED=table.aligned,
            ROW_WIDTH=mt.ROW_WIDTH, BLOCK=mt.block_size(), CHUNK=mt.CHUNK,
            num_warps=mt.NUM_WARPS,
        )  # fmt: skip
