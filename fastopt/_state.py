"""State-dict compatibility: fastopt and torch.optim checkpoints load into each other.

torch's loader casts every floating state tensor to its parameter's dtype,
which would turn fp32 masters and fp32 moments of a bf16 parameter into bf16.
After it runs, the states are re-taken from the saved tensors with the
optimizer's dtype policy, bit for bit. Loading never changes the optimizer's
own construction flags (backend, master_weights, max_grad_norm, ...).

The loader casts integer states by value too, so the int16
``master_remainder`` (NOTE [master remainder]) would come out as bf16 numbers:
it is re-taken from the saved tensor as well. A checkpoint whose master does
not match this optimizer's mode is converted (``_load_master``): an fp32
master becomes a remainder (and the bf16 parameter is set to its split, so the
pair holds that master exactly), a remainder becomes an fp32 master, and a
checkpoint without either (torch's AdamW) gives a zero remainder or a master
equal to the parameter. Moments are stored in the optimizer's state_dtype:
an fp32 checkpoint loads into bf16 moments rounded to nearest even, or into
8-bit moments coded on load (NOTE [int8 moments]); 8-bit moments are saved
decoded (NOTE [8-bit moments in checkpoints]).
"""

from __future__ import annotations

from collections.abc import Callable
from itertools import chain
from typing import Any

import torch
from torch import Tensor

from fastopt import _compressed, _distributed

COUNTERS = ("attempted_steps", "skipped_steps")


def _params(optimizer) -> list[Tensor]:
    return list(chain.from_iterable(g["params"] for g in optimizer.param_groups))


def save(optimizer, state_dict: dict[str, Any]) -> dict[str, Any]:
    """torch's state dict, counters as ints (NOTE [counters in param groups]).

    NOTE [8-bit moments in checkpoints]
    An 8-bit moment (NOTE [int8 moments]) is written as its decoded fp32
    values shaped like its parameter (a DTensor with the parameter's mesh and
    placements for a DTensor parameter, whose live state is a plain tensor of
    its shard's codes and block scales), and coded again on load. The codes and
    scales themselves cannot be checkpointed in a form DCP reshards: a block's
    scale belongs to 256 elements of one shard, and another sharding cuts
    other blocks. Coding the decoded values gives back the same bytes (a
    block's top element decodes to its scale exactly, every other element to
    within a small fraction of a code of its code), so a save and a load on
    the same blocks is bit for bit; a block holding a NaN or an infinity
    decodes to NaN and stays NaN. The cost is a checkpoint of 4 bytes per
    element per moment, as with fp32 moments."""
    skipped = optimizer.skipped_steps
    for group in state_dict["param_groups"]:
        group["attempted_steps"] = optimizer._attempted_steps
        group["skipped_steps"] = skipped
    for pid, p in enumerate(_params(optimizer)):
        st = state_dict["state"].get(pid)
        if not st or not any(isinstance(v, Tensor) and _compressed.is_q8(v) for v in st.values()):
            continue
        st = state_dict["state"][pid] = dict(st)  # torch's dict is the live state
        for k, v in st.items():
            if isinstance(v, Tensor) and _compressed.is_q8(v):
                values = _compressed.moment_values(v, p, k)
                if _distributed.is_dtensor(p):
                    values = _distributed.DTensor.from_local(
                        values, p.device_mesh, p.placements, run_check=False,
                        shape=p.shape, stride=p.stride(),
                    )  # fmt: skip
                st[k] = values
    return state_dict


def to_torch(state_dict: dict[str, Any], params: list[Tensor]) -> dict[str, Any]:
    """``state_dict`` as torch.optim's optimizers write it: masters and remainders
    dropped (torch keeps none), moments widened to fp32 (8-bit ones decoded to
    their parameter's shape; torch's loader then casts them to each parameter's
    dtype), the counters left out of the groups."""
    state = {}
    for pid, st in state_dict["state"].items():
        state[pid] = {
            k: (v.float() if isinstance(v, Tensor) and k != "step" and v.is_floating_point()
                else _compressed.moment_values(v, params[pid], k).float()
                if isinstance(v, Tensor) and _compressed.is_q8(v) else v)
            for k, v in st.items()
            if k not in (_compressed.MASTER_KEY, _compressed.REMAINDER_KEY)
        }  # fmt: skip
    groups = [{k: v for k, v in g.items() if k not in COUNTERS} for g in state_dict["param_groups"]]
    return {"state": state, "param_groups": groups}


def initial_master(p: Tensor, key: str) -> Tensor:
    """A new master of ``p``: an fp32 copy, or a zero remainder (the master is p exactly)."""
    if key == _compressed.REMAINDER_KEY:
        return torch.zeros_like(p, dtype=torch.int16, memory_format=torch.preserve_format)
    return p.detach().float().clone(memory_format=torch.preserve_format)


def _load_master(optimizer, p: Tensor, state: dict[str, Any], src: dict[str, Any]) -> None:
    """``p``'s master in this optimizer's mode from the saved state ``src`` (see above)."""
    key = optimizer.master_key(p)
    master = src.get(_compressed.MASTER_KEY)
    remainder = src.get(_compressed.REMAINDER_KEY)
    state.pop(_compressed.MASTER_KEY, None)
    state.pop(_compressed.REMAINDER_KEY, None)
    if key == _compressed.REMAINDER_KEY:
        if remainder is not None:
            state[key] = remainder.to(device=p.device, dtype=torch.int16, copy=True)
        elif master is not None:
            hi, lo = _compressed.split(master.to(device=p.device, dtype=torch.float32))
            with torch.no_grad():
                p.detach().view(torch.int16).copy_(hi.view(torch.int16))
            state[key] = lo.clone()
        else:
            state[key] = initial_master(p, key)
        _compressed.forget(state[key])
    elif key == _compressed.MASTER_KEY:
        if master is not None:
            state[key] = master.to(device=p.device, dtype=torch.float32, copy=True)
        elif remainder is not None and p.dtype == torch.bfloat16:
            state[key] = _compressed.join(p, remainder.to(device=p.device, dtype=torch.int16))
        else:
            state[key] = initial_master(p, key)


def load(optimizer, state_dict: dict[str, Any], torch_load: Callable[[dict], None]) -> None:
    """Load ``state_dict`` (fastopt's or torch's) into ``optimizer`` through torch's
    loader ``torch_load``, then restore the dtype policy and the counters."""
    saved_state = state_dict["state"]
    saved_ids = list(chain.from_iterable(g["params"] for g in state_dict["param_groups"]))
    groups = state_dict["param_groups"]
    counters = {k: groups[0][k] for k in COUNTERS if groups and k in groups[0]}
    held = {k: optimizer._counter(k) for k in COUNTERS}
    torch_load(state_dict)
    for key, tensor in held.items():
        # the same counter tensors stay (filled below): a captured graph keeps its addresses
        if isinstance(tensor, Tensor):
            optimizer._set_counter(key, tensor)
    params = list(chain.from_iterable(g["params"] for g in optimizer.param_groups))
    group_of = {id(p): g for g in optimizer.param_groups for p in g["params"]}
    for saved_id, p in zip(saved_ids, params):
        if saved_id not in saved_state:
            continue
        src = saved_state[saved_id]
        state = optimizer.state[p]
        moment_keys = ("exp_avg", "exp_avg_sq", "exp_avg_slow", "max_exp_avg_sq")
        for key, value in src.items():
            if key == "step":
                state["step"] = optimizer.step_tensor(p, float(value))
            elif key in (_compressed.MASTER_KEY, _compressed.REMAINDER_KEY):
                continue
            elif key in moment_keys and isinstance(value, Tensor) and not torch.is_complex(p):
                # fp32/bf16 values or 8-bit codes, in this optimizer's storage
                state[key] = _compressed.convert_moment(value, p, key, optimizer.state_dtype(p))
            elif isinstance(value, Tensor) and (value.is_floating_point() or value.is_complex()):
                state[key] = value.to(device=p.device, dtype=optimizer.state_dtype(p), copy=True)
        _load_master(optimizer, p, state, src)
        optimizer.init_state(p, group_of[id(p)])
    if len(counters) == len(COUNTERS):
        optimizer._skipped_steps = int(counters["skipped_steps"])
        optimizer._attempted_steps = int(counters["attempted_steps"])
    else:
        # A torch checkpoint: torch does not advance `step` on skipped steps,
        # so the largest step is the number of applied steps.
        steps = [float(s["step"]) for s in optimizer.state.values() if "step" in s]
        optimizer._skipped_steps = 0
        optimizer._attempted_steps = int(max(steps)) if steps else 0
