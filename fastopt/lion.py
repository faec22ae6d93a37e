"""fastopt.Lion: Lion (Chen et al. 2023) with clipping, loss scaling and master weights in the kernel."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch import Tensor

from fastopt._base import FusedOptimizer, _validate_common

__all__ = ["Lion", "lion"]


class Lion(FusedOptimizer):
    r"""Lion, from "Symbolic Discovery of Optimization Algorithms" (Chen et al., 2023).

    .. math::
        c &= \beta_1 m + (1-\beta_1)\,g \\
        \theta &\gets \theta\,(1-\eta\lambda) - \eta\,\mathrm{sign}(c) \\
        m &\gets \beta_2 m + (1-\beta_2)\,g

    with :math:`\mathrm{sign}(0) = 0`. ``max_grad_norm``, loss scaling,
    ``master_weights`` and ``backend`` behave as in :class:`fastopt.AdamW`.
    Complex parameters raise ``TypeError``.
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
        max_grad_norm: float | None = None,
        master_weights: bool = False,
        backend: str = "auto",
    ) -> None:
        _validate_common(lr, weight_decay, betas, max_grad_norm)
        defaults = dict(lr=lr, betas=betas, weight_decay=weight_decay, maximize=maximize)
        super().__init__(
            params,
            defaults,
            max_grad_norm=max_grad_norm,
            master_weights=master_weights,
            backend=backend,
        )

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        super().add_param_group(param_group)
        try:
            for i, p in enumerate(self.param_groups[-1]["params"]):
                self._check_param(p, f"param_groups[{len(self.param_groups) - 1}]['params'][{i}]")
        except TypeError:
            self.param_groups.pop()  # a rejected group leaves the optimizer as it was
            raise

    def _check_param(self, p: Tensor, where: str) -> None:
        if torch.is_complex(p):
            raise TypeError(f"fastopt.Lion does not support complex parameters ({where})")

    def _update(self, group, bucket, grad_mul, skip) -> None:
        beta1, beta2 = group["betas"]
        lion(
            bucket,
            lr=self._group_lr(group, bucket.params[0].device),
            beta1=float(beta1),
            beta2=float(beta2),
            weight_decay=float(group["weight_decay"]),
            maximize=bool(group["maximize"]),
            grad_scale=grad_mul,
            found_inf=skip,
        )


def lion(bucket, *, lr, beta1, beta2, weight_decay, maximize, grad_scale, found_inf):
    """Functional Lion over one gathered bucket: the entry point every backend shares."""
    states = bucket.states
    bucket.backend.lion_(
        bucket.params,
        bucket.grads,
        states["exp_avg"],
        states["master_param"] if "master_param" in states else [],
        lr=lr,
        beta1=beta1,
        beta2=beta2,
        weight_decay=weight_decay,
        maximize=maximize,
        grad_scale=grad_scale,
        found_inf=found_inf,
    )
