"""What AdamW and Lion share: gathering, the global-norm pass, skipping, state I/O.

``FusedOptimizer.step`` does only bookkeeping on the host: it gathers the
tensors of each param group into lists per (device, dtype) bucket, runs one
global-norm pass when clipping or loss scaling asks for it, folds unscaling
and clipping into one gradient multiplier, and hands each bucket to the
backend function resolved by :func:`fastopt.backends.resolve`.

NOTE [no host sync in step]
On a GPU the norm, the clip coefficient, the skip flag and the step counters
stay device-side; the kernels read them. Only CPU tensors are ever read on the
host (there a read is free and lets a skipped step return early).

NOTE [contiguous fast path]
The compiled backends walk flat memory, so they only receive tensors whose
parameter, gradient and state are all contiguous. Anything else (a transposed
view registered as a parameter, say) goes to the reference backend, which
handles any layout. Correct first; such parameters are rare. float64 parameters
(and complex128) also go to the reference, which computes them in float64.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Iterable
from itertools import chain
from operator import attrgetter, is_, methodcaller
from typing import Any

import torch
from torch import Tensor

from fastopt import backends

_LOW_PRECISION = (torch.bfloat16, torch.float16)
_DTYPE = attrgetter("dtype")
_IS_SPARSE = attrgetter("is_sparse")
_GRAD = attrgetter("grad")


def _validate_common(lr: Any, weight_decay: float, betas: tuple, max_grad_norm: Any) -> None:
    if isinstance(lr, Tensor):
        if lr.numel() != 1:
            raise ValueError("Tensor lr must be 1-element")
        lr_value = float(lr.detach().reshape(()).item())
    else:
        lr_value = lr
    if not 0.0 <= lr_value:
        raise ValueError(f"Invalid learning rate: {lr}")
    if not 0.0 <= weight_decay:
        raise ValueError(f"Invalid weight_decay value: {weight_decay}")
    if len(betas) != 2:
        raise ValueError(f"betas must be a pair, got {betas!r}")
    for i, beta in enumerate(betas):
        value = float(beta)
        if not 0.0 <= value < 1.0:
            raise ValueError(f"Invalid beta parameter at index {i}: {beta}")
    if max_grad_norm is not None:
        if not (isinstance(max_grad_norm, (int, float)) and math.isfinite(max_grad_norm)):
            raise ValueError(f"max_grad_norm must be a finite number or None, got {max_grad_norm!r}")
        if max_grad_norm <= 0:
            raise ValueError(f"max_grad_norm must be positive, got {max_grad_norm}")


class _Bucket:
    """The tensors of one param group that share a device, dtype and layout class."""

    __slots__ = ("backend", "params", "grads", "states", "steps", "indices", "state_dicts",
                 "grad_dtype", "dense")

    def __init__(self, backend, grad_dtype, dense):
        self.backend = backend
        self.grad_dtype = grad_dtype
        self.dense = dense
        self.params: list[Tensor] = []
        self.grads: list[Tensor] = []
        self.states: dict[str, list[Tensor]] = defaultdict(list)
        self.steps: list[Tensor] = []
        self.indices: list[int] = []  # positions in group["params"]
        self.state_dicts: list[dict] = []

    def refresh(self, grads: list[Tensor | None], optimizer_state) -> bool:
        """Re-take this step's gradients; False if anything the cache relied on changed.

        Written with map() over C-level callables: this runs every step for every
        parameter, and a generator expression costs several times more per element.
        """
        gl = list(map(grads.__getitem__, self.indices))
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
        if not all(map(is_, map(optimizer_state.get, self.params), self.state_dicts)):
            return False
        for key, tensors in self.states.items():
            if not all(map(is_, map(methodcaller("get", key), self.state_dicts), tensors)):
                return False
        if not all(map(is_, map(methodcaller("get", "step"), self.state_dicts), self.steps)):
            return False
        self.grads = gl
        return True


class _GatherCache:
    """NOTE [gather cache]
    Sorting thousands of parameters into buckets costs tens of microseconds
    each in Python, more than the fused kernel itself for small tensors. The
    buckets of a group are kept while the group's parameter list, the set of
    parameters that have gradients, the construction flags and every state
    tensor (checked by identity) stay the same; each step only re-reads
    ``.grad`` and checks it (sparse, dtype, layout). Any change rebuilds.
    Groups with complex parameters are not cached (their real views would go
    stale if ``.data`` were replaced).
    """

    __slots__ = ("params", "members", "mask", "flags", "buckets")

    def __init__(self, params, mask, flags, buckets):
        self.params, self.mask, self.flags, self.buckets = params, mask, flags, buckets
        self.members = list(params)  # a parameter swapped into the same list is a change


class FusedOptimizer(torch.optim.Optimizer):
    """Base of fastopt's optimizers. Subclasses define the state and the update."""

    # GradScaler's fused-optimizer protocol: the scaler sets ``grad_scale`` and
    # ``found_inf`` on the optimizer and calls step(); unscaling and the skip
    # happen here, inside the norm pass and the update kernel.
    _step_supports_amp_scaling = True

    # Names of the per-parameter moment tensors, in the order the backend takes them.
    _moment_keys: tuple[str, ...] = ()

    def __init__(
        self,
        params: Iterable,
        defaults: dict[str, Any],
        *,
        max_grad_norm: float | None,
        master_weights: bool,
        backend: str,
    ) -> None:
        backends.check(backend)
        self.backend = backend
        self.max_grad_norm = None if max_grad_norm is None else float(max_grad_norm)
        self.master_weights = bool(master_weights)
        self.last_grad_norm: Tensor | None = None
        self._skipped_steps: Tensor | int = 0
        self._attempted_steps = 0
        super().__init__(params, defaults)

    # ---- counters ---------------------------------------------------------------

    @property
    def skipped_steps(self) -> int:
        """Steps skipped because a gradient (or the norm) was not finite.

        On a GPU the count lives on the device; reading it synchronises.
        """
        s = self._skipped_steps
        return int(s.item()) if isinstance(s, Tensor) else int(s)

    @property
    def applied_steps(self) -> int:
        """Steps that updated the parameters (skipped steps excluded)."""
        return self._attempted_steps - self.skipped_steps

    # ---- helpers subclasses use ----------------------------------------------------

    def _uses_master(self, p: Tensor) -> bool:
        return self.master_weights and p.dtype in _LOW_PRECISION

    def _state_dtype(self, p: Tensor) -> torch.dtype:
        return torch.float32 if self._uses_master(p) else p.dtype

    def _step_tensor(self, p: Tensor, value: float = 0.0) -> Tensor:
        # torch keeps `step` as a float32 scalar on the CPU for CPU params; on a
        # GPU we keep it on the device so the kernels read it without a sync.
        device = p.device if p.device.type != "cpu" else torch.device("cpu")
        return torch.tensor(float(value), dtype=torch.float32, device=device)

    def _init_state(self, p: Tensor, group: dict[str, Any]) -> None:
        state = self.state[p]
        if "step" not in state:
            state["step"] = self._step_tensor(p)
        for key in self._required_state_keys(group):
            if key not in state:
                state[key] = torch.zeros_like(
                    p, dtype=self._state_dtype(p), memory_format=torch.preserve_format
                )
        if self._uses_master(p) and "master_param" not in state:
            state["master_param"] = p.detach().float().clone(memory_format=torch.preserve_format)

    def _required_state_keys(self, group: dict[str, Any]) -> tuple[str, ...]:
        return self._moment_keys

    def _check_param(self, p: Tensor, where: str) -> None:
        """Hook for per-parameter type checks at step time (Lion rejects complex)."""

    # ---- gathering ----------------------------------------------------------------

    def _gather(self) -> list[tuple[dict[str, Any], dict[tuple, _Bucket]]]:
        out = []
        cache = self.__dict__.setdefault("_gather_cache", {})
        for gi, group in enumerate(self.param_groups):
            params = group["params"]
            grads = list(map(_GRAD, params))
            mask = [g is not None for g in grads]
            flags = (self.backend, self.master_weights, self._required_state_keys(group))
            entry = cache.get(gi)
            buckets = None
            if (
                entry is not None
                and entry.params is params
                and entry.flags == flags
                and entry.mask == mask  # equal lengths, so zip below compares all
                and all(map(is_, entry.members, params))
                and all(b.refresh(grads, self.state) for b in entry.buckets.values())
            ):
                buckets = entry.buckets
            else:
                buckets, cacheable = self._build_buckets(gi, group, grads)
                cache[gi] = _GatherCache(params, mask, flags, buckets) if cacheable else None
            if buckets:
                out.append((group, buckets))
        for gi in [k for k in cache if k >= len(self.param_groups)]:
            del cache[gi]
        return out

    def _build_buckets(self, gi: int, group: dict[str, Any], grads: list[Tensor | None]):
        name = type(self).__name__
        buckets: dict[tuple, _Bucket] = {}
        keys = self._required_state_keys(group)
        cacheable = True
        for pi, (p, g) in enumerate(zip(group["params"], grads)):
            if g is None:
                continue
            where = f"param_groups[{gi}]['params'][{pi}]"
            if g.is_sparse:
                raise RuntimeError(f"fastopt.{name} does not support sparse gradients ({where})")
            self._check_param(p, where)
            self._init_state(p, group)
            state = self.state[p]
            # The ops mutate p in place under no_grad; p itself (not a detached
            # alias) is passed so that a later `p.data = ...` is seen.
            tensors = [p, g] + [state[k] for k in keys]
            master = state.get("master_param") if self._uses_master(p) else None
            if master is not None:
                tensors.append(master)
            if torch.is_complex(p):
                tensors = [torch.view_as_real(t.detach()) for t in tensors]
                cacheable = False
            dense = all(t.is_contiguous() for t in tensors)
            key = (p.device, tensors[0].dtype, master is not None, dense)
            bucket = buckets.get(key)
            if bucket is None:
                # float64 has no compiled kernels: it runs the reference in float64.
                fast = dense and tensors[0].dtype != torch.float64
                backend = backends.resolve(self.backend if fast else "reference", p.device)
                bucket = buckets[key] = _Bucket(backend, g.dtype, dense)
            bucket.params.append(tensors[0])
            bucket.grads.append(tensors[1])
            for k, t in zip(keys, tensors[2 : 2 + len(keys)]):
                bucket.states[k].append(t)
            if master is not None:
                bucket.states["master_param"].append(tensors[-1])
            bucket.steps.append(state["step"])
            bucket.indices.append(pi)
            bucket.state_dicts.append(state)
        return buckets, cacheable

    # ---- the global-norm pass -------------------------------------------------------

    def _norm_and_skip(
        self, work, grad_scale: Tensor | None, found_inf: Tensor | None
    ) -> tuple[Tensor | None, Tensor | None]:
        """Global norm, gradient multiplier and skip flag (all device-side 0-dim fp32).

        Returns ``(grad_mul, skip)``; both None when neither clipping nor loss
        scaling asks for a norm.
        """
        if self.max_grad_norm is None and grad_scale is None and found_inf is None:
            self.last_grad_norm = None
            return None, None
        partials = [
            bucket.backend.grad_sumsq(bucket.grads)
            for _, buckets in work
            for bucket in buckets.values()
        ]
        # Reduce on an accelerator when there is one; a copy to the CPU is never
        # non_blocking (the host would read it before it lands).
        device = next((t.device for t in partials if t.device.type != "cpu"), partials[0].device)
        nb = device.type != "cpu"
        total = torch.stack([t.to(device, non_blocking=nb) for t in partials]).double().sum()
        norm = total.sqrt()
        inv_scale = None
        if grad_scale is not None:
            # The reciprocal in double, as torch's GradScaler computes inv_scale.
            inv_scale = grad_scale.to(device).double().reciprocal().float()
            norm = norm * inv_scale.double()
        norm = norm.float()
        self.last_grad_norm = norm
        skip = (~torch.isfinite(norm)).float()
        if found_inf is not None:
            found_inf_here = found_inf.to(device)
            skip = torch.maximum(skip, (found_inf_here != 0).float())
            # Report what the norm pass found back to the scaler (see fastopt.GradScaler).
            found_inf.copy_(torch.maximum(found_inf, skip.to(found_inf.device)))
        grad_mul = inv_scale
        if self.max_grad_norm is not None:
            coef = (self.max_grad_norm / (norm + 1e-6)).clamp(max=1.0)
            grad_mul = coef if grad_mul is None else grad_mul * coef
        if grad_mul is None:
            grad_mul = torch.ones((), dtype=torch.float32, device=device)
        return grad_mul, skip

    # ---- step -----------------------------------------------------------------------

    @torch.no_grad()
    def step(self, closure=None):
        """Perform one optimization step; returns the closure's loss if given."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        work = self._gather()
        if not work:
            return loss
        grad_scale = getattr(self, "grad_scale", None)
        found_inf = getattr(self, "found_inf", None)
        grad_mul, skip = self._norm_and_skip(work, grad_scale, found_inf)
        self._attempted_steps += 1
        if skip is not None:
            if skip.device.type == "cpu":
                if skip.item() != 0:
                    self._skipped_steps = self._skipped_steps + 1
                    return loss
                skip = None  # known finite: the kernels need not read a flag
            else:
                if not isinstance(self._skipped_steps, Tensor):
                    self._skipped_steps = torch.tensor(
                        float(self._skipped_steps), device=skip.device
                    )
                self._skipped_steps.add_(skip.to(self._skipped_steps.device))
        for group, buckets in work:
            for bucket in buckets.values():
                device = bucket.params[0].device
                nb = device.type != "cpu"  # never an async copy the host then reads
                bucket_skip = None if skip is None else skip.to(device, non_blocking=nb)
                increment = 1.0 if bucket_skip is None else 1.0 - bucket_skip
                self._add_to_steps(bucket, increment)
                bucket_mul = None if grad_mul is None else grad_mul.to(device, non_blocking=nb)
                try:
                    self._update(group, bucket, bucket_mul, bucket_skip)
                except BaseException:
                    # The ops check everything before they write, so undoing the
                    # increment leaves this bucket's state as it was.
                    self._add_to_steps(bucket, -increment)
                    raise
        return loss

    @staticmethod
    def _add_to_steps(bucket: _Bucket, value: float | Tensor) -> None:
        """NOTE [step counters]: torch's `step` is one float32 scalar tensor per
        parameter. On the CPU torch._foreach_add_ over thousands of them
        dispatches once per tensor, which costs more than a fused update of
        small tensors; the cpu backend adds to them in one C++ loop instead."""
        steps_add_ = getattr(bucket.backend, "steps_add_", None)
        if steps_add_ is not None and isinstance(value, float) and bucket.steps[0].is_cpu:
            steps_add_(bucket.steps, value)
        else:
            torch._foreach_add_(bucket.steps, value)

    def _update(self, group, bucket: _Bucket, grad_mul: Tensor | None, skip: Tensor | None):
        raise NotImplementedError

    @staticmethod
    def _group_lr(group: dict[str, Any], device: torch.device) -> float | Tensor:
        lr = group["lr"]
        if isinstance(lr, Tensor) and lr.device != device:
            lr = lr.to(device, non_blocking=device.type != "cpu")
        return lr

    # ---- state dict -------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        sd = super().state_dict()
        sd["fastopt"] = {
            "skipped_steps": self.skipped_steps,
            "attempted_steps": self._attempted_steps,
        }
        return sd

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load a fastopt or torch.optim state dict.

        torch's loader casts every floating state tensor to its parameter's
        dtype, which would turn fp32 masters and fp32 moments of a bf16
        parameter into bf16. After it runs, the states are re-taken from the
        saved tensors with this optimizer's dtype policy, bit for bit. Loading
        never changes this optimizer's own flags (backend, master_weights,
        max_grad_norm).
        """
        saved_state = state_dict["state"]
        saved_ids = list(chain.from_iterable(g["params"] for g in state_dict["param_groups"]))
        extra = state_dict.get("fastopt")
        plain = {k: v for k, v in state_dict.items() if k != "fastopt"}
        super().load_state_dict(plain)
        params = list(chain.from_iterable(g["params"] for g in self.param_groups))
        group_of = {id(p): g for g in self.param_groups for p in g["params"]}
        for saved_id, p in zip(saved_ids, params):
            if saved_id not in saved_state:
                continue
            src = saved_state[saved_id]
            state = self.state[p]
            for key, value in src.items():
                if key == "step":
                    state["step"] = self._step_tensor(p, float(value))
                elif key == "master_param":
                    continue
                elif isinstance(value, Tensor) and (value.is_floating_point() or value.is_complex()):
                    state[key] = value.to(device=p.device, dtype=self._state_dtype(p), copy=True)
            if self._uses_master(p):
                master = src.get("master_param")
                state["master_param"] = (
                    master.to(device=p.device, dtype=torch.float32, copy=True)
                    if master is not None
                    else p.detach().float().clone(memory_format=torch.preserve_format)
                )
            else:
                state.pop("master_param", None)
            self._init_state(p, group_of[id(p)])
        if extra is not None:
            self._skipped_steps = int(extra.get("skipped_steps", 0))
            self._attempted_steps = int(extra.get("attempted_steps", 0))
        else:
            # A torch checkpoint: torch does not advance `step` on skipped steps,
            # so the largest step is the number of applied steps.
            steps = [float(s["step"]) for s in self.state.values() if "step" in s]
            self._skipped_steps = 0
            self._attempted_steps = int(max(steps)) if steps else 0

    # ---- pickling / deepcopy ------------------------------------------------------------

    def __getstate__(self) -> dict[str, Any]:
        state = super().__getstate__()
        state.update(
            backend=self.backend,
            max_grad_norm=self.max_grad_norm,
            master_weights=self.master_weights,
            last_grad_norm=self.last_grad_norm,
            _skipped_steps=self._skipped_steps,
            _attempted_steps=self._attempted_steps,
        )
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        # torch's load_state_dict also calls __setstate__ (with state and groups
        # only): construction flags already on the object must survive it.
        defaults = dict(backend="auto", max_grad_norm=None, master_weights=False,
                        last_grad_norm=None, _skipped_steps=0, _attempted_steps=0)
        for key, value in defaults.items():
            if key not in state and key not in self.__dict__:
                state[key] = value
        super().__setstate__(state)
        for group in self.param_groups:
            for key, value in self.defaults.items():
                group.setdefault(key, value)
