"""The per-element pieces every Triton update shares: the Triton twin of
csrc/include/fastopt/update_math.h.

One formula per quantity, the same as the C++ and the reference (NOTE [one
precision policy], NOTE [one formula per quantity] and NOTE [gradient
transform] in update_math.h):

* hyperparameters arrive as fp64 kernel arguments; per-tensor coefficients
  (bias corrections, AdEMAMix's schedules) are computed from them in fp64
  and rounded once to fp32, as the C++ ``*_coeffs`` functions and the
  reference (on Python floats) do;
* every value is loaded from its storage dtype into fp32 registers and
  narrowed back on the store, rounded to nearest even (NOTE [explicit RNE in
  Triton]);
* the only fused multiply-adds are the explicit ones (``tl.fma``); the launches
  turn implicit contraction off (``multi_tensor.LAUNCH_OPTIONS``) and the
  interpreter's ``tl.fma`` is made to round once (NOTE [fma under the
  interpreter]);
* divisions and square roots are the IEEE ones (``div_rn``, ``sqrt_rn``):
  Triton's ``/`` and ``tl.sqrt`` on fp32 are approximations.

All are ``device_fn``s: free to call under the interpreter, inlined when
compiled (NOTE [interpreter cost of jit calls]).
"""

from __future__ import annotations

from typing import NamedTuple

import triton.language as tl
from torch import Tensor

from fastopt.triton_kernels.interpreter import device_fn
from fastopt.triton_kernels.rounding import narrow, widen

# ---- scalars ------------------------------------------------------------------


@device_fn
def f64(x):
    """An fp64 kernel argument as an fp64 scalar. Compiled it already is one; the
    interpreter passes a Python float, which triton would otherwise take as an
    fp32 constant wherever it meets a function or an fp32 value."""
    return tl.full([], x, tl.float64)


@device_fn
def learning_rate(lr, lr_ptr):
    """lr in fp64: the float ``lr`` times the device-side ``*lr_ptr`` (one of them is 1)."""
    return f64(lr) * tl.load(lr_ptr).to(tl.float64)


@device_fn
def bias_correction(beta, t):
    """1 - beta^t in fp64, beta^t as exp(t ln beta); beta = 0 is clamped to 1e-300,
    whose t-th power (t >= 1) is 0 in double just the same, without a log(0)."""
    return 1.0 - tl.exp(t * tl.log(tl.maximum(beta, 1e-300)))


class GradTransform(NamedTuple):
    """The gradient transform's arguments, one tuple argument of every kernel (update_math.h's
    GradTransform; NOTE [gradient transform]). Built on the host by
    ``multi_tensor.grad_transform``; the device-side values are read by the kernel."""

    grad_mul_ptr: Tensor  # *fp32 0-dim: the gradient multiplier (loss-scale reciprocal); 1 if none
    grad_sign: float  # fp32: -1.0 when maximize, else 1.0 (folded into grad_mul)
    max_grad_value: float  # fp32: the value-clipping bound; +inf when off
    clip_coef_ptr: Tensor  # *fp32 0-dim: the global-norm clip coefficient; 1 if none or folded


# The GradTransform's triton.compile signature (multi_tensor.aot).
GRAD_TRANSFORM_TYPES = GradTransform("*fp32", "fp32", "fp32", "*fp32")


@device_fn
def grad_scalars(transform):
    """The transform's fp32 scalars ``(grad_mul, max_grad_value, clip_coef)``, read once
    per program. ``maximize`` is always the sign folded into grad_mul: clamping is odd
    and -1 exact, so it equals negating after."""
    grad_mul = tl.load(transform.grad_mul_ptr) * tl.full([], transform.grad_sign, tl.float32)
    max_grad_value = tl.full([], transform.max_grad_value, tl.float32)
    return grad_mul, max_grad_value, tl.load(transform.clip_coef_ptr)


# ---- per element ----------------------------------------------------------------


@device_fn
def transform_grad(g, scalars):
    """g * grad_mul, clamped to [-max_grad_value, max_grad_value], times clip_coef
    (``scalars`` from ``grad_scalars``).

    The clamp is written with comparisons (not min/max, which drop NaN) so a
    NaN gradient stays NaN; +inf turns value clipping off.
    """
    grad_mul, max_grad_value, clip_coef = scalars
    g = g * grad_mul
    g = tl.where(
        g > max_grad_value, max_grad_value, tl.where(g < -max_grad_value, -max_grad_value, g)
    )
    return g * clip_coef


@device_fn
def lerp(a, b, w):
    """torch.lerp(a, b, w) for an fp32 scalar weight in [0, 1], as torch's vectorized
    CPU kernel: fma(w, b - a, a) when w < 0.5, else fma(w - 1, b - a, b)."""
    small = w < 0.5
    return tl.fma(tl.where(small, w, w - 1.0), b - a, tl.where(small, a, b))


@device_fn
def second_moment(v, g, beta2, one_minus_beta2):
    """fma((1 - beta2) * g, g, v * beta2): torch's ``v.mul_(beta2).addcmul_(g, g, value=1 - beta2)``."""
    return tl.fma(one_minus_beta2 * g, g, v * beta2)


@device_fn
def adam_denom(v, bias_corr2_sqrt, eps):
    """sqrt(v) / sqrt(1 - beta2^t) + eps."""
    return tl.div_rn(tl.sqrt_rn(v), bias_corr2_sqrt) + eps


# ---- memory ---------------------------------------------------------------------


@device_fn
def load(ptr, offs, mask):
    """A block of ``ptr``'s storage dtype, in fp32 (exactly, subnormals included)."""
    return widen(tl.load(ptr + offs, mask=mask, other=0.0))


@device_fn
def store(ptr, offs, x, mask):
    """fp32 ``x`` into ``ptr``'s storage dtype, rounded to nearest even."""
    tl.store(ptr + offs, narrow(x, ptr.dtype.element_ty), mask=mask)


@device_fn
def join_remainder(p, r):
    """NOTE [master remainder] (update_math.h): the fp32 master of bf16 params ``p``
    and int16 remainders ``r``, on their bits."""
    hi = p.to(tl.uint16, bitcast=True).to(tl.uint32) << 16
    lo = r.to(tl.int32).to(tl.uint32, bitcast=True)  # sign-extended
    nan = (hi & 0x7FFF0000) > 0x7F800000
    u = tl.where(nan, hi | (lo & 0xFFFF), hi + lo)
    return u.to(tl.float32, bitcast=True)


@device_fn
def split_remainder(w):
    """NOTE [master remainder]: (bf16 param, int16 remainder) of fp32 masters ``w``; the
    param is the master rounded to nearest, ties away from zero."""
    u = w.to(tl.uint32, bitcast=True)
    nan = (u & 0x7FFFFFFF) > 0x7F800000
    hi = tl.where(nan, (u >> 16) | 0x0040, (u + 0x8000) >> 16)
    p = hi.to(tl.uint16).to(tl.bfloat16, bitcast=True)
    return p, (u & 0xFFFF).to(tl.uint16).to(tl.int16, bitcast=True)


# NOTE [remainder test at compile time]: the block functions receive MASTER through
# their args tuple, where it is no longer a constexpr, so ``if MASTER == 2`` would
# compile both branches (and the remainder's 16-bit bitcasts do not type-check for
# fp32 params). The weight pointer's element type says the same thing statically:
# int16 exactly for remainders.


@device_fn
def load_weight(p_ptr, w_ptr, offs, mask):
    """The fp32 weight the update runs on: the fp32 master, the master joined from the
    param and its int16 remainder, or the param itself (``w_ptr`` is ``p_ptr`` then)."""
    if w_ptr.dtype.element_ty == tl.int16:
        p = tl.load(p_ptr + offs, mask=mask, other=0.0)
        w = join_remainder(p, tl.load(w_ptr + offs, mask=mask, other=0))
    else:
        w = load(w_ptr, offs, mask)
    return w


@device_fn
def store_weight(p_ptr, w_ptr, offs, w, mask, MASTER: tl.constexpr):
    """The updated weight: split into the param and its remainder (int16 ``w_ptr``);
    else into the fp32 master (MASTER) and, rounded to nearest even, the param."""
    if w_ptr.dtype.element_ty == tl.int16:
        p, r = split_remainder(w)
        tl.store(p_ptr + offs, p, mask=mask)
        tl.store(w_ptr + offs, r, mask=mask)
    else:
        if MASTER:
            tl.store(w_ptr + offs, w, mask=mask)
        store(p_ptr, offs, w, mask)


# ---- 8-bit moments (NOTE [int8 moments] in update_math.h) ----------------------------
# The same arithmetic as update_math.h's q8_* functions. A moment list of uint8
# holds each tensor's codes followed by its fp32 block scales; the block
# functions see it through the moment pointer's element type (as NOTE [remainder
# test at compile time]) and get the scales' pointer next to it.

Q8_BLOCK = tl.constexpr(256)


@device_fn
def q8_scales_ptr(codes_ptr, n):
    """The fp32 block scales of an 8-bit moment of ``n`` elements: after its codes."""
    blocks = (n + Q8_BLOCK - 1) // Q8_BLOCK
    return (codes_ptr + blocks * Q8_BLOCK).to(tl.pointer_type(tl.float32), bitcast=True)


@device_fn
def _rint(x):
    """x rounded to the nearest integer, ties to even, for 0 <= x < 2^23 (the fp32
    add rounds the fraction away; what rintf does)."""
    return (x + 8388608.0) - 8388608.0


@device_fn
def _q8_ratio(a, s):
    """update_math.h's q8_inverse and q8_ratio: |x| * e * (1 / (s * e)), e = 2^64 for
    a subnormal s, clamped to [0, 1]; 0 where s is 0 or not finite."""
    e = tl.where(s < 1.1754943508222875e-38, 1.8446744073709552e19, 1.0)
    usable = (s > 0.0) & (s <= 3.4028234663852886e38)
    inv = tl.where(usable, tl.div_rn(tl.full(s.shape, 1.0, tl.float32), tl.where(usable, s * e, 1.0)), 0.0)
    r = (a * e) * inv
    return tl.where(r < 1.0, r, tl.where(r >= 1.0, 1.0, 0.0))


# fp32(1/127), fp32(1/255): update_math.h's kQ8InvSigned, kQ8InvUnsigned
Q8_INV_SIGNED = tl.constexpr(0.007874015718698502)
Q8_INV_UNSIGNED = tl.constexpr(0.003921568859368563)


@device_fn
def _q8_decode(q, s, SIGNED: tl.constexpr):
    if SIGNED:
        t = q.to(tl.int8, bitcast=True).to(tl.float32) * Q8_INV_SIGNED
        x = (t * tl.abs(t)) * s
    else:
        t = q.to(tl.float32) * Q8_INV_UNSIGNED
        t2 = t * t
        x = (t2 * t2) * s
    return x


@device_fn
def _q8_encode(x, s, SIGNED: tl.constexpr):
    if SIGNED:
        q = _rint(tl.sqrt_rn(_q8_ratio(tl.abs(x), s)) * 127.0).to(tl.int32)
        code = tl.where(x < 0.0, -q, q).to(tl.int8).to(tl.uint8, bitcast=True)
    else:
        q = _rint(tl.sqrt_rn(tl.sqrt_rn(_q8_ratio(x, s))) * 255.0).to(tl.int32)
        code = tl.where((q == 0) & (x > 0.0), 1, q).to(tl.uint8)
    return code


@device_fn
def q8_load(codes_ptr, scales_ptr, offs, mask, SIGNED: tl.constexpr):
    """A block of an 8-bit moment, decoded to fp32 (0 where masked)."""
    q = tl.load(codes_ptr + offs, mask=mask, other=0)
    s = tl.load(scales_ptr + offs // Q8_BLOCK, mask=mask, other=0.0)
    return _q8_decode(q, s, SIGNED)


@device_fn
def q8_store(codes_ptr, scales_ptr, offs, x, mask, SIGNED: tl.constexpr):
    """fp32 ``x`` (0 where masked) coded into an 8-bit moment: each 256-element block
    gets its largest magnitude as its scale (NaN if it holds a NaN). ``offs`` starts
    on a block boundary and spans whole blocks.

    One reduction per block: the max of the magnitudes' bit patterns as int32
    (non-negative floats order as their bits, and every NaN's bits exceed inf's),
    so a NaN wins without a separate test. The thread holding a block's first
    element stores its scale (a block is live iff its first element is), with no
    reductions for the scale's index or mask. With AdEMAMix's store-as-you-go
    order this keeps every 8-bit specialisation at <= 128 registers
    (tests/test_triton_aot.py has the measured spills).
    """
    ROWS: tl.constexpr = offs.shape[0] // Q8_BLOCK
    bits = x.to(tl.int32, bitcast=True) & 0x7FFFFFFF
    top = tl.max(tl.reshape(bits, (ROWS, Q8_BLOCK)), axis=1).to(tl.float32, bitcast=True)
    top = tl.where(top == top, top, float("nan"))  # one NaN whatever the payload
    s = tl.reshape(tl.broadcast_to(top[:, None], (ROWS, Q8_BLOCK)), (ROWS * Q8_BLOCK,))
    tl.store(codes_ptr + offs, _q8_encode(x, s, SIGNED), mask=mask)
    tl.store(scales_ptr + offs // Q8_BLOCK, s, mask=mask & (offs % Q8_BLOCK == 0))


@device_fn
def load_moment(ptr, scales_ptr, offs, mask, SIGNED: tl.constexpr):
    """A block of a moment in fp32: decoded when the moments are 8-bit (uint8
    ``ptr``), else widened from its storage dtype."""
    if ptr.dtype.element_ty == tl.uint8:
        x = q8_load(ptr, scales_ptr, offs, mask, SIGNED)
    else:
        x = load(ptr, offs, mask)
    return x


@device_fn
def store_moment(ptr, scales_ptr, offs, x, mask, SIGNED: tl.constexpr):
    """Store a block of a moment: coded when 8-bit, else rounded to nearest even."""
    if ptr.dtype.element_ty == tl.uint8:
        q8_store(ptr, scales_ptr, offs, x, mask, SIGNED)
    else:
        store(ptr, offs, x, mask)
