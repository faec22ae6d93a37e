"""The cpu and cuda backends: the ``torch.ops.fastopt`` ops of the fastopt._C extension.

The CPU kernels (csrc/cpu) and the CUDA kernels (csrc/cuda) are two dispatch
keys of the same ops, declared once in csrc/ops.cpp; this module is their one
Python wrapper. The update functions handed to the optimizers are the op
objects themselves, so a step goes from ``fastopt.functional`` straight into
C++. Importing this module never fails: if the extension is missing (not
built, or built against another torch) ``LOAD_ERROR`` says why and
``unavailable`` reports it.

The fake kernels registered below describe the ops' outputs without computing
anything, so ``torch.compile`` can trace around them; the in-place ops return
nothing, so one fake serves them all.
"""

from __future__ import annotations

from types import SimpleNamespace

import torch
from torch import Tensor

LOAD_ERROR: str | None = None

try:
    from fastopt import _C  # noqa: F401  (importing runs the op registrations)
except ImportError as exc:
    LOAD_ERROR = (
        f"the fastopt._C extension could not be imported ({exc}); build it with "
        "`pip install --no-build-isolation -e .` or `python setup.py build_ext --inplace`"
    )

UPDATE_OPS = ("adamw_", "lion_", "ademamix_", "steps_add_")

if LOAD_ERROR is None:
    _missing = [n for n in (*UPDATE_OPS, "grad_sumsq") if not hasattr(torch.ops.fastopt, n)]
    if _missing:
        LOAD_ERROR = (
            f"the fastopt._C extension is out of date (it lacks fastopt::{_missing[0]}); "
            "rebuild it with `pip install --no-build-isolation -e .`"
        )


def unavailable(device_type: str) -> str | None:
    """Why the compiled kernels cannot run tensors of ``device_type`` here, or None."""
    if LOAD_ERROR is not None:
        return LOAD_ERROR
    if device_type == "cuda":
        try:
            from fastopt import _build_info
        except ImportError:
            return "the fastopt._C extension is not built (no fastopt/_build_info.py)"
        if not _build_info.WITH_CUDA:
            return f"built without CUDA kernels: {_build_info.CUDA_REASON}"
        if not torch.cuda.is_available():
            return "no CUDA device"
    return None


def supports(device: torch.device) -> bool:
    return torch.device(device).type in ("cpu", "cuda")


_functions: SimpleNamespace | None = None
if LOAD_ERROR is None:
    _functions = SimpleNamespace(
        adamw_=torch.ops.fastopt.adamw_.default,
        lion_=torch.ops.fastopt.lion_.default,
        ademamix_=torch.ops.fastopt.ademamix_.default,
        grad_sumsq=torch.ops.fastopt.grad_sumsq.default,
        steps_add_=torch.ops.fastopt.steps_add_.default,
    )


def functions() -> SimpleNamespace:
    """The update functions: the ops' ``.default`` overloads (same signatures as the reference)."""
    if _functions is None:
        raise RuntimeError(LOAD_ERROR)
    return _functions


def _update_fake(*args, **kwargs) -> None:
    return None


def _grad_sumsq_fake(grads: list[Tensor], *, grad_mul=None, max_grad_value=None) -> Tensor:
    device = grads[0].device if grads else torch.device("cpu")
    return torch.empty((), dtype=torch.float32, device=device)


def fake(name: str):
    """The fake kernel of op ``name`` (also used for the Triton launchers' ops)."""
    return _grad_sumsq_fake if name == "grad_sumsq" else _update_fake


if LOAD_ERROR is None:
    for _name in (*UPDATE_OPS, "grad_sumsq"):
        torch.library.register_fake(f"fastopt::{_name}", fake(_name))
