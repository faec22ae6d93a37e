"""The cpu backend: the C++ extension's multi-threaded, vectorized kernels.

One call runs one parallel region over all tensors of a (device, dtype) group
(csrc/cpu/ops_cpu.cpp; NOTE [multi-tensor chunking] in csrc/cpu/multi_tensor.h).
The per-element math is csrc/include/fastopt/update_math.h, the same as the
CUDA kernels'. Storage dtypes the kernels do not handle (float64) go to the
reference backend, which computes them the same way.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import torch
from torch import Tensor

from fastopt import _ops
from fastopt.backends import reference

_KERNEL_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def kernel_dtypes_or_reference(update: Callable[..., None]) -> Callable[..., None]:
    """Wrap a kernel backend's ``adamw_``/``lion_``: nothing for an empty group,
    the reference backend's same-named update for a param dtype the compiled
    kernels lack (float64), else ``update`` itself. Shared by the cpu and cuda
    backends; the wrapper keeps ``update``'s name and signature.
    """
    fallback = getattr(reference, update.__name__)

    @functools.wraps(update)
    def guarded(params: list[Tensor], *args, **kwargs) -> None:
        if not params:
            return
        if params[0].dtype not in _KERNEL_DTYPES:
            fallback(params, *args, **kwargs)
            return
        update(params, *args, **kwargs)

    return guarded


def available() -> str | None:
    return _ops.LOAD_ERROR


def supports(device: torch.device) -> bool:
    return torch.device(device).type == "cpu"


def _lr_args(lr: float | Tensor) -> tuple[float, Tensor | None]:
    if isinstance(lr, Tensor):
        return 0.0, lr.detach().to(device="cpu", dtype=torch.float32)
    return float(lr), None


def grad_sumsq(grads: list[Tensor]) -> Tensor:
    """Sum of squares of all elements (accumulated in float64), as a float32 0-dim tensor."""
    if not grads:
        return torch.zeros((), dtype=torch.float32)
    with torch.no_grad():
        # step() runs under no_grad: the grads go in as they are (a detach per
        # tensor would cost more than summing a small one).
        return torch.ops.fastopt.grad_sumsq.default(grads)


@kernel_dtypes_or_reference
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
    """In-place AdamW over lists of tensors; see fastopt.backends.reference.adamw_."""
    lr_value, lr_tensor = _lr_args(lr)
    with torch.no_grad():
        torch.ops.fastopt.adamw_.default(
            params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs if amsgrad else [],
            master_params, steps, lr_value, lr_tensor, beta1, beta2, eps, weight_decay,
            amsgrad, maximize, grad_scale, found_inf,
        )  # fmt: skip


@kernel_dtypes_or_reference
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
    """In-place Lion over lists of tensors; see fastopt.backends.reference.lion_."""
    lr_value, lr_tensor = _lr_args(lr)
    with torch.no_grad():
        torch.ops.fastopt.lion_.default(
            params, grads, exp_avgs, master_params, lr_value, lr_tensor, beta1, beta2,
            weight_decay, maximize, grad_scale, found_inf,
        )  # fmt: skip


def steps_add_(steps: list[Tensor], value: float) -> None:
    """steps[i] += value in one call (see NOTE [step counters] in fastopt/_base.py)."""
    if steps:
        torch.ops.fastopt.steps_add_(steps, float(value))
