"""Backend resolution: the one place that maps ``backend=`` to kernels.

Every backend is a module exposing three functions over *lists* of tensors that
share one device (the optimizer gathers them per (device, dtype) group):

``grad_sumsq(grads) -> Tensor``
    Sum of squares of every element of every tensor, as a float32 0-dim tensor
    on the tensors' device. Complex tensors arrive as real views.

``adamw_(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, master_params,
steps, *, lr, beta1, beta2, eps, weight_decay, amsgrad, maximize, grad_scale,
found_inf) -> None``
    In-place AdamW (SPEC §2). ``max_exp_avg_sqs`` is empty unless amsgrad;
    ``master_params`` is empty unless master weights are on, in which case
    ``params`` are bf16/fp16, the states are fp32 and the parameter is written
    as the master rounded to nearest even. ``steps`` are float32 0-dim tensors
    already incremented for this step. ``lr`` is a float or a 0-dim tensor.
    ``grad_scale`` (None or float32 0-dim) multiplies every gradient element
    (loss-scale unscaling and clipping folded together); ``found_inf`` (None
    or float32 0-dim): when non-zero nothing at all is written.

``lion_(params, grads, exp_avgs, master_params, *, lr, beta1, beta2,
weight_decay, maximize, grad_scale, found_inf) -> None``
    In-place Lion, same conventions.

``available() -> str | None``
    None when the backend can run here, otherwise the reason it cannot.

``supports(device) -> bool``
    Whether the backend runs tensors of that device.

Non-contiguous tensors never reach the compiled backends: the optimizer sends
them to ``reference`` (see NOTE [contiguous fast path] in fastopt/_base.py).
"""

from __future__ import annotations

import importlib
from types import ModuleType

import torch

BACKENDS = ("reference", "cpu", "triton", "cuda")
_AUTO_ORDER = {"cuda": ("cuda", "triton", "reference"), "cpu": ("cpu", "reference")}
_modules: dict[str, ModuleType] = {}


def _module(name: str) -> ModuleType:
    if name not in _modules:
        _modules[name] = importlib.import_module(f"fastopt.backends.{name}")
    return _modules[name]


def unavailable_reason(name: str) -> str | None:
    """Why backend ``name`` cannot run in this install, or None if it can."""
    if name not in BACKENDS:
        return f"unknown backend {name!r}; choose one of {('auto',) + BACKENDS}"
    try:
        mod = _module(name)
    except ImportError as exc:  # a backend module that cannot even import
        return f"backend {name!r} failed to import: {exc}"
    return mod.available()


def available_backends() -> list[str]:
    """The backends this install can run, in the order of BACKENDS."""
    return [name for name in BACKENDS if unavailable_reason(name) is None]


def check(name: str) -> None:
    """Raise if ``name`` is not a backend this install can run ('auto' always can)."""
    if name == "auto":
        return
    if name not in BACKENDS:
        raise ValueError(f"unknown backend {name!r}; choose one of {('auto',) + BACKENDS}")
    reason = unavailable_reason(name)
    if reason is not None:
        raise RuntimeError(f"fastopt backend {name!r} is not available: {reason}")


def resolve(name: str, device: torch.device) -> ModuleType:
    """The backend module that runs tensors of ``device`` for ``backend=name``.

    ``auto`` picks the fastest available: cuda -> triton -> reference on GPUs,
    cpu -> reference on CPUs. An explicit backend that cannot run tensors of
    this device raises RuntimeError saying why.
    """
    if name == "auto":
        for candidate in _AUTO_ORDER.get(device.type, ("reference",)):
            if unavailable_reason(candidate) is None and _module(candidate).supports(device):
                return _module(candidate)
        return _module("reference")
    check(name)
    mod = _module(name)
    if not mod.supports(device):
        raise RuntimeError(
            f"fastopt backend {name!r} cannot run tensors on device {device}; "
            f"use backend='auto' or 'reference'"
        )
    return mod
