"""What the kernels need from the Triton interpreter (TRITON_INTERPRET=1), where fastopt tests them.

Compiled for a GPU nothing here changes the code: ``device_fn`` is ``triton.jit``
and ``tl.fma`` is the hardware's fused multiply-add. Under the interpreter two
of its behaviours would make the CPU tests slow or wrong, and are handled here
once for every kernel.

NOTE [interpreter cost of jit calls]
The interpreter runs a kernel as Python over numpy, ~0.1 ms per block
operation. Calling a nested ``@triton.jit`` function re-patches
``triton.language`` on every call (``InterpretedFunction.__call__``), which
costs ~0.35 ms more: a helper called per block cost as much as three or four
arithmetic operations, so the kernels used to keep their shared pieces
written out inline. ``device_fn`` removes that cost: under the interpreter it
returns the function the interpreter itself would run (its AST rewrite, the
same one the launch uses), which the kernel then calls as a plain Python
function inside the launch that already patched the language. The helpers
(the table walk, the chunk loop, the gradient transform, lerp, the
narrowing stores) therefore cost nothing beyond their operations, and the
kernels share them freely. Compiled, ``device_fn`` is ``triton.jit`` and the
helpers inline.

NOTE [fma under the interpreter]
The update formulas use explicit fused multiply-adds (lerp is torch's
``fma(w, b - a, a)``; NOTE [one formula per quantity] in
csrc/include/fastopt/update_math.h), and the launches turn off implicit
contraction (``enable_fp_fusion=False``) so no other pair is fused. A GPU's
``fma.rn.f32`` rounds once; the interpreter evaluates ``tl.fma`` as
``x * y + z`` in fp32, rounding twice. ``install_exact_fma`` gives the
interpreter an fp32 fma that rounds once: the product of two fp32 values is
exact in fp64, the sum is rounded to fp64 *to odd* (round to nearest, then,
if inexact and the last bit is even, step one ulp towards the exact value
given by the TwoSum error), and rounding that to fp32 is the correctly
rounded result (Boldo & Melquiond 2008: 53 >= 24 + 2 bits). The interpreted
kernels then produce the GPU's bits; tests/test_triton_rounding.py checks it.
"""

from __future__ import annotations

import numpy as np
import triton
import triton.language as tl

try:
    from triton.runtime import interpreter as _interpreter
except ImportError:  # a triton without the interpreter: nothing to adapt
    _interpreter = None


def _interpreted(fn) -> bool:
    return _interpreter is not None and isinstance(fn, _interpreter.InterpretedFunction)


def interpreting() -> bool:
    """Whether ``triton.jit`` builds interpreted functions (TRITON_INTERPRET is set)."""
    return bool(triton.knobs.runtime.interpret)


def device_fn(fn):
    """``triton.jit`` for a helper the kernels call (NOTE [interpreter cost of jit calls])."""
    jitted = triton.jit(fn)
    if _interpreted(jitted):
        return jitted.rewrite()
    return jitted


def exact_fma_f32(x: np.ndarray, y: np.ndarray, z: np.ndarray) -> np.ndarray:
    """``x * y + z`` rounded once to fp32 (NOTE [fma under the interpreter])."""
    with np.errstate(all="ignore"):
        a, b, c = (np.asarray(v, dtype=np.float64) for v in (x, y, z))
        p = a * b  # exact: 24 + 24 significant bits
        s = p + c
        # TwoSum: e is the exact error s - (p + c), up to sign convention below.
        p_part = s - c
        c_part = s - p_part
        e = (p - p_part) + (c - c_part)
        bits = s.view(np.int64)
        to_odd = (e != 0) & ((bits & 1) == 0) & np.isfinite(s)
        # One ulp towards the exact value: away from zero when e has s's sign.
        step = np.where((e > 0) == (s > 0), 1, -1).astype(np.int64)
        s = np.where(to_odd, (bits + step).view(np.float64), s)
        return s.astype(np.float32)


def install_exact_fma() -> bool:
    """Make the interpreter's fp32 ``tl.fma`` round once; True if it now does."""
    if _interpreter is None:
        return False
    builder = _interpreter.InterpreterBuilder
    original = builder.create_fma
    if getattr(original, "_fastopt_exact", False):
        return True

    def create_fma(self, x, y, z):
        if z.dtype.scalar != tl.float32:
            return original(self, x, y, z)
        return _interpreter.TensorHandle(exact_fma_f32(x.data, y.data, z.data), z.dtype.scalar)

    create_fma._fastopt_exact = True
    builder.create_fma = create_fma
    return True
