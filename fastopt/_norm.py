"""The global-norm pass: from the gradients' sums of squares to the gradient transform.

:func:`grad_transform` is a pure function of device-side 0-dim tensors: no
host reads, so on a GPU the whole decision stays on the device (NOTE [no host
sync in step] in fastopt/_base.py). Sharded training extends it through
``reduce``, which turns local sums of squares into global ones.

SPEC §3, in order: unscale (``1 / grad_scale``), clamp by value
(``max_grad_value``), the L2 norm N of the clamped gradients, the clip
coefficient ``min(1, max_grad_norm / (N + 1e-6))``; a non-finite N or the
scaler's ``found_inf`` is the skip flag.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from fastopt import backends


@dataclass(frozen=True)
class GradTransform:
    """What every update kernel of one step reads (NOTE [gradient transform] in update_math.h)."""

    grad_mul: Tensor | None = None  # multiplies each gradient before the clamp
    max_grad_value: float | None = None  # the clamp bound
    clip_coef: Tensor | None = None  # multiplies after the clamp (None: folded into grad_mul)
    skip: Tensor | None = None  # non-zero: nothing is written
    norm: Tensor | None = None  # N, for ``last_grad_norm``


def needs_norm(max_grad_norm: float | None, grad_scale: Tensor | None, found_inf: Tensor | None) -> bool:
    """Whether a step computes N: clipping by norm or loss scaling (SPEC §3)."""
    return max_grad_norm is not None or grad_scale is not None or found_inf is not None


def inverse_scale(grad_scale: Tensor | None, device: torch.device) -> Tensor | None:
    """1 / grad_scale as float32 on ``device``; the reciprocal in double, as torch's
    GradScaler computes inv_scale."""
    if grad_scale is None:
        return None
    return grad_scale.to(device).double().reciprocal().float()


def grad_transform(
    sumsqs: list[tuple[object, Tensor]],
    *,
    inv_scale: Tensor | None,
    max_grad_norm: float | None,
    max_grad_value: float | None,
    found_inf: Tensor | None,
    reduce: Callable | None = None,
) -> GradTransform:
    """The step's gradient transform from per-bucket sums of squares of the unscaled,
    value-clamped gradients (``grad_sumsq`` with ``grad_mul=inv_scale``), each
    tagged with its reduction domain (None: this process only).

    ``reduce(per_domain, found, device) -> (total, found)`` turns local float64
    sums into global ones (NOTE [global norm over shards] in
    fastopt/_distributed.py); it is called once, when any domain is not None.
    """
    # Reduce on an accelerator when there is one; a copy to the CPU is never
    # non_blocking (the host would read it before it lands).
    tensors = [t for _, t in sumsqs]
    device = next((t.device for t in tensors if t.device.type != "cpu"), tensors[0].device)
    nb = device.type != "cpu"
    per_domain = [(d, t.to(device, non_blocking=nb).double()) for d, t in sumsqs]
    found = None if found_inf is None else (found_inf.to(device) != 0).double()
    if reduce is not None and any(d is not None for d, _ in per_domain):
        total, found = reduce(per_domain, found, device)
    else:
        total = torch.stack([t for _, t in per_domain]).sum()
    norm = total.sqrt().float()
    skip = (~torch.isfinite(norm)).float()
    if found is not None:
        skip = torch.maximum(skip, (found != 0).float())
    coef = None
    if max_grad_norm is not None:
        coef = (max_grad_norm / (norm + 1e-6)).clamp(max=1.0)
    if max_grad_value is None and coef is not None:
        # No clamp between them: fold the clip coefficient into the multiplier.
        grad_mul = coef if inv_scale is None else inv_scale.to(device) * coef
        coef = None
    else:
        grad_mul = None if inv_scale is None else inv_scale.to(device)
    return GradTransform(grad_mul, max_grad_value, coef, skip, norm)


def grad_sumsq(
    grads: list[Tensor],
    *,
    grad_mul: Tensor | None = None,
    max_grad_value: float | None = None,
    backend: str = "auto",
) -> Tensor:
    r""":math:`\sum_i \sum_j \mathrm{clamp}(g_{ij} \cdot \text{grad\_mul}, -c, c)^2` over
    gradients of one device, as a float32 0-dim tensor on that device (accumulated in
    double on the CPU). The global-norm pass of the optimizers (fastopt/_norm.py)."""
    if not grads:
        return torch.zeros((), dtype=torch.float32)
    device = grads[0].device
    impl = backends.resolve(backend, device, grads[0].dtype, grads[0].dtype)
    return impl.grad_sumsq(
        grads,
        grad_mul=backends._device_scalar(grad_mul, device),
        max_grad_value=None if max_grad_value is None else float(max_grad_value),
    )
