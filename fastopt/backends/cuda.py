"""The cuda backend: hand-written CUDA C++ kernels in the fastopt._C extension.

``torch.ops.fastopt.<op>`` dispatches CUDA tensors to csrc/cuda/ops_cuda.cpp,
which checks the lists and launches the multi-tensor kernels of csrc/cuda/*.cu
(see NOTE [multi-tensor chunking] in csrc/cuda/multi_tensor_apply.cuh). The
per-element arithmetic is the shared header csrc/include/fastopt/update_math.h.

Nothing here reads a device value on the host: ``lr`` given as a CUDA tensor,
``steps``, ``grad_scale`` and ``found_inf`` are passed to the kernels as device
addresses, so a step never synchronises with the GPU.
"""

from __future__ import annotations

import torch
from torch import Tensor

from fastopt import _ops
from fastopt.backends import reference
from fastopt.backends.cpu import _KERNEL_DTYPES, kernel_dtypes_or_reference


def available() -> str | None:
    try:
        from fastopt import _build_info
    except ImportError:
        return "the fastopt._C extension is not built (no fastopt/_build_info.py)"
    if not _build_info.WITH_CUDA:
        return f"built without CUDA kernels: {_build_info.CUDA_REASON}"
    if _ops.LOAD_ERROR is not None:
        return _ops.LOAD_ERROR
    if not torch.cuda.is_available():
        return "no CUDA device"
    return None


def supports(device: torch.device) -> bool:
    return torch.device(device).type == "cuda"


def _lr_args(lr: float | Tensor, device: torch.device) -> tuple[float, Tensor | None]:
    """(float lr, lr_tensor) for the op: a CUDA tensor stays on the device."""
    if isinstance(lr, Tensor):
        if lr.device.type == "cuda":
            return 0.0, lr.to(device=device, dtype=torch.float32)
        return float(lr.item()), None  # a CPU tensor: reading it does not sync the GPU
    return float(lr), None


def _scalar_arg(t: Tensor | None, device: torch.device) -> Tensor | None:
    return None if t is None else t.to(device=device, dtype=torch.float32, non_blocking=True)


def _op_scalars(
    params: list[Tensor], lr: float | Tensor, grad_scale: Tensor | None, found_inf: Tensor | None
) -> tuple[float, Tensor | None, Tensor | None, Tensor | None]:
    """(lr, lr_tensor, grad_scale, found_inf) as the adamw_/lion_ ops take them, on params' device."""
    device = params[0].device
    lr_float, lr_tensor = _lr_args(lr, device)
    return lr_float, lr_tensor, _scalar_arg(grad_scale, device), _scalar_arg(found_inf, device)


def grad_sumsq(grads: list[Tensor]) -> Tensor:
    """Sum of squares of every element of every tensor (float32 0-dim, on the device).

    Deterministic: per-block partial sums, then one fixed-order reduction
    (NOTE [deterministic norm] in csrc/cuda/grad_sumsq.cu).
    """
    if not grads:
        return torch.zeros((), dtype=torch.float32)
    ours = [g for g in grads if g.dtype in _KERNEL_DTYPES]
    others = [g for g in grads if g.dtype not in _KERNEL_DTYPES]
    with torch.no_grad():
        if not others:
            return torch.ops.fastopt.grad_sumsq.default(ours)
        total = reference.grad_sumsq(others)
        if ours:
            total = total + torch.ops.fastopt.grad_sumsq.default(ours)
        return total


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
    """In-place AdamW (SPEC §2) over all tensors in a few kernel launches.

    The math is the reference's (fastopt.backends.reference.adamw_); float64
    params go to it (``kernel_dtypes_or_reference``).
    """
    with torch.no_grad():
        lr, lr_tensor, grad_scale, found_inf = _op_scalars(params, lr, grad_scale, found_inf)
        torch.ops.fastopt.adamw_.default(
            params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs if amsgrad else [],
            master_params, steps, lr, lr_tensor, beta1, beta2, eps, weight_decay,
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
    """In-place Lion (SPEC §2) over all tensors in a few kernel launches.

    The math is the reference's (fastopt.backends.reference.lion_); float64
    params go to it (``kernel_dtypes_or_reference``).
    """
    with torch.no_grad():
        lr, lr_tensor, grad_scale, found_inf = _op_scalars(params, lr, grad_scale, found_inf)
        torch.ops.fastopt.lion_.default(
            params, grads, exp_avgs, master_params, lr, lr_tensor, beta1, beta2,
            weight_decay, maximize, grad_scale, found_inf,
        )  # fmt: skip
