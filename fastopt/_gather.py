"""Gathering: the tensors of each param group sorted into per-(device, dtype) lists.

A :class:`Bucket` holds parallel lists (params, grads, each state, steps) of
one param group that share a device, a param dtype, a grad dtype, master
weights on/off and a layout class; the optimizers hand each bucket's lists to
their functional entry point (``fastopt.functional``).

NOTE [contiguous fast path]
The compiled and Triton kernels walk flat memory, so they only receive
tensors whose parameter, gradient and state are all contiguous. Anything else
(a transposed view registered as a parameter, say) goes to the reference
backend, which handles any layout; so do dtypes the kernels lack (NOTE [what
the fast backends take] in fastopt/backends/__init__.py). Correct first; such
parameters are rare.

NOTE [gather cache]
Sorting thousands of parameters into buckets costs tens of microseconds each
in Python, more than the fused kernel itself for small tensors. The buckets of
a group are kept while the group's parameter list, the set of parameters that
have gradients, the construction flags and every state tensor (checked by
identity) stay the same; each step only re-reads ``.grad`` and checks it
(sparse, dtype, layout). Any change rebuilds. Groups with complex parameters
are not cached (their real views would go stale if ``.data`` were replaced).

On top of it, groups of plain (non-DTensor, real) parameters get a C++
GroupPlan (csrc/plan.cpp, NOTE [persistent step plan]) that does this
per-step re-read and revalidation, and hands the tensors to the compiled ops,
without a Python loop over parameters.
"""

from __future__ import annotations

from collections import defaultdict
from itertools import chain
from operator import attrgetter, is_, methodcaller
from typing import Any

import torch
from torch import Tensor

from fastopt import _compressed, _distributed, backends

try:
    from fastopt._C import BucketPlan, GroupPlan
except ImportError:  # the extension is missing: every group keeps the Python path
    BucketPlan = GroupPlan = None

_LOCAL = attrgetter("_local_tensor")
_DTYPE = attrgetter("dtype")
_IS_SPARSE = attrgetter("is_sparse")
_GRAD = attrgetter("grad")
_MASTER_LIST = {_compressed.REMAINDER_KEY: _compressed.MASTER_KEY}


class Bucket:
    """The tensors of one param group that share a device, dtypes and layout class."""

    __slots__ = ("backend", "params", "originals", "grads", "states", "held", "steps",
                 "indices", "state_dicts", "grad_dtype", "dense", "domain", "sharded",
                 "steps_add", "impl", "native", "native_ops")

    def __init__(self, backend: str, grad_dtype: torch.dtype, dense: bool, domain) -> None:
        self.backend = backend  # the name handed to fastopt.functional
        self.grad_dtype = grad_dtype
        self.dense = dense
        self.domain = domain  # NOTE [global norm over shards]
        self.sharded = domain is not None and domain[0] == "mesh"  # DTensor parameters
        # The compiled one-loop step increment for CPU steps (NOTE [step counters]
        # in fastopt/_base.py), or None: torch._foreach_add_.
        self.steps_add = None
        self.impl = None  # the backend's update functions (fastopt.backends.resolve)
        # The C++ BucketPlan of a planned group (NOTE [persistent step plan]), and
        # whether its ops are the compiled ones it can call itself.
        self.native = None
        self.native_ops = False
        self.params: list[Tensor] = []  # local tensors (NOTE [DTensor parameters])
        self.originals: list[Tensor] = []  # the parameters themselves: keys of optimizer.state
        self.grads: list[Tensor] = []
        self.states: dict[str, list[Tensor]] = defaultdict(list)  # what the kernels get
        self.held: dict[str, list[Tensor]] = defaultdict(list)  # the objects in the state dicts
        self.steps: list[Tensor] = []
        self.indices: list[int] = []  # positions in group["params"]
        self.state_dicts: list[dict] = []

    def state(self, key: str) -> list[Tensor]:
        """The list of state ``key`` (empty when this bucket has none, e.g. no masters)."""
        return self.states.get(key, [])

    def run(self, op: str, lists: tuple[str, ...], kwargs: dict[str, Any]) -> None:
        """Call update op ``op`` (``adamw_``, ...) on this bucket: through the C++ plan
        when it holds the tensors, else with the lists ``params, grads, *lists``
        (state keys; a missing key is an empty list) and ``kwargs``."""
        remainders = self.held.get(_compressed.REMAINDER_KEY)
        if remainders and not torch.compiler.is_compiling():
            # NOTE [stale remainder] in fastopt/_compressed.py
            _compressed.reset_stale(self.params, remainders)
        if self.native_ops:
            getattr(self.native, op)(**kwargs)
        else:
            states = [self.steps if k == "step" else self.states.get(k, []) for k in lists]
            getattr(self._impl(), op)(self.params, self.grads, *states, **kwargs)
        if remainders and not torch.compiler.is_compiling():
            _compressed.mark_written(self.params, remainders)

    @property
    def device(self) -> torch.device:
        return self.params[0].device

    def sumsq(self, grad_mul: Tensor | None, max_grad_value: float | None) -> Tensor:
        """This bucket's part of the global-norm pass (fastopt.functional.grad_sumsq)."""
        grad_mul = backends._device_scalar(grad_mul, self.device)
        max_grad_value = None if max_grad_value is None else float(max_grad_value)
        if self.native_ops:
            return self.native.grad_sumsq(grad_mul=grad_mul, max_grad_value=max_grad_value)
        return self._impl().grad_sumsq(self.grads, grad_mul=grad_mul, max_grad_value=max_grad_value)

    def _impl(self):
        # traced, the Triton launchers go in as opaque ops (NOTE [triton under torch.compile])
        if torch.compiler.is_compiling():
            return getattr(self.impl, "traceable", None) or self.impl
        return self.impl

    def refresh(self, grads: list[Tensor | None], optimizer_state) -> bool:
        """Re-take this step's gradients; False if anything the cache relied on changed.

        Written with map() over C-level callables: this runs every step for every
        parameter, and a generator expression costs several times more per element.
        """
        gl = list(map(grads.__getitem__, self.indices))
        if self.sharded:
            if not all(map(_distributed.is_dtensor, gl)):
                return False
            gl = list(map(_LOCAL, gl))
            if not all(map(is_, map(_LOCAL, self.originals), self.params)):
                return False
        try:
            # parameters too: `p.data = <non-contiguous>` must leave the fast path
            if self.dense and not all(map(Tensor.is_contiguous, chain(gl, self.params))):
                return False
        except RuntimeError:  # sparse tensors have no strides
            return False
        if set(map(_DTYPE, gl)) != {self.grad_dtype}:
            return False
        # (a sparse grad already failed is_contiguous above for a dense bucket)
        if not self.dense and any(map(_IS_SPARSE, gl)):
            return False
        if not all(map(is_, map(optimizer_state.get, self.originals), self.state_dicts)):
            return False
        for key, tensors in self.held.items():
            if not all(map(is_, map(methodcaller("get", key), self.state_dicts), tensors)):
                return False
        if not all(map(is_, map(methodcaller("get", "step"), self.state_dicts), self.steps)):
            return False
        self.grads = gl
        return True


class _CacheEntry:
    __slots__ = ("params", "members", "mask", "flags", "buckets", "native", "unplanned")

    def __init__(self, params, mask, flags, buckets, native):
        self.params, self.mask, self.flags, self.buckets = params, mask, flags, buckets
        self.members = list(params)  # a parameter swapped into the same list is a change
        self.native = native  # the group's C++ GroupPlan, or None
        # planned buckets the C++ ops cannot run (reference, triton): Python takes
        # their refreshed gradients from the plan
        self.unplanned = [b for b in buckets.values() if b.native is not None and not b.native_ops]

    def valid(self, params: list, grads_of, optimizer_state) -> bool:
        """Whether the cached buckets still hold (their gradients re-taken)."""
        if self.native is not None:
            if not self.native.refresh(params, optimizer_state):
                return False
            for b in self.unplanned:
                b.grads = b.native.grads()
            return True
        grads = grads_of(params)
        return (
            self.params is params
            and self.mask == [g is not None for g in grads]  # equal lengths: zip compares all
            and all(map(is_, self.members, params))
            and all(b.refresh(grads, optimizer_state) for b in self.buckets.values())
        )


class Gatherer:
    """Builds and caches the buckets of every param group (NOTE [gather cache])."""

    def __init__(self) -> None:
        self._cache: dict[int, _CacheEntry | None] = {}

    def clear(self) -> None:
        self._cache.clear()

    def gather(self, optimizer, flags: tuple) -> list[tuple[dict[str, Any], Bucket]]:
        """(group, bucket) for every bucket with at least one gradient, in group order.

        ``flags`` are the optimizer's construction flags that change bucketing
        (backend, master weights, state keys); a change invalidates the cache.
        """
        out = []
        cache = self._cache
        for gi, group in enumerate(optimizer.param_groups):
            params = group["params"]
            group_flags = (flags, optimizer.state_keys(group))
            entry = cache.get(gi)
            if entry is not None and entry.flags == group_flags and entry.valid(
                params, _grads_of, optimizer.state
            ):
                buckets = entry.buckets
            else:
                grads = _grads_of(params)
                buckets, cacheable = build_buckets(optimizer, gi, group, grads)
                entry = None
                if cacheable:
                    mask = [g is not None for g in grads]
                    entry = _CacheEntry(params, mask, group_flags, buckets,
                                        _plan(optimizer, params, buckets))  # fmt: skip
                cache[gi] = entry
            out.extend((group, b) for b in buckets.values())
        for gi in [k for k in cache if k >= len(optimizer.param_groups)]:
            del cache[gi]
        return out


def _grads_of(params: list[Tensor]) -> list[Tensor | None]:
    return list(map(_GRAD, params))


def _plan(optimizer, params: list[Tensor], buckets: dict[tuple, Bucket]):
    """The group's C++ plan (NOTE [persistent step plan]), or None where the Python
    path must stay: no extension, DTensor parameters, or an empty group."""
    if GroupPlan is None or not buckets or any(b.sharded for b in buckets.values()):
        return None
    plans = []
    for b in buckets.values():
        held = {k: v for k, v in b.held.items()}
        held["step"] = b.steps
        b.native = BucketPlan(params=b.params, grads=b.grads, indices=b.indices, grad_dtype=b.grad_dtype,
                              dense=b.dense, state_dicts=b.state_dicts, held=held,
                              aliases=_MASTER_LIST)  # fmt: skip
        b.native_ops = backends.is_compiled(b.impl)
        plans.append(b.native)
    return GroupPlan(params=params, optimizer_state=optimizer.state, buckets=plans)


def build_buckets(optimizer, gi: int, group: dict[str, Any], grads: list[Tensor | None]):
    """The buckets of group ``gi`` (creating missing state), and whether they may be cached."""
    name = type(optimizer).__name__
    buckets: dict[tuple, Bucket] = {}
    keys = optimizer.state_keys(group)
    cacheable = True
    for pi, (p, g) in enumerate(zip(group["params"], grads)):
        if g is None:
            continue
        where = f"param_groups[{gi}]['params'][{pi}]"
        if g.is_sparse:
            raise RuntimeError(f"fastopt.{name} does not support sparse gradients ({where})")
        optimizer.check_param(p, where)
        optimizer.init_state(p, group)
        state = optimizer.state[p]
        # The ops mutate p in place under no_grad; p itself (not a detached
        # alias) is passed so that a later `p.data = ...` is seen.
        held = [state[k] for k in keys]
        master_key = optimizer.master_key(p)
        master = state.get(master_key) if master_key is not None else None
        if master is not None:
            held.append(master)
        domain = _distributed.domain_of(p, g, optimizer.process_group, where)
        tensors = [_distributed.local(t) for t in [p, g, *held]]
        if torch.is_complex(p):
            tensors = [torch.view_as_real(t.detach()) for t in tensors]
            cacheable = False
        dense = all(t.is_contiguous() for t in tensors)
        moments = held[0].dtype if held else None
        key = (p.device, tensors[0].dtype, tensors[1].dtype, master_key if master is not None
               else None, moments, dense, domain)  # fmt: skip
        bucket = buckets.get(key)
        if bucket is None:
            fast = dense and backends.fast_dtypes(tensors[0].dtype, tensors[1].dtype)
            backend = optimizer.backend if fast else "reference"
            impl = backends.resolve(backend, p.device, tensors[0].dtype, tensors[1].dtype)
            bucket = buckets[key] = Bucket(backend, tensors[1].dtype, dense, domain)
            bucket.impl = impl
            if state["step"].is_cpu:
                bucket.steps_add = getattr(impl, "steps_add_", None)
        bucket.params.append(tensors[0])
        bucket.originals.append(p)
        bucket.grads.append(tensors[1])
        names = keys + ((master_key,) if master is not None else ())
        for k, t, h in zip(names, tensors[2:], held):
            # Remainders travel in the ops' master list (NOTE [master remainder]).
            bucket.states[_MASTER_LIST.get(k, k)].append(t)
            bucket.held[k].append(h)
        bucket.steps.append(state["step"])
        bucket.indices.append(pi)
        bucket.state_dicts.append(state)
    return buckets, cacheable


def gather_uncached(optimizer, flags: tuple) -> list[tuple[dict[str, Any], Bucket]]:
    """``Gatherer.gather`` without the cache or the C++ plan: the buckets built
    afresh. What a step traced by torch.compile runs (dynamo guards on the
    parameters and states it reads, which is the cache's job in eager)."""
    out = []
    for gi, group in enumerate(optimizer.param_groups):
        buckets, _ = build_buckets(optimizer, gi, group, [p.grad for p in group["params"]])
        out.extend((group, b) for b in buckets.values())
    return out
