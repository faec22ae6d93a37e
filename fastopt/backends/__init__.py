"""Backend resolution: the one place that maps ``backend=`` to kernels.

A backend is a namespace of four functions with the signatures of the
compiled ops in csrc/ops.cpp (``adamw_``, ``lion_``, ``ademamix_``,
``grad_sumsq``), taking lists of tensors of one device:

* ``reference`` (fastopt/backends/reference.py): plain torch, per tensor.
* ``cpu`` and ``cuda`` (fastopt/backends/compiled.py): the ``torch.ops.fastopt``
  ops themselves; the CPU and CUDA kernels are two dispatch keys of the same ops.
* ``triton`` (fastopt/backends/triton.py -> ``fastopt.triton_kernels``): one
  launcher per op, CUDA tensors on a GPU or CPU tensors under TRITON_INTERPRET=1.

NOTE [what the fast backends take]
The compiled and Triton kernels take contiguous fp32, bf16 and fp16 tensors
whose gradients have the parameters' dtype, or fp32 gradients of bf16/fp16
parameters (torch's ``Tensor.grad_dtype``). Anything else (float64 and
complex128, which torch computes in float64; mixed dtypes beyond those) runs
the reference backend, which computes it the same way; the optimizers send
non-contiguous tensors there too (fastopt/_gather.py).
"""

from __future__ import annotations

import importlib
from types import ModuleType

import torch
from torch import Tensor

BACKENDS = ("reference", "cpu", "triton", "cuda")
KERNEL_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
_AUTO_ORDER = {"cuda": ("cuda", "triton", "reference"), "cpu": ("cpu", "reference")}
# backend name -> (module under fastopt.backends, the device type it runs; None: any)
_WHERE = {
    "reference": ("reference", None),
    "cpu": ("compiled", "cpu"),
    "cuda": ("compiled", "cuda"),
    "triton": ("triton", None),
}


_modules: dict[str, ModuleType] = {}


def _module(name: str) -> ModuleType:
    # A dict lookup once imported: torch.compile traces through resolve() and
    # cannot trace importlib.
    module = _modules.get(name)
    if module is None:
        module = _modules[name] = importlib.import_module(f"fastopt.backends.{_WHERE[name][0]}")
    return module


def unavailable_reason(name: str) -> str | None:
    """Why backend ``name`` cannot run in this install, or None if it can."""
    if name not in BACKENDS:
        return f"unknown backend {name!r}; choose one of {('auto',) + BACKENDS}"
    module, device_type = _WHERE[name]
    try:
        mod = _module(name)
    except ImportError as exc:  # a backend module that cannot even import
        return f"backend {name!r} failed to import: {exc}"
    return mod.unavailable(device_type)


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


def fast_dtypes(dtype: torch.dtype, grad_dtype: torch.dtype) -> bool:
    """Whether the fast kernels take params of ``dtype`` with grads of ``grad_dtype``."""
    if dtype not in KERNEL_DTYPES:
        return False
    return grad_dtype == dtype or (grad_dtype == torch.float32 and dtype != torch.float32)


def is_compiled(impl) -> bool:
    """Whether ``impl`` (a ``resolve`` result) is the compiled ops of fastopt._C."""
    compiled = _module("cpu")
    return compiled.LOAD_ERROR is None and impl is compiled.functions()


def _runs(name: str, device: torch.device) -> bool:
    if unavailable_reason(name) is not None:
        return False
    want = _WHERE[name][1]
    return (want is None or device.type == want) and _module(name).supports(device)


_resolved: dict[tuple, object] = {}


def resolve(
    name: str,
    device: torch.device,
    dtype: torch.dtype = torch.float32,
    grad_dtype: torch.dtype | None = None,
):
    """The namespace of update functions that runs these tensors for ``backend=name``.

    ``auto`` picks the fastest available: cuda -> triton -> reference on GPUs,
    cpu -> reference on CPUs. Dtypes the fast kernels do not take go to the
    reference (NOTE [what the fast backends take]). An explicit backend that
    cannot run tensors of this device raises RuntimeError saying why.
    """
    key = (name, device, dtype, grad_dtype)
    found = _resolved.get(key)
    if found is None:
        found = _resolved[key] = _resolve(name, torch.device(device), dtype, grad_dtype)
    return found


def _resolve(name: str, device: torch.device, dtype: torch.dtype, grad_dtype: torch.dtype | None):
    if not fast_dtypes(dtype, dtype if grad_dtype is None else grad_dtype):
        name = "reference"
    if name == "auto":
        for candidate in _AUTO_ORDER.get(device.type, ("reference",)):
            if _runs(candidate, device):
                return _module(candidate).functions()
        return _module("reference").functions()
    check(name)
    if not _runs(name, device):
        raise RuntimeError(
            f"fastopt backend {name!r} cannot run tensors on device {device}; "
            f"use backend='auto' or 'reference'"
        )
    return _module(name).functions()


# ---- the scalar arguments every update op takes ------------------------------------


def _device_scalar(t: Tensor | None, device: torch.device) -> Tensor | None:
    """A 0-dim float32 argument on ``device`` (a device copy at most, never a sync)."""
    if t is None:
        return None
    return t.detach().reshape(()).to(
        device=device, dtype=torch.float32, non_blocking=device.type != "cpu"
    )


def op_scalars(
    device: torch.device,
    lr: float | Tensor,
    grad_mul: Tensor | None,
    max_grad_value: float | None,
    clip_coef: Tensor | None,
    skip: Tensor | None,
) -> dict:
    """The keyword arguments ``lr, lr_tensor, grad_mul, max_grad_value, clip_coef, skip``
    of an update op, for tensors on ``device``: a tensor lr travels as ``lr_tensor``."""
    tensor_lr = isinstance(lr, Tensor)
    return dict(
        lr=0.0 if tensor_lr else float(lr),
        lr_tensor=_device_scalar(lr, device) if tensor_lr else None,
        grad_mul=_device_scalar(grad_mul, device),
        max_grad_value=None if max_grad_value is None else float(max_grad_value),
        clip_coef=_device_scalar(clip_coef, device),
        skip=_device_scalar(skip, device),
    )
