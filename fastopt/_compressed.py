"""Compressed optimizer state (SPEC §8): the master remainder and the moments' dtype.

* ``master_weights="remainder"``: a bf16 parameter keeps an int16
  ``master_remainder`` state instead of an fp32 ``master_param``; parameter and
  remainder together hold the fp32 master exactly (NOTE [master remainder] in
  csrc/include/fastopt/update_math.h). ``join`` and ``split`` below are the
  reference backend's copy of those two functions.
* ``state_dtype=``: the storage of the moments (``parse_state_dtype``), 8-bit
  ones included (NOTE [int8 moments]; ``q8_*`` below are the reference
  backend's copy of update_math.h's code).

NOTE [bf16 moments rounding]
bf16 moments are stored rounded to nearest even, like every other narrowing
store (NOTE [one precision policy] in update_math.h); no stochastic rounding. Measured with
scripts/bf16_moment_rounding.py (a byte-level MLP language model on this
package's sources, fp32 params, AdamW lr 3e-3, betas (0.9, 0.999), 1500 steps,
3 seeds, held-out loss in nats/byte):

    moments     seed 0   seed 1   seed 2   mean    vs fp32
    fp32        2.1485   2.1246   2.1825   2.1519
    bf16 RNE    2.1514   2.1420   2.1845   2.1593  +0.0074
    bf16 SR     2.1486   2.1395   2.1823   2.1568  +0.0049

Stochastic rounding is consistently closer, by 0.0022-0.0028 nats/byte per
seed (RNE cannot let v decay by less than half an ulp per step: beta2 = 0.999
shrinks v by 0.1%, an eighth to a quarter of a bf16 ulp, so a v that only decays sticks),
and both are inside the issue's 0.01 nats/byte on average. RNE ships here
because SR needs fresh random bits per element and step, and the ops have no
per-step seed to derive them from: Lion's op reads no step at all, and bits
derived from the gradient alone repeat for a gradient that repeats (zero
gradients of unused embedding rows), which brings the sticking back. Adding a
seed argument to every op (and its counter) is a change to the step plan that
another change is reworking; it is the follow-up, and this note's table is
the bar it has to beat.

NOTE [int8 moments]
``state_dtype="int8"`` stores each moment of a tensor of at least
Q8_MIN_NUMEL elements as one byte per element plus an fp32 scale per block
of 256: companded codes (m as sign * sqrt(|m|/s), v as (v/s)^(1/4), rounded
to nearest, the format in update_math.h's NOTE of the same name), 1.0156
bytes per element. Chosen by scripts/int8_moment_schemes.py (the byte-level
MLP of NOTE [bf16 moments rounding], AdamW lr 3e-3, betas (0.9, 0.999), 2000
steps, 4 seeds, held-out nats/byte; raw output in docs/int8_study.txt):

    code                               B/elem  mean val  vs fp32  worst seed
    fp32                               4.0000  2.1069
    bf16 (RNE)                         2.0000  2.1009   -0.0060   +0.0032
    dynamic, block 256, fp32 absmax    1.0156  2.0975   -0.0094   +0.0019
      (bitsandbytes' code)
    companded, block 256, fp32 scale   1.0156  2.0931   -0.0138   +0.0002
    companded, group 32, bf16 scale    1.0625  2.0953   -0.0116   +0.0024
      (FlashOptim's layout)
    dynamic, group 32, bf16 scale      1.0625  2.1116   +0.0047   +0.0388
    dynamic 256, stochastic rounding   1.0156  2.0937   -0.0132   +0.0010
    companded 32, stochastic rounding  1.0625  2.1194   +0.0125   +0.0377

Every 8-bit code is inside the issue's 0.01 nats/byte on average; the spread
between seeds (one fp32 seed lands 0.02-0.03 above the rest) is larger than
the differences between the codes, so the ranking among the good ones is
weak. What decided, per byte: the companded code at block 256 was the best
or tied on every seed (worst seed +0.0002), at the smallest scale overhead
(4 bytes per 256), and it is arithmetic (a square root and a rint), where the
dynamic code needs a 256-entry table and a nearest-value search on every
store. Groups of 32 spend 4x the scale bytes for nothing measurable here. Two
findings shaped the format: (1) a bf16 scale rounded UP (so that every
element fits) made the group's top element decode above its value by up to
2^-8 each store, which beta2 = 0.999 compounds: comp32 was +0.017 on seed 0
that way against +0.0023 with the scale rounded to nearest, and the fp32
scale removes the question (the top element decodes to s exactly). (2)
Stochastic rounding of the companded code is biased in v (unbiased in
v^(1/4), so E[v] is overestimated) and was clearly worse; nearest it is.
A v > 0 never takes code 0 (it would decode to 0 and leave m/eps as the
step). Small tensors (norm gains, biases) keep fp32 moments: their block
scales cost the most per element and they are a negligible share of bytes.

NOTE [stale remainder]
A remainder only means something next to the bf16 value the optimizer wrote
beside it. A parameter overwritten from outside (``model.load_state_dict``,
``p.data = ...``, ``p.copy_(...)``) would silently combine a new value with the
old remainder, so the update entry points RESET it: before each update,
a remainder whose parameter changed since the optimizer last wrote it is
zeroed, which makes the master exactly the new bf16 value (what a torch
checkpoint loads to, below). "Changed" is seen through what torch itself
tracks: the parameter object, its storage address and its version counter
(bumped by every in-place write through torch), recorded after every update
(``mark_written``). A write torch does not see (raw pointers in a foreign
kernel) is not detected. A remainder that was never written by an update in
this process (fresh, loaded from a checkpoint, deep-copied) is trusted.
The check is a few dictionary operations per tensor and step, paid only in
remainder mode.
"""

from __future__ import annotations

import weakref

import torch
from torch import Tensor

REMAINDER_KEY = "master_remainder"
MASTER_KEY = "master_param"
MASTER_MODES = (False, True, "remainder")
STATE_DTYPES = (None, torch.float32, torch.bfloat16, "int8")
# NOTE [int8 moments]: the storage dtype of 8-bit moments (codes and scales in
# one byte tensor), the block, and the size below which a tensor keeps fp32
# moments (bitsandbytes' threshold: a small tensor saves little and its block
# scales cost the most).
Q8 = torch.uint8
Q8_BLOCK = 256
Q8_MIN_NUMEL = 4096
# The moments coded as unsigned (v >= 0); every other moment is signed.
UNSIGNED_MOMENTS = ("exp_avg_sq", "max_exp_avg_sq")


def parse_master_weights(value) -> bool | str:
    """``False``, ``True`` or ``"remainder"`` (SPEC §2); anything else raises ValueError."""
    if isinstance(value, str):
        if value == "remainder":
            return value
    elif value in (False, True):
        return bool(value)
    raise ValueError(
        f"master_weights must be False, True or 'remainder', got {value!r}"
    )


def parse_state_dtype(value):
    """The moments' storage: None (fp32 with masters and for fp32 params, else the
    param dtype), ``torch.float32``, ``torch.bfloat16`` or ``"int8"`` (NOTE [int8
    moments]: tensors of at least Q8_MIN_NUMEL elements)."""
    if isinstance(value, str) and value == "int8":
        return value
    if value in STATE_DTYPES and (value is None or isinstance(value, torch.dtype)):
        return value
    raise ValueError(
        f"unknown state_dtype {value!r}; choose None, torch.float32, torch.bfloat16 or 'int8'"
    )


def is_remainder(master_params: list[Tensor] | None) -> bool:
    """Whether a functional call's master list holds remainders (int16) rather than masters."""
    return bool(master_params) and master_params[0].dtype == torch.int16


# ---- NOTE [master remainder], in torch ops (the reference backend) -----------------
# int64 arithmetic masked to 32 bits stands in for C++'s wrapping uint32_t.

_LOW16 = 0xFFFF
_LOW32 = 0xFFFFFFFF


def _to_signed(u: Tensor, bits: int) -> Tensor:
    return torch.where(u >= 2 ** (bits - 1), u - 2**bits, u)


def join(param: Tensor, remainder: Tensor) -> Tensor:
    """The fp32 master held by a bf16 ``param`` and its int16 ``remainder``."""
    hi = (param.detach().view(torch.int16).to(torch.int64) & _LOW16) << 16
    lo = remainder.to(torch.int64)  # sign-extended
    nan = (hi & 0x7FFF0000) > 0x7F800000
    u = torch.where(nan, hi | (lo & _LOW16), hi + lo) & _LOW32
    return _to_signed(u, 32).to(torch.int32).view(torch.float32)


def split(master: Tensor) -> tuple[Tensor, Tensor]:
    """(bf16 param, int16 remainder) for an fp32 ``master``: the param is the
    master rounded to nearest, ties away from zero."""
    u = master.detach().contiguous().view(torch.int32).to(torch.int64) & _LOW32
    nan = (u & 0x7FFFFFFF) > 0x7F800000
    hi = torch.where(nan, (u >> 16) | 0x0040, ((u + 0x8000) >> 16) & _LOW16)
    lo = u & _LOW16
    param = _to_signed(hi, 16).to(torch.int16).view(torch.bfloat16)
    return param.view(master.shape), _to_signed(lo, 16).to(torch.int16).view(master.shape)


def store(param: Tensor, remainder: Tensor, master: Tensor) -> None:
    """Split ``master`` into ``param`` (bf16) and ``remainder`` (int16), in place."""
    hi, lo = split(master)
    param.detach().view(torch.int16).copy_(hi.view(torch.int16))
    remainder.copy_(lo)


# ---- NOTE [int8 moments], in torch ops (the reference backend) ----------------------
# The same arithmetic as update_math.h's q8_* functions, on whole tensors.


def q8_bytes(n: int) -> int:
    """Bytes of the uint8 state of an n-element moment: the codes, then fp32 scales."""
    return -(-n // Q8_BLOCK) * (Q8_BLOCK + 4)


def q8_zeros(n: int, device) -> Tensor:
    """An all-zero 8-bit moment of n elements (zero codes and scales decode to 0)."""
    return torch.zeros(q8_bytes(n), dtype=Q8, device=device)


def _q8_views(buf: Tensor, n: int) -> tuple[Tensor, Tensor]:
    blocks = -(-n // Q8_BLOCK)
    if buf.dtype != Q8 or buf.dim() != 1 or buf.numel() != blocks * (Q8_BLOCK + 4):
        raise ValueError(
            f"an int8 moment of {n} elements is a 1-D uint8 tensor of {q8_bytes(n)} bytes, "
            f"got {buf.dtype} of shape {tuple(buf.shape)}"
        )
    codes = buf[: blocks * Q8_BLOCK].view(blocks, Q8_BLOCK)
    return codes, buf[blocks * Q8_BLOCK :].view(torch.float32).view(blocks, 1)


def q8_decode(buf: Tensor, n: int, signed: bool) -> Tensor:
    """The n fp32 values an 8-bit moment holds (flat)."""
    codes, scales = _q8_views(buf, n)
    if signed:
        t = codes.view(torch.int8).float() * Q8_INV_SIGNED
        out = (t * t.abs()) * scales
    else:
        t = codes.float() * Q8_INV_UNSIGNED
        t2 = t * t
        out = (t2 * t2) * scales
    return out.reshape(-1)[:n]


# fp32(1/127) and fp32(1/255) (update_math.h's kQ8Inv*): decoding multiplies by them
Q8_INV_SIGNED = float.fromhex("0x1.020408p-7")
Q8_INV_UNSIGNED = float.fromhex("0x1.010102p-8")
_TINY = float.fromhex("0x1p-126")
_FMAX = torch.finfo(torch.float32).max


def _sqrt(x: Tensor) -> Tensor:
    """The correctly rounded fp32 square root (sqrtf's, the kernels'): through fp64,
    which rounds right for a square root. torch's fp32 sqrt on the CPU can be an ulp
    off (sqrt(0x1.03fdeap-1) gives 0x1.6cd9b4p-1; the nearest float is ...b6p-1),
    which moves a code across a rounding edge."""
    return x.double().sqrt().float()


def q8_ratio(a: Tensor, s: Tensor) -> Tensor:
    """|x| / s as update_math.h's q8_ratio computes it: |x| * e * (1 / (s * e)), e = 2^64
    for a subnormal s, clamped to [0, 1]; 0 in a block whose s is 0 or not finite."""
    e = torch.where(s < _TINY, 2.0**64, 1.0)
    usable = (s > 0) & (s <= _FMAX)
    inv = torch.where(usable, 1.0 / torch.where(usable, s * e, 1.0), 0.0)
    r = (a * e) * inv
    return torch.where(r < 1.0, r, torch.where(r >= 1.0, 1.0, 0.0))


def q8_encode_into(buf: Tensor, x: Tensor, signed: bool) -> None:
    """Code the fp32 values ``x`` into the 8-bit moment ``buf`` in place."""
    n = x.numel()
    codes, scales = _q8_views(buf, n)
    flat = x.detach().reshape(-1).float()
    a = torch.nn.functional.pad(flat, (0, codes.numel() - n)).view_as(codes).abs()
    s = a.amax(dim=1, keepdim=True)  # NaN-propagating
    r = q8_ratio(a, s)
    if signed:
        q = torch.round(_sqrt(r) * 127.0).to(torch.int16)
        neg = torch.nn.functional.pad(flat < 0, (0, codes.numel() - n)).view_as(codes)
        q = torch.where(neg, -q, q)
        codes.copy_(q.to(torch.int8).view(Q8))
    else:
        q = torch.round(_sqrt(_sqrt(r)) * 255.0).to(torch.int16)
        q = torch.where((q == 0) & (a > 0), 1, q)
        codes.copy_(q.to(Q8))
    scales.copy_(s)


def q8_encode(x: Tensor, signed: bool) -> Tensor:
    """A new 8-bit moment holding ``x`` (coded: NOTE [int8 moments])."""
    buf = q8_zeros(x.numel(), x.device)
    q8_encode_into(buf, x, signed)
    return buf


def is_q8(t: Tensor) -> bool:
    return t.dtype == Q8


def is_signed(key: str) -> bool:
    """Whether moment ``key`` is coded signed (every moment but v, NOTE [int8 moments])."""
    return key not in UNSIGNED_MOMENTS


def moment_values(t: Tensor, p: Tensor, key: str) -> Tensor:
    """Moment ``key`` of ``p`` as values shaped like ``p``'s local shard: decoded if 8-bit."""
    local = p._local_tensor if hasattr(p, "_local_tensor") else p
    if is_q8(t):
        return q8_decode(t, local.numel(), is_signed(key)).view(local.shape)
    return t


def convert_moment(value: Tensor, p: Tensor, key: str, dtype: torch.dtype) -> Tensor:
    """A saved moment ``value`` of ``p`` (8-bit, or values of any float dtype, plain or
    DTensor) in the storage ``dtype`` of this optimizer: copied when it already is,
    else decoded and/or coded (an 8-bit moment coded from its own decoded values
    gives back the same bytes: every block's top element decodes to its scale)."""
    if dtype != Q8 and not is_q8(value):
        # fp32/bf16 values into fp32/bf16 storage: a DTensor stays one
        return value.to(device=p.device, dtype=dtype, copy=True)
    local = p._local_tensor if hasattr(p, "_local_tensor") else p
    if hasattr(value, "_local_tensor"):
        value = value._local_tensor  # this shard's values (DCP loaded them resharded)
    value = value.to(device=local.device)
    if dtype == Q8:
        if is_q8(value):
            _q8_views(value, local.numel())  # checks the size
            return value.clone()
        return q8_encode(value.float().reshape(-1), is_signed(key))
    return moment_values(value, p, key).to(dtype=dtype, copy=True)


# ---- NOTE [stale remainder] ---------------------------------------------------------

# id(remainder) -> (weakref to it, id(param), param.data_ptr(), param._version)
_written: dict[int, tuple] = {}
_purge_at = 1024


def reset_stale(params: list[Tensor], remainders: list[Tensor]) -> None:
    """Zero every remainder whose parameter changed since ``mark_written``."""
    get = _written.get
    for p, r in zip(params, remainders):
        mark = get(id(r))
        if mark is None or mark[0]() is not r:
            continue
        if mark[1] != id(p) or mark[2] != p.data_ptr() or mark[3] != p._version:
            r.zero_()


def mark_written(params: list[Tensor], remainders: list[Tensor]) -> None:
    """Record each parameter as the optimizer left it beside its remainder."""
    global _purge_at
    for p, r in zip(params, remainders):
        _written[id(r)] = (weakref.ref(r), id(p), p.data_ptr(), p._version)
    if len(_written) > _purge_at:
        for key in [k for k, mark in _written.items() if mark[0]() is None]:
            del _written[key]
        _purge_at = 2 * max(len(_written), 512)


def forget(remainder: Tensor) -> None:
    """Trust ``remainder`` again (it was just loaded or re-derived)."""
    _written.pop(id(remainder), None)
