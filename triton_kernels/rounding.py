"""Storage-dtype conversions for the Triton kernels: narrowing rounded to nearest even by
bits (``narrow``), and exact widening (``widen``).

NOTE [explicit RNE in Triton]
Every narrowing store (fp32 registers -> bf16/fp16 memory) goes through
``narrow`` below, which rounds to nearest, ties to even, on the fp32 bit
pattern with integer arithmetic. The casts are not used because the Triton
interpreter (how the kernels are tested on CPU, TRITON_INTERPRET=1) truncates
fp32 -> bf16, and its "rtne" mode rounds ties away from zero; a GPU's
``cvt.rn`` rounds to nearest even. Written out in integers, the CPU tests and a
GPU run produce the same bits, which are the bits torch's ``Tensor.copy_``
(c10::BFloat16 / c10::Half) produces. NaN stays NaN (made quiet), overflow
rounds to infinity, and fp16 subnormals are rounded like every other value.
The integer work is a handful of ALU ops per element in a memory-bound kernel.
"""

from __future__ import annotations

import triton.language as tl

from fastopt.triton_kernels.interpreter import device_fn


@device_fn
def narrow(x, DTYPE: tl.constexpr):
    """fp32 ``x`` in storage dtype DTYPE (fp32: ``x`` itself), rounded to nearest even
    (see NOTE above)."""
    if DTYPE == tl.bfloat16:
        bits = x.to(tl.uint32, bitcast=True)
        is_nan = (bits & 0x7FFFFFFF) > 0x7F800000
        # Adding 0x7FFF plus the lowest kept bit, then dropping 16 bits, rounds
        # the dropped bits to nearest with ties to even; a carry out of the
        # mantissa correctly bumps the exponent (up to infinity).
        rounded = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16
        # A NaN keeps its sign and top payload bits and is made quiet.
        out = tl.where(is_nan, (bits >> 16) | 0x40, rounded)
        return out.to(tl.uint16).to(tl.bfloat16, bitcast=True)
    elif DTYPE == tl.float16:
        bits = x.to(tl.uint32, bitcast=True)
        sign = (bits >> 16) & 0x8000
        mag = bits & 0x7FFFFFFF
        # Normal fp16 range: rebias the exponent (127 -> 15) and round away 13
        # mantissa bits to nearest even; a carry moves into the exponent.
        rebiased = mag - 0x38000000
        normal = (rebiased + 0xFFF + ((rebiased >> 13) & 1)) >> 13
        # Below 2^-14 the result is a subnormal k * 2^-24 with k = |x| * 2^24
        # rounded to nearest even: shift the significand (implicit bit
        # included) right by 126 - exponent and round on the dropped bits.
        # The shift is clamped to [14, 31] so no shift is out of range; any
        # shift above 24 leaves less than half of 2^-24, which rounds to 0.
        exponent = (mag >> 23).to(tl.int32)
        significand = (mag & 0x7FFFFF) | 0x800000
        shift = tl.minimum(tl.maximum(126 - exponent, 14), 31).to(tl.uint32)
        one = tl.full(x.shape, 1, tl.uint32)
        kept = significand >> shift
        dropped = significand & ((one << shift) - 1)
        half = one << (shift - 1)
        round_up = (dropped > half) | ((dropped == half) & ((kept & 1) == 1))
        subnormal = tl.where(shift > 24, 0, kept + round_up.to(tl.uint32))
        out = tl.where(mag < 0x38800000, subnormal, normal)
        # 65520 (0x477FF000) is halfway between the largest fp16, 65504, and
        # 2^16; it and everything above round to infinity.
        out = tl.where(mag >= 0x477FF000, 0x7C00, out)
        out = tl.where(mag > 0x7F800000, 0x7E00 | ((mag >> 13) & 0x3FF), out)
        return (out | sign).to(tl.uint16).to(tl.float16, bitcast=True)
    else:
        return x


@device_fn
def widen(x):
    """A bf16, fp16 or fp32 block in fp32, exactly.

    bf16 is widened on its bits (the 16 bits become the top of the fp32
    pattern): the interpreter's generic bf16 -> fp32 conversion flushes bf16
    subnormals to zero, where a GPU's cvt keeps them. fp16 and fp32 convert
    exactly both ways.
    """
    if x.dtype == tl.bfloat16:
        return (x.to(tl.uint16, bitcast=True).to(tl.uint32) << 16).to(tl.float32, bitcast=True)
    return x.to(tl.float32)
