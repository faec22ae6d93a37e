"""AdEMAMix (Pagliardini et al. 2024, arXiv 2409.03137, Algorithm 1) over a whole
(device, dtype) group in one Triton launch.

Same layout as adamw.py: launcher ``ademamix_``, kernel ``_ademamix_kernel``
(per program: the tensor's coefficients, including the alpha and beta3
warm-up schedules at its own step), block ``_ademamix_block``. Multi-tensor
exactly like AdamW, through the same tables (NOTE [triton multi-tensor]):
six arrays per row, p, g, master, m1, m2, v.
"""

from __future__ import annotations

import triton.language as tl

from fastopt.triton_kernels import elementwise as em
from fastopt.triton_kernels import multi_tensor as mt
from fastopt.triton_kernels.interpreter import device_fn

# Array slots of an AdEMAMix row after the shared PARAM, GRAD, MASTER_PARAM.
EXP_AVG = mt.FIRST_STATE  # m1, the fast EMA
EXP_AVG_SLOW = tl.constexpr(mt.FIRST_STATE.value + 1)  # m2, the slow EMA
EXP_AVG_SQ = tl.constexpr(mt.FIRST_STATE.value + 2)


def ademamix_(params, grads, exp_avgs, exp_avgs_slow, exp_avg_sqs, master_params, state_steps, *,
              lr, lr_tensor, beta1, beta2, beta3, alpha, t_alpha, t_beta3, eps, weight_decay,
              maximize, grad_mul, max_grad_value, clip_coef, skip) -> None:  # fmt: skip
    r"""In-place AdEMAMix over contiguous tensors of one device, param dtype and grad dtype
    (the op's signature, csrc/ops.cpp; arguments in fastopt/functional.py).

    With :math:`g` the transformed gradient and each tensor's own step :math:`t`:

    .. math::
        \alpha_t = \min(t\alpha/T_\alpha, \alpha),\quad
        \beta_{3,t} = \min\!\left(\exp\frac{\ln\beta_1 \ln\beta_3}
            {(1-t/T_{\beta_3})\ln\beta_3 + (t/T_{\beta_3})\ln\beta_1},\ \beta_3\right) \\
        m_1 \gets \mathrm{lerp}(m_1, g, 1-\beta_1);\quad
        m_2 \gets \mathrm{lerp}(m_2, g, 1-\beta_{3,t});\quad
        v \gets \beta_2 v + (1-\beta_2) g^2 \\
        \theta \gets \theta - \eta\left(\frac{m_1/(1-\beta_1^t) + \alpha_t m_2}
            {\sqrt{v}/\sqrt{1-\beta_2^t} + \epsilon} + \lambda\theta\right)

    ``t_alpha`` / ``t_beta3`` None: no warm-up (alpha_t = alpha, beta3_t = beta3).
    One launch; the kernel reads ``lr_tensor``, the steps, ``grad_mul``,
    ``clip_coef`` and ``skip`` on the device; nothing here synchronises.
    """
    if not params:
        return
    state_dtype = mt.moment_dtype(params, exp_avgs)
    states = [(exp_avgs, state_dtype), (exp_avgs_slow, state_dtype), (exp_avg_sqs, state_dtype)]
    table = mt.update_table(params, grads, master_params, states, state_steps)
    shared = mt.update_args(params[0].device, lr, lr_tensor, maximize, grad_mul, max_grad_value,
                            clip_coef, skip)  # fmt: skip
    mt.launch(
        _ademamix_kernel, table, **shared,
        beta1=beta1, beta2=beta2, beta3=beta3, alpha=alpha,
        # 0 means "no warm-up", as in update_math.h's ademamix_coeffs.
        t_alpha=0.0 if t_alpha is None else float(t_alpha),
        t_beta3=0.0 if t_beta3 is None else float(t_beta3),
        eps=eps, weight_decay=weight_decay,
        P_DTYPE=mt.TL_DTYPE[params[0].dtype], G_DTYPE=mt.TL_DTYPE[grads[0].dtype],
        S_DTYPE=mt.TL_DTYPE[state_dtype], MASTER=mt.master_kind(params, master_params),
    )  # fmt: skip


@mt.kernel
def _ademamix_kernel(
    chunks_ptr,  # *i64 [n_chunks]: one chunk entry per program (NOTE [triton multi-tensor])
    rows_ptr,  # *i64 [n_tensors, ROW_WIDTH]: numel, &step, &param, &grad, &master, &exp_avg, &exp_avg_slow, &exp_avg_sq
    lr: tl.float64,  # times *lr_ptr: the learning rate
    lr_ptr,  # *fp32 0-dim: lr_tensor, or 1.0 when lr is a float
    transform,  # elementwise.GradTransform: the gradient transform's arguments
    skip_ptr,  # *fp32 0-dim: non-zero means write nothing
    beta1: tl.float64,  # fast EMA and bias correction 1 - beta1^t
    beta2: tl.float64,  # second moment and bias correction 1 - beta2^t
    beta3: tl.float64,  # slow EMA (its final value under the warm-up)
    alpha: tl.float64,  # weight of the slow EMA (its final value under the warm-up)
    t_alpha: tl.float64,  # alpha warm-up length in steps; 0: none
    t_beta3: tl.float64,  # beta3 warm-up length in steps; 0: none
    eps: tl.float64,
    weight_decay: tl.float64,
    P_DTYPE: tl.constexpr,  # storage dtype of params
    G_DTYPE: tl.constexpr,  # storage dtype of grads: P_DTYPE, or fp32 for bf16/fp16 params
    S_DTYPE: tl.constexpr,  # storage dtype of the moments: fp32, bf16, P_DTYPE or uint8 (8-bit)
    MASTER: tl.constexpr,  # 0: none; 1: fp32 master; 2: int16 remainder (NOTE [master remainder])
    ALIGNED: tl.constexpr,  # every address is 16-byte aligned (NOTE [triton multi-tensor])
):
    if tl.load(skip_ptr) == 0.0:
        row, start, n, weights = mt.update_prologue(
            chunks_ptr, rows_ptr, P_DTYPE, G_DTYPE, MASTER, ALIGNED
        )
        m1_ptr, m1_scales = mt.moment_ptrs(row, EXP_AVG, S_DTYPE, ALIGNED, n)
        m2_ptr, m2_scales = mt.moment_ptrs(row, EXP_AVG_SLOW, S_DTYPE, ALIGNED, n)
        v_ptr, v_scales = mt.moment_ptrs(row, EXP_AVG_SQ, S_DTYPE, ALIGNED, n)
        coeffs = _ademamix_coeffs(
            em.learning_rate(lr, lr_ptr),
            em.f64(beta1),
            em.f64(beta2),
            em.f64(beta3),
            em.f64(alpha),
            em.f64(t_alpha),
            em.f64(t_beta3),
            em.f64(eps),
            em.f64(weight_decay),
            mt.step_count(row),
        )
        moments = (m1_ptr, m2_ptr, v_ptr, m1_scales, m2_scales, v_scales)
        args = (weights, moments, coeffs, em.grad_scalars(transform), MASTER)
        mt.for_each_block(_ademamix_block, args, start, n)


@device_fn
def _ademamix_coeffs(lr, beta1, beta2, beta3, alpha, t_alpha, t_beta3, eps, weight_decay, t):
    """One tensor's AdEMAMix scalars at its step t, computed in fp64 and rounded
    once to fp32 (update_math.h's ademamix_coeffs; the reference's
    ademamix_schedules). A warm-up length of 0 means none: both schedules are
    computed (with a length of 1 standing in) and the constant selected."""
    warm_alpha = t_alpha > 0.0
    alpha_t = tl.minimum(t * alpha / tl.where(warm_alpha, t_alpha, 1.0), alpha)
    alpha_t = tl.where(warm_alpha, alpha_t, alpha)
    warm_beta3 = t_beta3 > 0.0
    frac = t / tl.where(warm_beta3, t_beta3, 1.0)
    log1 = tl.log(tl.maximum(beta1, 1e-300))
    log3 = tl.log(beta3)
    beta3_t = tl.minimum(tl.exp(log1 * log3 / ((1.0 - frac) * log3 + frac * log1)), beta3)
    beta3_t = tl.where(warm_beta3, beta3_t, beta3)
    return (
        (1.0 - beta1).to(tl.float32),  # one_minus_beta1: the lerp weight of m1
        (1.0 - beta3_t).to(tl.float32),  # one_minus_beta3: the lerp weight of m2
        beta2.to(tl.float32),
        (1.0 - beta2).to(tl.float32),  # one_minus_beta2
        alpha_t.to(tl.float32),
        eps.to(tl.float32),
        lr.to(tl.float32),
        weight_decay.to(tl.float32),
        em.bias_correction(beta1, t).to(tl.float32),  # bias_corr1
        tl.sqrt(em.bias_correction(beta2, t)).to(tl.float32),  # bias_corr2_sqrt
    )


@device_fn
def _ademamix_block(args, offs, mask):
    """One block of AdEMAMix (update_math.h's ademamix_element)."""
    (p_ptr, g_ptr, w_ptr), moments, coeffs, transform, MASTER = args
    m1_ptr, m2_ptr, v_ptr, m1_scales, m2_scales, v_scales = moments
    (one_minus_beta1, one_minus_beta3, beta2, one_minus_beta2, alpha, eps, lr, weight_decay,
     bias_corr1, bias_corr2_sqrt) = coeffs  # fmt: skip
    g = em.transform_grad(em.load(g_ptr, offs, mask), transform)
    w = em.load_weight(p_ptr, w_ptr, offs, mask)
    # Each moment is stored as soon as it is updated, and only the update's
    # numerator and the weight stay live across the next one: with 8-bit
    # moments every store is a block reduction, and this order keeps the
    # specialisations within ptxas's register budget (tests/test_triton_aot.py).
    m1 = em.lerp(em.load_moment(m1_ptr, m1_scales, offs, mask, True), g, one_minus_beta1)
    em.store_moment(m1_ptr, m1_scales, offs, m1, mask, True)
    m2 = em.lerp(em.load_moment(m2_ptr, m2_scales, offs, mask, True), g, one_minus_beta3)
    em.store_moment(m2_ptr, m2_scales, offs, m2, mask, True)
    numer = tl.div_rn(m1, bias_corr1) + alpha * m2
    v = em.second_moment(em.load_moment(v_ptr, v_scales, offs, mask, False), g, beta2, one_minus_beta2)
    em.store_moment(v_ptr, v_scales, offs, v, mask, False)
    update = tl.div_rn(numer, em.adam_denom(v, bias_corr2_sqrt, eps)) + weight_decay * w
    w = tl.fma(update, -lr, w)  # torch's add_(update, alpha=-lr)
    em.store_weight(p_ptr, w_ptr, offs, w, mask, MASTER)
    return 0.0
