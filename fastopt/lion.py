"""fastopt.Lion: Lion (Chen et al. 2023) with clipping, loss scaling and master weights in the kernel.

Top to bottom: the class, then ``lion()``, the functional entry point every
backend shares (also ``fastopt.functional.lion``).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch import Tensor

from fastopt import _compressed, backends
from fastopt._base import FusedOptimizer, run_closure, validate_common

__all__ = ["Lion", "lion"]


class Lion(FusedOptimizer):
    r"""Lion, from "Symbolic Discovery of Optimization Algorithms" (Chen et al., 2023).

    .. math::
        c &= \beta_1 m + (1-\beta_1)\,g \\
        \theta &\gets \theta\,(1-\eta\lambda) - \eta\,\mathrm{sign}(c) \\
        m &\gets \beta_2 m + (1-\beta_2)\,g

    with :math:`\mathrm{sign}(0) = 0`. ``max_grad_norm``, ``max_grad_value``,
    loss scaling, ``master_weights`` (incl. ``"remainder"``), ``state_dtype`` and
    ``backend`` behave as in :class:`fastopt.AdamW`. Complex parameters raise ``TypeError``.
    """

    _moment_keys = ("exp_avg",)

    def __init__(
        self,
        params: Iterable[Tensor] | Iterable[dict[str, Any]] | Iterable[tuple[str, Tensor]],
        lr: float | Tensor = 1e-4,
        betas: tuple[float, float] = (0.9, 0.99),
        weight_decay: float = 0.0,
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
        validate_common(lr, weight_decay, betas, max_grad_norm, max_grad_value)
        defaults = dict(lr=lr, betas=betas, weight_decay=weight_decay, maximize=maximize,
                        capturable=capturable)  # fmt: skip
        super().__init__(
            params, defaults, max_grad_norm=max_grad_norm, max_grad_value=max_grad_value,
            master_weights=master_weights, backend=backend, process_group=process_group,
            state_dtype=state_dtype,
        )  # fmt: skip

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        super().add_param_group(param_group)
        try:
            for i, p in enumerate(self.param_groups[-1]["params"]):
                self.check_param(p, f"param_groups[{len(self.param_groups) - 1}]['params'][{i}]")
        except TypeError:
            self.param_groups.pop()  # a rejected group leaves the optimizer as it was
            raise

    def check_param(self, p: Tensor, where: str) -> None:
        if torch.is_complex(p):
            raise TypeError(f"fastopt.Lion does not support complex parameters ({where})")

    @torch.no_grad()
    def step(self, closure=None):
        """Perform one optimization step; returns the closure's loss if given."""
        loss = run_closure(closure)
        plan = self._plan_step()
        for group, bucket in plan.buckets:
            beta1, beta2 = group["betas"]
            with plan.updating(bucket):
                bucket.run("lion_", _STATE_LISTS, _op_args(
                    bucket.device, lr=group["lr"], beta1=beta1, beta2=beta2,
                    weight_decay=group["weight_decay"], maximize=group["maximize"],
                    **plan.transform_args,
                ))  # fmt: skip
        return loss


# The state lists of fastopt::lion_ after params and grads, as state keys.
_STATE_LISTS = ("exp_avg", "master_param")


def _op_args(
    device, *, lr, beta1, beta2, weight_decay, maximize, grad_mul, max_grad_value, clip_coef, skip,
) -> dict[str, Any]:  # fmt: skip
    """The keyword arguments of fastopt::lion_ for tensors on ``device``."""
    return dict(
        beta1=float(beta1), beta2=float(beta2),
        weight_decay=float(weight_decay), maximize=bool(maximize),
        **backends.op_scalars(device, lr, grad_mul, max_grad_value, clip_coef, skip),
    )  # fmt: skip


def lion(
    params: list[Tensor],
    grads: list[Tensor],
    exp_avgs: list[Tensor],
    master_params: list[Tensor] | None,
    *,
    lr: float | Tensor,
    beta1: float,
    beta2: float,
    weight_decay: float,
    maximize: bool,
    grad_mul: Tensor | None = None,
    max_grad_value: float | None = None,
    clip_coef: Tensor | None = None,
    skip: Tensor | None = None,
    backend: str = "auto",
) -> None:
    r"""Lion (Chen et al. 2023), in place:

    .. math::
        c = \beta_1 m + (1-\beta_1)\,g;\quad
        \theta \gets \theta\,(1-\eta\lambda) - \eta\,\mathrm{sign}(c);\quad
        m \gets \beta_2 m + (1-\beta_2)\,g

    with :math:`\mathrm{sign}(0) = 0` and a NaN kept a NaN.
    """
    if not params:
        return
    device = params[0].device
    impl = backends.resolve(backend, device, params[0].dtype, grads[0].dtype)
    remainders = _compressed.is_remainder(master_params)
    if remainders:  # NOTE [stale remainder] in fastopt/_compressed.py
        _compressed.reset_stale(params, master_params)
    impl.lion_(
        params, grads, exp_avgs, master_params or [],
        **_op_args(device, lr=lr, beta1=beta1, beta2=beta2, weight_decay=weight_decay,
                   maximize=maximize, grad_mul=grad_mul, max_grad_value=max_grad_value,
                   clip_coef=clip_coef, skip=skip),
    )  # fmt: skip
    if remainders:
        _compressed.mark_written(params, master_params)
