"""What every fastopt optimizer shares: construction flags, state creation, the step plan.

Each optimizer's ``step()`` (fastopt/adamw.py, lion.py, ademamix.py) reads::

    plan = self._plan_step()                 # gather, global-norm pass, skip decision
    for group, bucket in plan.buckets:
        with plan.updating(bucket):          # step counters +1 (undone if the update raises)
            adamw(bucket.params, bucket.grads, ..., **plan.transform_args, backend=bucket.backend)

The pieces live in their own modules: gathering in fastopt/_gather.py, the
global-norm pass in fastopt/_norm.py, state-dict compatibility in
fastopt/_state.py.

NOTE [no host sync in step]
On a GPU the norm, the clip coefficient, the skip flag and the step counters
stay device-side; the kernels read them. Only CPU tensors are ever read on the
host (there a read is free and lets a skipped step return early).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import Tensor

from fastopt import _compressed, _distributed, _norm, _state, backends
from fastopt._gather import Bucket, Gatherer, build_buckets, gather_uncached

_LOW_PRECISION = (torch.bfloat16, torch.float16)


def validate_common(
    lr: Any, weight_decay: float, betas: tuple, max_grad_norm: Any, max_grad_value: Any,
    n_betas: int = 2,
) -> None:  # fmt: skip
    """torch's ValueErrors for the hyperparameters every optimizer shares."""
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
    if len(betas) != n_betas:
        raise ValueError(f"betas must have {n_betas} values, got {betas!r}")
    for i, beta in enumerate(betas):
        value = float(beta)
        if not 0.0 <= value < 1.0:
            raise ValueError(f"Invalid beta parameter at index {i}: {beta}")
    for name, value in (("max_grad_norm", max_grad_norm), ("max_grad_value", max_grad_value)):
        if value is None:
            continue
        if not (isinstance(value, (int, float)) and math.isfinite(value)):
            raise ValueError(f"{name} must be a finite number or None, got {value!r}")
        if value <= 0:
            raise ValueError(f"{name} must be positive, got {value}")


class StepPlan:
    """One step's buckets and gradient transform; ``updating`` keeps the counters right."""

    def __init__(
        self, buckets: list[tuple[dict[str, Any], Bucket]], transform: _norm.GradTransform
    ) -> None:
        self.buckets = buckets
        self.transform = transform
        t = transform
        self.transform_args = dict(
            grad_mul=t.grad_mul, max_grad_value=t.max_grad_value, clip_coef=t.clip_coef,
            skip=t.skip,
        )  # fmt: skip

    @contextmanager
    def updating(self, bucket: Bucket) -> Iterator[None]:
        """Advance the bucket's step counters by one (by 1 - skip on a device), and
        undo that if the update raises: the ops check everything before they write,
        so the bucket's state is then as it was."""
        skip = self.transform.skip
        increment = 1.0 if skip is None else 1.0 - skip.to(bucket.device)
        add_to_steps(bucket, increment)
        try:
            yield
        except BaseException:
            add_to_steps(bucket, -increment)
            raise


def run_closure(closure) -> Any:
    """The closure's loss, computed with autograd on (step() itself runs under no_grad)."""
    if closure is None:
        return None
    with torch.enable_grad():
        return closure()


def add_to_steps(bucket: Bucket, value: float | Tensor) -> None:
    """NOTE [step counters]: torch's `step` is one float32 scalar tensor per
    parameter. On the CPU torch._foreach_add_ over thousands of them dispatches
    once per tensor, which costs more than a fused update of small tensors; the
    C++ plan (or, unplanned, the compiled ``steps_add_`` op) adds to them in one
    C++ loop instead."""
    if isinstance(value, Tensor) and torch.compiler.is_compiling():
        # (traced, the one-tensor overload would read the increment on the host)
        torch._foreach_add_(bucket.steps, [value] * len(bucket.steps))
    elif bucket.native is not None:
        if isinstance(value, Tensor):
            bucket.native.add_steps_tensor(value)
        else:
            bucket.native.add_steps(value)
    elif isinstance(value, float) and bucket.steps_add is not None:
        bucket.steps_add(bucket.steps, value)
    else:
        torch._foreach_add_(bucket.steps, value)


class FusedOptimizer(torch.optim.Optimizer):
    """Base of fastopt's optimizers. Subclasses define the state keys and ``step``."""

    # GradScaler's fused-optimizer protocol: the scaler sets ``grad_scale`` (the
    # loss scale) and ``found_inf`` on the optimizer and calls step(); unscaling
    # and the skip happen inside the norm pass and the update kernel.
    _step_supports_amp_scaling = True

    # Names of the per-parameter moment tensors, in the order the functional API takes them.
    _moment_keys: tuple[str, ...] = ()

    def __init__(
        self,
        params: Iterable,
        defaults: dict[str, Any],
        *,
        max_grad_norm: float | None,
        max_grad_value: float | None,
        master_weights: bool | str,
        backend: str,
        process_group=None,
        state_dtype=None,
    ) -> None:
        backends.check(backend)
        # NOTE [global norm over shards]: the group over which the norm and the
        # skip are reduced for plain (non-DTensor) parameters.
        self.process_group = process_group
        self.backend = backend
        self.max_grad_norm = None if max_grad_norm is None else float(max_grad_norm)
        self.max_grad_value = None if max_grad_value is None else float(max_grad_value)
        self.master_weights = _compressed.parse_master_weights(master_weights)
        # The moments' storage (SPEC §8); None: the policy of ``state_dtype(p)``.
        self.moment_dtype = _compressed.parse_state_dtype(state_dtype)
        self.last_grad_norm: Tensor | None = None
        super().__init__(params, defaults)
        self._make_counters()

    # ---- counters -----------------------------------------------------------------
    # NOTE [counters in param groups]
    # The step counters live in every param group (``attempted_steps``,
    # ``skipped_steps``; the same objects in each), not in attributes or extra
    # top-level state-dict keys: DCP's get/set_optimizer_state_dict and
    # ZeroRedundancyOptimizer's consolidation keep the param groups and drop
    # anything else. In a step they are int64 0-dim tensors on the parameters'
    # device, advanced in place: a GPU step counts without a sync, and a step
    # traced by torch.compile or replayed from a CUDA graph counts exactly as an
    # eager one (a Python int would be frozen into the graph). state_dict()
    # writes them as ints; reading ``applied_steps`` reads the device.

    def _counter(self, key: str) -> Tensor | int:
        return self.param_groups[0].get(key, 0) if self.param_groups else 0

    def _set_counter(self, key: str, value: Tensor | int) -> None:
        for group in self.param_groups:
            group[key] = value

    def _counters(self, device: torch.device) -> tuple[Tensor, Tensor]:
        """(attempted, skipped) as int64 0-dim tensors on ``device``, moved or made
        from whatever the groups hold (ints after a load, another device)."""
        attempted, skipped = self._counter("attempted_steps"), self._counter("skipped_steps")
        if not (
            isinstance(attempted, Tensor) and attempted.device == device
            and isinstance(skipped, Tensor) and skipped.device == device
            and self.param_groups[-1].get("skipped_steps") is skipped
        ):  # fmt: skip
            attempted = torch.as_tensor(attempted, dtype=torch.int64).to(device).clone()
            skipped = torch.as_tensor(skipped, dtype=torch.int64).to(device).clone()
            self._set_counter("attempted_steps", attempted)
            self._set_counter("skipped_steps", skipped)
        return attempted, skipped

    def _make_counters(self) -> None:
        """The counter tensors, on the first parameter's device, made outside any step:
        a step traced by torch.compile then only advances them (a write into a
        param group inside a trace would be replayed with dynamo's own edits of
        the group, and a guard on an int would not match the tensor after)."""
        if not self.param_groups:
            return
        params = [p for g in self.param_groups for p in g["params"]]
        device = _distributed.local(params[0]).device if params else torch.device("cpu")
        self._counters(device)

    def _assign_counter(self, key: str, value: int) -> None:
        # in place when a tensor: a captured CUDA graph keeps its address
        current = self._counter(key)
        if isinstance(current, Tensor) and self.param_groups[-1].get(key) is current:
            current.fill_(int(value))
        else:
            self._set_counter(key, int(value))

    _attempted_steps = property(
        lambda self: int(self._counter("attempted_steps")),
        lambda self, v: self._assign_counter("attempted_steps", v),
    )
    _skipped_steps = property(
        lambda self: int(self._counter("skipped_steps")),
        lambda self, v: self._assign_counter("skipped_steps", v),
    )

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        counters = {k: self._counter(k) for k in ("attempted_steps", "skipped_steps")}
        super().add_param_group(param_group)
        for key, value in counters.items():
            self.param_groups[-1].setdefault(key, value)

    @property
    def skipped_steps(self) -> int:
        """Steps skipped because a gradient (or the norm) was not finite.

        On a GPU the count lives on the device; reading it synchronises.
        """
        return self._skipped_steps

    @property
    def applied_steps(self) -> int:
        """Steps that updated the parameters (skipped steps excluded)."""
        return self._attempted_steps - self._skipped_steps

    # ---- per-parameter state ---------------------------------------------------------

    def uses_master(self, p: Tensor) -> bool:
        """Whether the update of ``p`` runs on a master (fp32, or bf16 + remainder)."""
        return self.master_weights is not False and p.dtype in _LOW_PRECISION

    def uses_remainder(self, p: Tensor) -> bool:
        """NOTE [master remainder]: bf16 params under ``master_weights="remainder"``
        (fp16 params keep an fp32 master: their bits are not fp32's upper half)."""
        return self.master_weights == "remainder" and p.dtype == torch.bfloat16

    def master_key(self, p: Tensor) -> str | None:
        """The state key of ``p``'s master: ``master_param``, ``master_remainder`` or None."""
        if not self.uses_master(p):
            return None
        return _compressed.REMAINDER_KEY if self.uses_remainder(p) else _compressed.MASTER_KEY

    def state_dtype(self, p: Tensor) -> torch.dtype:
        """The moments' storage: ``state_dtype=`` when given (real params), else fp32
        under master weights and the param's dtype otherwise. ``"int8"`` is
        ``torch.uint8`` (codes and block scales, NOTE [int8 moments]) for a tensor of
        at least ``Q8_MIN_NUMEL`` elements (whole-tensor count, the same on every
        rank of a sharded run) and fp32 below."""
        if self.moment_dtype is not None and not torch.is_complex(p):
            if self.moment_dtype == "int8":
                if p.numel() >= _compressed.Q8_MIN_NUMEL and p.dtype != torch.float64:
                    return _compressed.Q8
                return torch.float32
            return self.moment_dtype
        return torch.float32 if self.uses_master(p) else p.dtype

    def state_keys(self, group: dict[str, Any]) -> tuple[str, ...]:
        """The moment tensors of a parameter of ``group``, in functional-API order."""
        return self._moment_keys

    def check_param(self, p: Tensor, where: str) -> None:
        """Hook for per-parameter type checks at step time (Lion rejects complex)."""

    def step_tensor(self, p: Tensor, value: float = 0.0) -> Tensor:
        # torch keeps `step` as a float32 scalar on the CPU for CPU params; on a
        # GPU we keep it on the device so the kernels read it without a sync.
        device = p.device if p.device.type != "cpu" else torch.device("cpu")
        return torch.tensor(float(value), dtype=torch.float32, device=device)

    def init_state(self, p: Tensor, group: dict[str, Any]) -> None:
        state = self.state[p]
        if "step" not in state:
            state["step"] = self.step_tensor(p)
        for key in self.state_keys(group):
            if key not in state:
                dtype = self.state_dtype(p)
                if dtype == _compressed.Q8:
                    if key == "max_exp_avg_sq":
                        raise ValueError(
                            "amsgrad is not supported with state_dtype='int8': the running "
                            "maximum would be re-rounded every step; use bf16 or fp32 moments"
                        )
                    # a DTensor's shard keeps a plain local state (fastopt/_state.py
                    # turns it into a DTensor of fp32 values in state_dict())
                    local = _distributed.local(p)
                    state[key] = _compressed.q8_zeros(local.numel(), local.device)
                else:
                    state[key] = torch.zeros_like(
                        p, dtype=dtype, memory_format=torch.preserve_format
                    )
        key = self.master_key(p)
        if key is not None and key not in state:
            state[key] = _state.initial_master(p, key)

    def _init_group(self, group: dict[str, Any]) -> None:
        """Create the state of every parameter of ``group`` that has a gradient, and
        resolve its backends (by building its buckets once, then dropping them).

        The name is torch's: torch.compile's optimizer support runs a method of
        this name eagerly while tracing, so the first compiled step does not
        trace (and then recompile on) state creation or the resolver's cache."""
        gi = next(i for i, g in enumerate(self.param_groups) if g is group)
        build_buckets(self, gi, group, [p.grad for p in group["params"]])

    # ---- the step ---------------------------------------------------------------------

    def _capturable(self) -> bool:
        """``capturable=True`` in any group: never read a device value on the host
        (NOTE [capturable steps])."""
        return any(g.get("capturable", False) for g in self.param_groups)

    def _plan_step(self) -> StepPlan:
        """Gather the buckets, run the global-norm pass when clipping or loss scaling
        asks for one, and decide the skip. A step known (on the CPU) to be skipped
        comes back with no buckets.

        NOTE [capturable steps]
        Traced by torch.compile, or with ``capturable=True``, the skip flag is never
        read on the host: it travels to the kernels as a tensor and every counter
        advances by it, so the step is one straight line of device work (what a
        CUDA graph can capture and replay). Eager CPU steps read it (a free read)
        and return early from a skipped step.
        """
        compiling = torch.compiler.is_compiling()
        if compiling:
            # dynamo runs _init_group eagerly (as for torch's optimizers), then
            # traces the plain gather and guards on what it read
            for group in self.param_groups:
                self._init_group(group)
            work = gather_uncached(self, (self.backend, self.master_weights))
        else:
            gatherer = self.__dict__.get("_gatherer")
            if gatherer is None:
                gatherer = self.__dict__["_gatherer"] = Gatherer()
            work = gatherer.gather(self, (self.backend, self.master_weights))
        if not work and self.process_group is None:
            return StepPlan([], _norm.GradTransform())
        device = work[0][1].device if work else torch.device("cpu")
        attempted, skipped = self._counters(device)
        attempted.add_(1)
        grad_scale = getattr(self, "grad_scale", None)
        found_inf = getattr(self, "found_inf", None)
        if not _norm.needs_norm(self.max_grad_norm, grad_scale, found_inf):
            self.last_grad_norm = None
            return StepPlan(work, _norm.GradTransform(max_grad_value=self.max_grad_value))
        inv_scale = _norm.inverse_scale(grad_scale, device)
        sumsqs = [(b.domain, b.sumsq(inv_scale, self.max_grad_value)) for _, b in work]
        if self.process_group is not None:
            # Every rank joins the reduction, also one whose shard had no gradients.
            sumsqs.append((("group", self.process_group), torch.zeros((), device=device)))
        transform = _norm.grad_transform(
            sumsqs,
            inv_scale=inv_scale,
            max_grad_norm=self.max_grad_norm,
            max_grad_value=self.max_grad_value,
            found_inf=found_inf,
            reduce=_distributed.reduce_sums,
        )
        self.last_grad_norm = transform.norm
        skip = transform.skip
        if found_inf is not None:
            # Report what the norm pass found back to the scaler (see fastopt.GradScaler).
            found_inf.copy_(torch.maximum(found_inf, skip.to(found_inf.device)))
        if skip.device.type == "cpu" and not compiling and not self._capturable():
            if skip.item() != 0:
                skipped.add_(1)
                return StepPlan([], transform)
            # Known finite: the kernels need not read a flag.
            return StepPlan(work, _norm.GradTransform(
                transform.grad_mul, transform.max_grad_value, transform.clip_coef, None,
                transform.norm,
            ))  # fmt: skip
        skipped.add_(skip.to(device=skipped.device, dtype=torch.int64))
        return StepPlan(work, transform)

    # ---- state dict -------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        return _state.save(self, super().state_dict())

    def torch_state_dict(self) -> dict[str, Any]:
        """A plain torch.optim state dict (no masters or remainders, fp32 moments, no
        counters) that ``torch.optim.AdamW.load_state_dict`` takes (fastopt/_state.py)."""
        return _state.to_torch(self.state_dict(), _state._params(self))

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load a fastopt or torch.optim state dict (see fastopt/_state.py)."""
        _state.load(self, state_dict, super().load_state_dict)

    # ---- pickling / deepcopy ------------------------------------------------------------

    _FLAGS = dict(backend="auto", max_grad_norm=None, max_grad_value=None, master_weights=False,
                  moment_dtype=None, process_group=None, last_grad_norm=None)  # fmt: skip

    def __getstate__(self) -> dict[str, Any]:
        state = super().__getstate__()
        state.update({key: getattr(self, key) for key in self._FLAGS})
        # A process group belongs to this process: a copy or an unpickled
        # optimizer reduces over nothing until it is given one again.
        state["process_group"] = None
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        # torch's load_state_dict also calls __setstate__ (with state and groups
        # only): construction flags already on the object must survive it.
        for key, value in self._FLAGS.items():
            if key not in state and key not in self.__dict__:
                state[key] = value
        state.pop("_gatherer", None)
        super().__setstate__(state)
        self.__dict__.pop("_gatherer", None)
        for group in self.param_groups:
            for key, value in self.defaults.items():
                group.setdefault(key, value)
            group.setdefault("attempted_steps", 0)
            group.setdefault("skipped_steps", 0)
        self._make_counters()
