"""fastopt.AdEMAMix: AdEMAMix (Pagliardini et al. 2024) as a fused multi-tensor optimizer.

AdEMAMix adds to Adam a second, slow EMA of the gradient (beta3 close to 1)
mixed into the numerator with weight alpha, so that very old gradients keep
contributing ("The AdEMAMix Optimizer: Better, Faster, Older", arXiv
2409.03137, Algorithm 1). Both alpha and beta3 can be warmed up (``t_alpha``,
``t_beta3``), as the paper recommends for large beta3.

Top to bottom: the class, then ``ademamix()``, the functional entry point every
backend shares (also ``fastopt.functional.ademamix``).

State per parameter: ``step`` (float32 0-dim), ``exp_avg`` (the fast EMA m1),
``exp_avg_slow`` (the slow EMA m2), ``exp_avg_sq`` (v), and ``master_param``
with master weights.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

import torch
from torch import Tensor

from fastopt import _compressed, backends
from fastopt._base import FusedOptimizer, run_closure, validate_common

__all__ = ["AdEMAMix", "ademamix"]


def _check_warmup(name: str, value: Any) -> None:
    if value is None:
        return
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"{name} must be a positive number of steps or None, got {value!r}")
    if value <= 0:
        raise ValueError(f"{name} must be positive, got {value}")


class AdEMAMix(FusedOptimizer):
    r"""AdEMAMix (Pagliardini et al. 2024, Algorithm 1), with clipping, loss scaling
    and master weights in the kernel.

    .. math::
        \alpha_t &= \min(t\alpha/T_\alpha,\ \alpha),\qquad
        \beta_{3,t} = \min\!\left(\exp\frac{\ln\beta_1\,\ln\beta_3}
            {(1-t/T_{\beta_3})\ln\beta_3 + (t/T_{\beta_3})\ln\beta_1},\ \beta_3\right) \\
        m_1 &\gets \beta_1 m_1 + (1-\beta_1) g,\quad
        m_2 \gets \beta_{3,t} m_2 + (1-\beta_{3,t}) g,\quad
        v \gets \beta_2 v + (1-\beta_2) g^2 \\
        \theta &\gets \theta - \eta\left(\frac{m_1/(1-\beta_1^t) + \alpha_t m_2}
            {\sqrt{v/(1-\beta_2^t)} + \epsilon} + \lambda\theta\right)

    ``t_alpha`` / ``t_beta3`` None: no warm-up. ``max_grad_norm``,
    ``max_grad_value``, loss scaling, ``master_weights`` (incl. ``"remainder"``),
    ``state_dtype`` and ``backend`` behave as in :class:`fastopt.AdamW`.
    """

    _moment_keys = ("exp_avg", "exp_avg_slow", "exp_avg_sq")

    def __init__(
        self,
        params: Iterable[Tensor] | Iterable[dict[str, Any]] | Iterable[tuple[str, Tensor]],
        lr: float | Tensor = 1e-3,
        betas: tuple[float, float, float] = (0.9, 0.999, 0.9999),
        alpha: float = 5.0,
        t_alpha: int | None = None,
        t_beta3: int | None = None,
        eps: float = 1e-8,
        weight_decay: float = 1e-2,
        *,
        maximize: bool = False,
        capturable: bool = False,
        max_grad_norm: float | None = None,
        max_grad_value: float | None = None,
        master_weights: bool | str = False,
        backend: str = "auto",
        process_group=None,
        state_dtype: torch.dtype | str | None = None,
    ) -> None:
        validate_common(lr, weight_decay, betas, max_grad_norm, max_grad_value, n_betas=3)
        if not 0.0 <= eps:
            raise ValueError(f"Invalid epsilon value: {eps}")
        if not (isinstance(alpha, (int, float)) and math.isfinite(alpha) and alpha >= 0):
            raise ValueError(f"Invalid alpha value: {alpha}")
        _check_warmup("t_alpha", t_alpha)
        _check_warmup("t_beta3", t_beta3)
        if t_beta3 is not None and float(betas[0]) == 0.0:
            raise ValueError("t_beta3 needs beta1 > 0 (the beta3 scheduler takes ln(beta1))")
        defaults = dict(
            lr=lr, betas=betas, alpha=alpha, t_alpha=t_alpha, t_beta3=t_beta3, eps=eps,
            weight_decay=weight_decay, maximize=maximize, capturable=capturable,
        )  # fmt: skip
        super().__init__(
            params, defaults, max_grad_norm=max_grad_norm, max_grad_value=max_grad_value,
            master_weights=master_weights, backend=backend, process_group=process_group,
            state_dtype=state_dtype,
        )  # fmt: skip

    @torch.no_grad()
    def step(self, closure=None):
        """Perform one optimization step; returns the closure's loss if given."""
        loss = run_closure(closure)
        plan = self._plan_step()
        for group, bucket in plan.buckets:
            beta1, beta2, beta3 = group["betas"]
            with plan.updating(bucket):
                bucket.run("ademamix_", _STATE_LISTS, _op_args(
                    bucket.device, lr=group["lr"], beta1=beta1, beta2=beta2, beta3=beta3,
                    alpha=group["alpha"], t_alpha=group["t_alpha"], t_beta3=group["t_beta3"],
                    eps=group["eps"], weight_decay=group["weight_decay"],
                    maximize=group["maximize"], **plan.transform_args,
                ))  # fmt: skip
        return loss


# The state lists of fastopt::ademamix_ after params and grads, as state keys.
_STATE_LISTS = ("exp_avg", "exp_avg_slow", "exp_avg_sq", "master_param", "step")


def _op_args(
    device, *, lr, beta1, beta2, beta3, alpha, t_alpha, t_beta3, eps, weight_decay, maximize,
    grad_mul, max_grad_value, clip_coef, skip,
) -> dict[str, Any]:  # fmt: skip
    """The keyword arguments of fastopt::ademamix_ for tensors on ``device``."""
    return dict(
        beta1=float(beta1), beta2=float(beta2), beta3=float(beta3), alpha=float(alpha),
        t_alpha=None if t_alpha is None else float(t_alpha),
        t_beta3=None if t_beta3 is None else float(t_beta3),
        eps=float(eps), weight_decay=float(weight_decay), maximize=bool(maximize),
        **backends.op_scalars(device, lr, grad_mul, max_grad_value, clip_coef, skip),
    )  # fmt: skip


def ademamix(
    params: list[Tensor],
    grads: list[Tensor],
    exp_avgs: list[Tensor],
    exp_avgs_slow: list[Tensor],
    exp_avg_sqs: list[Tensor],
    master_params: list[Tensor] | None,
    state_steps: list[Tensor],
    *,
    lr: float | Tensor,
    beta1: float,
    beta2: float,
    beta3: float,
    alpha: float,
    t_alpha: float | None,
    t_beta3: float | None,
    eps: float,
    weight_decay: float,
    maximize: bool,
    grad_mul: Tensor | None = None,
    max_grad_value: float | None = None,
    clip_coef: Tensor | None = None,
    skip: Tensor | None = None,
    backend: str = "auto",
) -> None:
    r"""AdEMAMix (Pagliardini et al. 2024, arXiv 2409.03137, Algorithm 1), in place:

    .. math::
        \alpha_t &= \min(t\alpha/T_\alpha,\ \alpha),\qquad
        \beta_{3,t} = \min\!\left(\exp\frac{\ln\beta_1\,\ln\beta_3}
            {(1-t/T_{\beta_3})\ln\beta_3 + (t/T_{\beta_3})\ln\beta_1},\ \beta_3\right) \\
        m_1 &\gets \beta_1 m_1 + (1-\beta_1) g,\quad
        m_2 \gets \beta_{3,t} m_2 + (1-\beta_{3,t}) g,\quad
        v \gets \beta_2 v + (1-\beta_2) g^2 \\
        \theta &\gets \theta - \eta\left(\frac{m_1/(1-\beta_1^t) + \alpha_t m_2}
            {\sqrt{v/(1-\beta_2^t)} + \epsilon} + \lambda\theta\right)

    ``t_alpha`` / ``t_beta3`` None: no warm-up (:math:`\alpha_t = \alpha`,
    :math:`\beta_{3,t} = \beta_3`). ``exp_avgs`` is :math:`m_1`, ``exp_avgs_slow``
    :math:`m_2`.
    """
    if not params:
        return
    device = params[0].device
    impl = backends.resolve(backend, device, params[0].dtype, grads[0].dtype)
    remainders = _compressed.is_remainder(master_params)
    if remainders:  # NOTE [stale remainder] in fastopt/_compressed.py
        _compressed.reset_stale(params, master_params)
    impl.ademamix_(
        params, grads, exp_avgs, exp_avgs_slow, exp_avg_sqs, master_params or [],
        state_steps,
        **_op_args(device, lr=lr, beta1=beta1, beta2=beta2, beta3=beta3, alpha=alpha,
                   t_alpha=t_alpha, t_beta3=t_beta3, eps=eps, weight_decay=weight_decay,
                   maximize=maximize, grad_mul=grad_mul, max_grad_value=max_grad_value,
                   clip_coef=clip_coef, skip=skip),
    )  # fmt: skip
    if remainders:
        _compressed.mark_written(params, master_params)
