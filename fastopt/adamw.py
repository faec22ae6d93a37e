"""fastopt.AdamW: torch's AdamW with clipping, loss scaling and master weights in the kernel."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from torch import Tensor

from fastopt._base import FusedOptimizer, _validate_common

__all__ = ["AdamW", "adamw"]


class AdamW(FusedOptimizer):
    r"""Drop-in replacement for :class:`torch.optim.AdamW`.

    For each parameter :math:`\theta` with gradient :math:`g` (multiplied by
    the loss-scale reciprocal and the global-norm clip coefficient when those
    are in use, and negated when ``maximize``):

    .. math::
        t &\gets t + 1,\qquad \theta \gets \theta\,(1 - \eta\lambda) \\
        m &\gets \beta_1 m + (1-\beta_1)\,g,\qquad v \gets \beta_2 v + (1-\beta_2)\,g^2 \\
        \hat v &\gets \max(\hat v, v)\ \text{(amsgrad)},\ \text{else}\ \hat v = v \\
        \theta &\gets \theta - \frac{\eta}{1-\beta_1^t}\cdot
            \frac{m}{\sqrt{\hat v}/\sqrt{1-\beta_2^t} + \epsilon}

    Extra keyword arguments:
        max_grad_norm: clip by the global L2 norm N of all gradients of all
            groups: every gradient is scaled by ``min(1, c / (N + 1e-6))``
            inside the update; ``.grad`` is never rewritten. ``last_grad_norm``
            holds N. A non-finite N skips the whole step.
        master_weights: bf16/fp16 parameters get an fp32 ``master_param`` and
            fp32 moments; the parameter is the master rounded to nearest even.
        backend: ``"auto"``, ``"reference"``, ``"cpu"``, ``"triton"`` or ``"cuda"``.

    ``foreach``, ``fused`` and ``capturable`` are accepted for compatibility;
    the kernel is chosen by ``backend``.
    """

    def __init__(
        self,
        params: Iterable[Tensor] | Iterable[dict[str, Any]] | Iterable[tuple[str, Tensor]],
        lr: float | Tensor = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 1e-2,
        amsgrad: bool = False,
        *,
        maximize: bool = False,
        foreach: bool | None = None,
        capturable: bool = False,
        differentiable: bool = False,
        fused: bool | None = None,
        max_grad_norm: float | None = None,
        master_weights: bool = False,
        backend: str = "auto",
    ) -> None:
        if differentiable:
            raise NotImplementedError(
                "fastopt.AdamW does not support differentiable=True; use torch.optim.AdamW"
            )
        if fused and foreach:
            raise RuntimeError("`fused` and `foreach` cannot be `True` together.")
        _validate_common(lr, weight_decay, betas, max_grad_norm)
        if not 0.0 <= eps:
            raise ValueError(f"Invalid epsilon value: {eps}")
        defaults = dict(
            lr=lr,
            betas=betas,
            eps=eps,
            weight_decay=weight_decay,
            amsgrad=amsgrad,
            maximize=maximize,
            foreach=foreach,
            capturable=capturable,
            differentiable=differentiable,
            fused=fused,
            decoupled_weight_decay=True,
        )
        super().__init__(
            params,
            defaults,
            max_grad_norm=max_grad_norm,
            master_weights=master_weights,
            backend=backend,
        )

    _moment_keys = ("exp_avg", "exp_avg_sq")

    def _required_state_keys(self, group: dict[str, Any]) -> tuple[str, ...]:
        if group["amsgrad"]:
            return ("exp_avg", "exp_avg_sq", "max_exp_avg_sq")
        return self._moment_keys

    def _update(self, group, bucket, grad_mul, skip) -> None:
        beta1, beta2 = group["betas"]
        amsgrad = bool(group["amsgrad"])
        adamw(
            bucket,
            lr=self._group_lr(group, bucket.params[0].device),
            beta1=float(beta1),
            beta2=float(beta2),
            eps=float(group["eps"]),
            weight_decay=float(group["weight_decay"]),
            amsgrad=amsgrad,
            maximize=bool(group["maximize"]),
            grad_scale=grad_mul,
            found_inf=skip,
        )


def adamw(bucket, *, lr, beta1, beta2, eps, weight_decay, amsgrad, maximize, grad_scale, found_inf):
    """Functional AdamW over one gathered bucket: the entry point every backend shares."""
    states = bucket.states
    bucket.backend.adamw_(
        bucket.params,
        bucket.grads,
        states["exp_avg"],
        states["exp_avg_sq"],
        states["max_exp_avg_sq"] if amsgrad else [],
        states["master_param"] if "master_param" in states else [],
        bucket.steps,
        lr=lr,
        beta1=beta1,
        beta2=beta2,
        eps=eps,
        weight_decay=weight_decay,
        amsgrad=amsgrad,
        maximize=maximize,
        grad_scale=grad_scale,
        found_inf=found_inf,
    )
