"""Lion (Chen et al. 2023) over a whole (device, dtype) group in one Triton launch.

Same layout as adamw.py: launcher ``lion_``, kernel ``_lion_kernel``, block
``_lion_block``; see NOTE [triton multi-tensor] and elementwise.py.
"""

from __future__ import annotations

import triton.language as tl

from fastopt.triton_kernels import elementwise as em
from fastopt.triton_kernels import multi_tensor as mt
from fastopt.triton_kernels.interpreter import device_fn

# Array slot of a Lion row after the shared PARAM, GRAD, MASTER_PARAM.
EXP_AVG = mt.FIRST_STATE


def lion_(params, grads, exp_avgs, master_params, *,
          lr, lr_tensor, beta1, beta2, weight_decay, maximize, grad_mul, max_grad_value, clip_coef,
          skip) -> None:  # fmt: skip
    r"""In-place Lion over contiguous tensors of one device, param dtype and grad dtype
    (the op's signature, csrc/ops.cpp; arguments in fastopt/functional.py):

    .. math::
        c = \mathrm{lerp}(m, g, 1-\beta_1);\quad
        \theta \gets \theta(1-\eta\lambda) - \eta\,\mathrm{sign}(c);\quad
        m \gets \mathrm{lerp}(m, g, 1-\beta_2)

    with :math:`g` the transformed gradient, sign(0) = 0 and a NaN kept a NaN.
    One launch, no host sync.
    """
    if not params:
        return
    state_dtype = mt.moment_dtype(params, exp_avgs)
    table = mt.update_table(params, grads, master_params, [(exp_avgs, state_dtype)])
    shared = mt.update_args(params[0].device, lr, lr_tensor, maximize, grad_mul, max_grad_value,
                            clip_coef, skip)  # fmt: skip
    mt.launch(
        _lion_kernel, table, **shared,
        beta1=beta1, beta2=beta2, weight_decay=weight_decay,
        P_DTYPE=mt.TL_DTYPE[params[0].dtype], G_DTYPE=mt.TL_DTYPE[grads[0].dtype],
        S_DTYPE=mt.TL_DTYPE[state_dtype], MASTER=mt.master_kind(params, master_params),
    )  # fmt: skip


@mt.kernel
def _lion_kernel(
    chunks_ptr,  # *i64 [n_chunks]: one chunk entry per program (NOTE [triton multi-tensor])
    rows_ptr,  # *i64 [n_tensors, ROW_WIDTH]: numel, (unused), &param, &grad, &master, &exp_avg
    lr: tl.float64,  # times *lr_ptr: the learning rate
    lr_ptr,  # *fp32 0-dim: lr_tensor, or 1.0 when lr is a float
    transform,  # elementwise.GradTransform: the gradient transform's arguments
    skip_ptr,  # *fp32 0-dim: non-zero means write nothing
    beta1: tl.float64,  # 1 - beta1 is the lerp weight of the update direction c
    beta2: tl.float64,  # 1 - beta2 is the lerp weight of the momentum
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
        m_ptr, m_scales = mt.moment_ptrs(row, EXP_AVG, S_DTYPE, ALIGNED, n)
        coeffs = _lion_coeffs(
            em.learning_rate(lr, lr_ptr), em.f64(beta1), em.f64(beta2), em.f64(weight_decay)
        )
        args = (weights, (m_ptr, m_scales), coeffs, em.grad_scalars(transform), MASTER)
        mt.for_each_block(_lion_block, args, start, n)


@device_fn
def _lion_coeffs(lr, beta1, beta2, weight_decay):
    """Lion's scalars in fp64, rounded once to fp32 (update_math.h's lion_coeffs)."""
    return (
        lr.to(tl.float32),
        (1.0 - beta1).to(tl.float32),  # one_minus_beta1
        (1.0 - beta2).to(tl.float32),  # one_minus_beta2
        (1.0 - lr * weight_decay).to(tl.float32),  # decay
    )


@device_fn
def _lion_block(args, offs, mask):
    """One block of Lion (update_math.h's lion_element)."""
    (p_ptr, g_ptr, w_ptr), (m_ptr, m_scales), coeffs, transform, MASTER = args
    lr, one_minus_beta1, one_minus_beta2, decay = coeffs
    g = em.transform_grad(em.load(g_ptr, offs, mask), transform)
    w = em.load_weight(p_ptr, w_ptr, offs, mask)
    m = em.load_moment(m_ptr, m_scales, offs, mask, True)
    c = em.lerp(m, g, one_minus_beta1)
    # sign(0) = 0, and a NaN stays NaN (as in update_math.h) so a non-finite
    # gradient without a norm pass is visible in the weights.
    update = tl.where(c > 0.0, 1.0, tl.where(c < 0.0, -1.0, c))
    w = w * decay - lr * update
    em.store_moment(m_ptr, m_scales, offs, em.lerp(m, g, one_minus_beta2), mask, True)
    em.store_weight(p_ptr, w_ptr, offs, w, mask, MASTER)
    return 0.0
