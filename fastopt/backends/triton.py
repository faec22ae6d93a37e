"""The Triton backend: multi-tensor kernels from ``fastopt.triton_kernels``.

Runs CUDA tensors on a GPU, and CPU tensors under the Triton interpreter
(``TRITON_INTERPRET=1``, which must be set before triton is first imported) —
how the kernels are tested without a GPU. Under the interpreter CUDA tensors
are not supported: the kernels address memory through pointer tables, which
the interpreter would dereference on the host.

NOTE [where the triton kernels import from]
Installed, ``triton_kernels/`` is the package ``fastopt.triton_kernels``
(pyproject's package-dir mapping). In a source checkout that was never
installed, ``kernels()`` registers ``<checkout>/triton_kernels`` under that
same name, so ``fastopt.triton_kernels`` imports identically both ways.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import sys
from pathlib import Path
from types import ModuleType, SimpleNamespace

import torch

_KERNELS = "fastopt.triton_kernels"


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def kernels() -> ModuleType:
    """The ``fastopt.triton_kernels`` package (see NOTE above)."""
    if _KERNELS in sys.modules:
        return sys.modules[_KERNELS]
    try:
        return importlib.import_module(_KERNELS)
    except ModuleNotFoundError as exc:
        if exc.name != _KERNELS:
            raise
        init = Path(__file__).resolve().parents[2] / "triton_kernels" / "__init__.py"
        if not init.is_file():
            raise
    spec = importlib.util.spec_from_file_location(
        _KERNELS, init, submodule_search_locations=[str(init.parent)]
    )
    module = importlib.util.module_from_spec(spec)
    sys.modules[_KERNELS] = module
    try:
        spec.loader.exec_module(module)
    except BaseException:
        del sys.modules[_KERNELS]
        raise
    import fastopt

    fastopt.triton_kernels = module
    return module


def unavailable(device_type: str | None = None) -> str | None:
    """Why the Triton kernels cannot run here, or None."""
    try:
        import triton  # noqa: F401
    except ImportError as exc:
        return f"triton is not installed ({exc})"
    if not _interpreting() and not torch.cuda.is_available():
        return "no CUDA device (set TRITON_INTERPRET=1 to run the kernels on CPU tensors)"
    try:
        kernels()
    except ImportError as exc:
        return f"the triton kernels failed to import: {exc}"
    return None


def supports(device: torch.device) -> bool:
    device = torch.device(device)
    if device.type == "cuda":
        return not _interpreting() and torch.cuda.is_available()
    return device.type == "cpu" and _interpreting()


def functions() -> ModuleType:
    """The update functions: the launchers of ``fastopt.triton_kernels`` (the ops' signatures).

    The module also gets ``traceable``: the same launchers registered as the ops
    ``torch.ops.fastopt_triton.*`` (NOTE [triton under torch.compile])."""
    module = kernels()
    if "traceable" not in module.__dict__:
        module.traceable = _as_ops(module)
    return module


# NOTE [triton under torch.compile]
# dynamo cannot trace the launchers (they build pointer tables from data_ptr()
# and launch through Triton's runtime), and a graph break per bucket would
# split every compiled step. So a traced step calls them as custom ops, which
# dynamo keeps opaque: the schemas are the compiled ops' own (csrc/ops.cpp, the
# one place they are written; the mutated lists are marked there), the fake
# kernels describe outputs only, and the implementation is the launcher. Eager
# steps call the launchers directly (no dispatcher hop).
_library = None


def _as_ops(module: ModuleType) -> SimpleNamespace | None:
    global _library
    from fastopt.backends import compiled

    if compiled.LOAD_ERROR is not None:  # no schemas to copy: a traced step breaks instead
        return None
    names = ("adamw_", "lion_", "ademamix_", "grad_sumsq")
    if _library is None:
        _library = torch.library.Library("fastopt_triton", "DEF")
        for name in names:
            schema = str(getattr(torch.ops.fastopt, name).default._schema).split("::", 1)[1]
            _library.define(schema)
            _library.impl(name, getattr(module, name), "CompositeExplicitAutograd")
            torch.library.register_fake(f"fastopt_triton::{name}", compiled.fake(name))
    return SimpleNamespace(**{n: getattr(torch.ops.fastopt_triton, n).default for n in names})
