"""Compressed optimizer state (SPEC §8): the master remainder and the moments' dtype.

* ``master_weights="remainder"``: a bf16 parameter keeps an int16
  ``master_remainder`` state instead of an fp32 ``master_param``; parameter and
  remainder together hold the fp32 master exactly (NOTE [master remainder] in
  csrc/include/fastopt/update_math.h). ``join`` and ``split`` below are the
  reference backend's copy of those two functions.
* ``state_dtype=``: the storage of the moments (``parse_state_dtype``).

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
STATE_DTYPES = (None, torch.float32, torch.bfloat16)


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
    param dtype), ``torch.float32`` or ``torch.bfloat16``."""
    if value == "int8":
        raise NotImplementedError(
            "state_dtype='int8' (8-bit blockwise moments) is not implemented yet; "
            "use None, torch.float32 or torch.bfloat16"
        )
    if value in STATE_DTYPES and (value is None or isinstance(value, torch.dtype)):
        return value
    raise ValueError(
        f"unknown state_dtype {value!r}; choose None, torch.float32 or torch.bfloat16"
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
