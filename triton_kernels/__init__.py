"""fastopt's Triton kernels (installed as ``fastopt.triton_kernels``).

One launcher per operation, each one launch per (device, dtype) group:
``adamw_``, ``lion_`` and ``grad_sumsq`` with the signatures of the backend
contract in ``fastopt/backends/__init__.py``.
"""

from fastopt.triton_kernels import aot, multi_tensor, rounding
from fastopt.triton_kernels.adamw import adamw_
from fastopt.triton_kernels.lion import lion_
from fastopt.triton_kernels.norm import grad_sumsq

__all__ = ["adamw_", "lion_", "grad_sumsq", "aot", "multi_tensor", "rounding"]
