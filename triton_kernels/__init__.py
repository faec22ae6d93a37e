"""fastopt's Triton kernels (installed as ``fastopt.triton_kernels``).

One launcher per operation, each one launch per call: ``adamw_``, ``lion_``,
``ademamix_`` and ``grad_sumsq``, with the signatures of the ops in
csrc/ops.cpp (the reference backend, fastopt/backends/reference.py, is the
same functions in plain torch). Modules:

* ``adamw``, ``lion``, ``ademamix``, ``norm``: launcher, kernel and per-block
  math of each operation, top to bottom;
* ``multi_tensor``: the launch tables and the device-side table walk and chunk
  loop (NOTE [triton multi-tensor]), the dtype map and row constants;
* ``elementwise``: the per-element pieces the updates share (the twin of
  csrc/include/fastopt/update_math.h); ``rounding``: the narrowing stores;
* ``interpreter``: what running under TRITON_INTERPRET=1 needs;
* ``aot``: every specialisation, for ahead-of-time compile checks.
"""

from fastopt.triton_kernels import interpreter

if interpreter.interpreting():
    interpreter.install_exact_fma()  # NOTE [fma under the interpreter]

from fastopt.triton_kernels import aot, elementwise, multi_tensor, rounding  # noqa: E402
from fastopt.triton_kernels.adamw import adamw_  # noqa: E402
from fastopt.triton_kernels.ademamix import ademamix_  # noqa: E402
from fastopt.triton_kernels.lion import lion_  # noqa: E402
from fastopt.triton_kernels.norm import grad_sumsq  # noqa: E402

__all__ = [
    "adamw_",
    "lion_",
    "ademamix_",
    "grad_sumsq",
    "aot",
    "elementwise",
    "interpreter",
    "multi_tensor",
    "rounding",
]
