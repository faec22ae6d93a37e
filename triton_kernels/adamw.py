"""AdamW over a whole (device, dtype) group in one Triton launch.

Read top to bottom: the launcher ``adamw_`` (host: checks and packs one
launch table, NOTE [triton multi-tensor]), the kernel ``_adamw_kernel`` (per
program: find its chunk, compute the tensor's coefficients), the block
``_adamw_block`` (the math of SPEC §2 on one block of elements). The shared
pieces live in multi_tensor.py (table walk, chunk loop) and elementwise.py
(gradient transform, lerp, loads and rounding stores).
"""

from __future__ import annotations

import torch
import triton.language as tl

from fastopt.triton_kernels import elementwise as em
from fastopt.triton_kernels import multi_tensor as mt
from fastopt.triton_kernels.interpreter import device_fn

# Array slots of an AdamW row after the shared PARAM, GRAD, MASTER_PARAM.
EXP_AVG = mt.FIRST_STATE
EXP_AVG_SQ = tl.constexpr(mt.FIRST_STATE.value + 1)
MAX_EXP_AVG_SQ = tl.constexpr(mt.FIRST_STATE.value + 2)


def adamw_(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, master_params, state_steps, *,
           lr, lr_tensor, beta1, beta2, eps, weight_decay, amsgrad, maximize,
           grad_mul, max_grad_value, clip_coef, skip) -> None:  # fmt: skip
    r"""In-place AdamW over contiguous tensors of one device, param dtype and grad dtype
    (the op's signature, csrc/ops.cpp; arguments in fastopt/functional.py).

    With :math:`g` the transformed gradient (NOTE [gradient transform]):

    .. math::
        \theta \gets \theta(1-\eta\lambda);\quad m \gets \mathrm{lerp}(m, g, 1-\beta_1);\quad
        v \gets \beta_2 v + (1-\beta_2) g^2 \\
        \hat v = \max(\hat v, v) \text{ (amsgrad) else } v;\quad
        \theta \gets \theta - \frac{\eta}{1-\beta_1^t}\,
            \frac{m}{\sqrt{\hat v}/\sqrt{1-\beta_2^t} + \epsilon}

    One launch. The kernel reads ``lr_tensor``, the steps, ``grad_mul``,
    ``clip_coef`` and ``skip`` on the device; nothing here synchronises.
    """
    if not params:
        return
    state_dtype = mt.moment_dtype(params, exp_avgs)
    if amsgrad and state_dtype == torch.uint8:
        raise ValueError("fastopt triton backend: amsgrad is not supported with 8-bit moments")
    states = [(exp_avgs, state_dtype), (exp_avg_sqs, state_dtype)]
    if amsgrad:
        states.append((max_exp_avg_sqs, state_dtype))
    table = mt.update_table(params, grads, master_params, states, state_steps)
    shared = mt.update_args(params[0].device, lr, lr_tensor, maximize, grad_mul, max_grad_value,
                            clip_coef, skip)  # fmt: skip
    mt.launch(
        _adamw_kernel, table, **shared,
        beta1=beta1, beta2=beta2, eps=eps, weight_decay=weight_decay,
        P_DTYPE=mt.TL_DTYPE[params[0].dtype], G_DTYPE=mt.TL_DTYPE[grads[0].dtype],
        S_DTYPE=mt.TL_DTYPE[state_dtype], MASTER=mt.master_kind(params, master_params),
        AMSGRAD=bool(amsgrad),
    )  # fmt: skip


@mt.kernel
def _adamw_kernel(
    chunks_ptr,  # *i64 [n_chunks]: one chunk entry per program (NOTE [triton multi-tensor])
    rows_ptr,  # *i64 [n_tensors, ROW_WIDTH]: numel, &step, &param, &grad, &master, &exp_avg, &exp_avg_sq, &max_exp_avg_sq
    lr: tl.float64,  # times *lr_ptr: the learning rate
    lr_ptr,  # *fp32 0-dim: lr_tensor, or 1.0 when lr is a float
    transform,  # elementwise.GradTransform: the gradient transform's arguments
    skip_ptr,  # *fp32 0-dim: non-zero means write nothing
    beta1: tl.float64,
    beta2: tl.float64,
    eps: tl.float64,
    weight_decay: tl.float64,
    P_DTYPE: tl.constexpr,  # storage dtype of params
    G_DTYPE: tl.constexpr,  # storage dtype of grads: P_DTYPE, or fp32 for bf16/fp16 params
    S_DTYPE: tl.constexpr,  # storage dtype of the moments: fp32, bf16, P_DTYPE or uint8 (8-bit)
    MASTER: tl.constexpr,  # 0: none; 1: fp32 master; 2: int16 remainder (NOTE [master remainder])
    ALIGNED: tl.constexpr,  # every address is 16-byte aligned (NOTE [triton multi-tensor])
    AMSGRAD: tl.constexpr,  # read/write max_exp_avg_sq
):
    if tl.load(skip_ptr) == 0.0:
        row, start, n, weights = mt.update_prologue(
            chunks_ptr, rows_ptr, P_DTYPE, G_DTYPE, MASTER, ALIGNED
        )
        m_ptr, m_scales = mt.moment_ptrs(row, EXP_AVG, S_DTYPE, ALIGNED, n)
        v_ptr, v_scales = mt.moment_ptrs(row, EXP_AVG_SQ, S_DTYPE, ALIGNED, n)
        vmax_ptr = mt.array_ptr(row, MAX_EXP_AVG_SQ, S_DTYPE, ALIGNED) if AMSGRAD else v_ptr
        coeffs = _adamw_coeffs(
            em.learning_rate(lr, lr_ptr),
            em.f64(beta1),
            em.f64(beta2),
            em.f64(eps),
            em.f64(weight_decay),
            mt.step_count(row),
        )
        args = (
            weights,
            (m_ptr, v_ptr, vmax_ptr, m_scales, v_scales),
            coeffs,
            em.grad_scalars(transform),
            AMSGRAD,
            MASTER,
        )
        mt.for_each_block(_adamw_block, args, start, n)


@device_fn
def _adamw_coeffs(lr, beta1, beta2, eps, weight_decay, t):
    """One tensor's AdamW scalars, computed in fp64 and rounded once to fp32
    (update_math.h's adamw_coeffs)."""
    return (
        (1.0 - beta1).to(tl.float32),  # one_minus_beta1: the lerp weight of m
        beta2.to(tl.float32),
        (1.0 - beta2).to(tl.float32),  # one_minus_beta2
        eps.to(tl.float32),
        (1.0 - lr * weight_decay).to(tl.float32),  # decay
        (lr / em.bias_correction(beta1, t)).to(tl.float32),  # step_size
        tl.sqrt(em.bias_correction(beta2, t)).to(tl.float32),  # bias_corr2_sqrt
    )


@device_fn
def _adamw_block(args, offs, mask):
    """One block of AdamW (update_math.h's adamw_element)."""
    (p_ptr, g_ptr, w_ptr), moments, coeffs, transform, AMSGRAD, MASTER = args
    m_ptr, v_ptr, vmax_ptr, m_scales, v_scales = moments
    one_minus_beta1, beta2, one_minus_beta2, eps, decay, step_size, bias_corr2_sqrt = coeffs
    g = em.transform_grad(em.load(g_ptr, offs, mask), transform)
    w = em.load_weight(p_ptr, w_ptr, offs, mask) * decay
    m = em.lerp(em.load_moment(m_ptr, m_scales, offs, mask, True), g, one_minus_beta1)
    v = em.load_moment(v_ptr, v_scales, offs, mask, False)
    v = em.second_moment(v, g, beta2, one_minus_beta2)
    v_used = v
    if AMSGRAD:
        # NaN-propagating max, like torch.maximum.
        v_used = tl.maximum(em.load(vmax_ptr, offs, mask), v, propagate_nan=tl.PropagateNan.ALL)
        em.store(vmax_ptr, offs, v_used, mask)
    # torch's addcdiv_(m, denom, value=-step_size): p + (value * m) / denom.
    w = w + tl.div_rn((-step_size) * m, em.adam_denom(v_used, bias_corr2_sqrt, eps))
    em.store_moment(m_ptr, m_scales, offs, m, mask, True)
    em.store_moment(v_ptr, v_scales, offs, v, mask, False)
    em.store_weight(p_ptr, w_ptr, offs, w, mask, MASTER)
    return 0.0
