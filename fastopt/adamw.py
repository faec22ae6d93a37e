"""fastopt.AdamW: torch's AdamW with clipping, loss scaling and master weights in the kernel.

Top to bottom: the class (validation, defaults, state keys, ``step()`` that
gathers lists), then ``adamw()``, the functional entry point every backend
shares (also ``fastopt.functional.adamw``).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch import Tensor

from fastopt import _compressed, backends
from fastopt._base import FusedOptimizer, run_closure, validate_common

__all__ = ["AdamW", "adamw"]


class AdamW(FusedOptimizer):
    r"""Drop-in replacement for :class:`torch.optim.AdamW`.

    For each parameter :math:`\theta` with gradient :math:`g` (unscaled,
    clamped by ``max_grad_value``, scaled by the global-norm clip coefficient
    and negated when ``maximize``; SPEC §3):

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
        max_grad_value: clamp every gradient element to ``[-c, c]`` inside the
            update (before the norm is taken, as ``clip_grad_value_`` then
            ``clip_grad_norm_`` would).
        master_weights: ``True``: bf16/fp16 parameters get an fp32 ``master_param``
            and fp32 moments; the parameter is the master rounded to nearest even.
            ``"remainder"``: a bf16 parameter gets an int16 ``master_remainder``
            instead, and parameter plus remainder hold the same fp32 master
            exactly; the parameter is then the master rounded to nearest, ties
            away from zero (NOTE [master remainder]; fp16 parameters keep an fp32
            master). A parameter overwritten from outside resets its remainder
            (NOTE [stale remainder] in fastopt/_compressed.py).
        state_dtype: storage of the moments: None (fp32 with master weights or
            fp32 params, else the param dtype), ``torch.float32``,
            ``torch.bfloat16`` (rounded to nearest even on every store) or
            ``"int8"``: 8-bit companded codes in blocks of 256 with an fp32 scale
            per block, about 1.016 bytes per element, for tensors of 4096
            elements or more (smaller ones keep fp32; NOTE [int8 moments]). Not
            with ``amsgrad``.
        backend: ``"auto"``, ``"reference"``, ``"cpu"``, ``"triton"`` or ``"cuda"``.

    ``foreach`` and ``fused`` are accepted for compatibility; the kernel is
    chosen by ``backend``. ``capturable=True``: the step never reads a device
    value on the host (the skip decision stays a tensor), so it can be captured
    in a CUDA graph. A tensor ``lr`` stays on the device; under torch.compile it
    is what lets a scheduler move lr without a recompile.
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
        max_grad_value: float | None = None,
        master_weights: bool | str = False,
        backend: str = "auto",
        process_group=None,
        state_dtype: torch.dtype | str | None = None,
    ) -> None:
        if differentiable:
            raise NotImplementedError(
                "fastopt.AdamW does not support differentiable=True; use torch.optim.AdamW"
            )
        if fused and foreach:
            raise RuntimeError("`fused` and `foreach` cannot be `True` together.")
        validate_common(lr, weight_decay, betas, max_grad_norm, max_grad_value)
        if not 0.0 <= eps:
            raise ValueError(f"Invalid epsilon value: {eps}")
        if amsgrad and isinstance(state_dtype, str) and state_dtype == "int8":
            raise ValueError(
                "amsgrad is not supported with state_dtype='int8': the running maximum "
                "would be re-rounded every step; use bf16 or fp32 moments"
            )
        defaults = dict(
            lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, amsgrad=amsgrad,
            maximize=maximize, foreach=foreach, capturable=capturable,
            differentiable=differentiable, fused=fused, decoupled_weight_decay=True,
        )  # fmt: skip
        super().__init__(
            params, defaults, max_grad_norm=max_grad_norm, max_grad_value=max_grad_value,
            master_weights=master_weights, backend=backend, process_group=process_group,
            state_dtype=state_dtype,
        )  # fmt: skip

    _moment_keys = ("exp_avg", "exp_avg_sq")

    def state_keys(self, group: dict[str, Any]) -> tuple[str, ...]:
        if group["amsgrad"]:
            return ("exp_avg", "exp_avg_sq", "max_exp_avg_sq")
        return self._moment_keys

    @torch.no_grad()
    def step(self, closure=None):
        """Perform one optimization step; returns the closure's loss if given."""
        loss = run_closure(closure)
        plan = self._plan_step()
        for group, bucket in plan.buckets:
            beta1, beta2 = group["betas"]
            with plan.updating(bucket):
                bucket.run("adamw_", _STATE_LISTS, _op_args(
                    bucket.device, lr=group["lr"], beta1=beta1, beta2=beta2, eps=group["eps"],
                    weight_decay=group["weight_decay"], amsgrad=group["amsgrad"],
                    maximize=group["maximize"], **plan.transform_args,
                ))  # fmt: skip
        return loss


# The state lists of fastopt::adamw_ after params and grads, as state keys (NOTE
# [persistent step plan] in csrc/plan.cpp: the bucket or its C++ plan supplies them).
_STATE_LISTS = ("exp_avg", "exp_avg_sq", "max_exp_avg_sq", "master_param", "step")


def _op_args(
    device, *, lr, beta1, beta2, eps, weight_decay, amsgrad, maximize, grad_mul, max_grad_value,
    clip_coef, skip,
) -> dict[str, Any]:  # fmt: skip
    """The keyword arguments of fastopt::adamw_ for tensors on ``device``."""
    return dict(
        beta1=float(beta1), beta2=float(beta2), eps=float(eps),
        weight_decay=float(weight_decay), amsgrad=bool(amsgrad), maximize=bool(maximize),
        **backends.op_scalars(device, lr, grad_mul, max_grad_value, clip_coef, skip),
    )  # fmt: skip


def adamw(
    params: list[Tensor],
    grads: list[Tensor],
    exp_avgs: list[Tensor],
    exp_avg_sqs: list[Tensor],
    max_exp_avg_sqs: list[Tensor] | None,
    master_params: list[Tensor] | None,
    state_steps: list[Tensor],
    *,
    lr: float | Tensor,
    beta1: float,
    beta2: float,
    eps: float,
    weight_decay: float,
    amsgrad: bool,
    maximize: bool,
    grad_mul: Tensor | None = None,
    max_grad_value: float | None = None,
    clip_coef: Tensor | None = None,
    skip: Tensor | None = None,
    backend: str = "auto",
) -> None:
    r"""AdamW (SPEC §2), in place. For every tensor, with its own step ``t``:

    .. math::
        \theta &\gets \theta\,(1 - \eta\lambda) \\
        m &\gets \beta_1 m + (1-\beta_1)\,g,\qquad v \gets \beta_2 v + (1-\beta_2)\,g^2 \\
        \hat v &\gets \max(\hat v, v)\ \text{(amsgrad)},\ \text{else}\ \hat v = v \\
        \theta &\gets \theta - \frac{\eta}{1-\beta_1^t}\cdot
            \frac{m}{\sqrt{\hat v}/\sqrt{1-\beta_2^t} + \epsilon}

    ``max_exp_avg_sqs`` holds :math:`\hat v` when ``amsgrad`` (else empty or None).
    """
    if not params:
        return
    device = params[0].device
    impl = backends.resolve(backend, device, params[0].dtype, grads[0].dtype)
    remainders = _compressed.is_remainder(master_params)
    if remainders:  # NOTE [stale remainder] in fastopt/_compressed.py
        _compressed.reset_stale(params, master_params)
    impl.adamw_(
        params, grads, exp_avgs, exp_avg_sqs, (max_exp_avg_sqs or []) if amsgrad else [],
        master_params or [], state_steps,
        **_op_args(device, lr=lr, beta1=beta1, beta2=beta2, eps=eps, weight_decay=weight_decay,
                   amsgrad=amsgrad, maximize=maximize, grad_mul=grad_mul,
                   max_grad_value=max_grad_value, clip_coef=clip_coef, skip=skip),
    )  # fmt: skip
    if remainders:
        _compressed.mark_written(params, master_params)
