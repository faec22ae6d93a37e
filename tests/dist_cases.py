"""Training runs for tests/test_distributed.py: sharded on every rank of a pool, or single-process.

Every function whose name does not start with ``_`` is a *case*: it runs on
every rank of a ``dist_pool.Pool`` (gloo on CPU) and returns a dict, whose
tensors (full parameters, states and gradients, gathered with
``full_tensor()``) only rank 0 fills in. ``reference`` runs the same recipe in
one process on the full model and the full global batch, as the comparison.

The models are tiny and shaped to make shards uneven and empty: ``MLP``'s
``fc1`` has 13 rows (7/6 over 2 ranks, 4/4/4/1 over 4), ``fc2`` 5 rows
(3/2 and 2/2/1/0) and ``head`` one row (empty on every rank but the first).
Step ``s`` of every run uses the global batch ``batch(s)``; a data-parallel
rank reads its own slice of it.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

import fastopt
from fastopt._distributed import is_dtensor

# FASTOPT_TEST_BACKEND=reference runs the suite on the reference backend (the
# default, "auto", is the cpu backend where it is built).
BACKEND = os.environ.get("FASTOPT_TEST_BACKEND", "auto")
BATCH = 8  # divisible by every data-parallel size used (1, 2, 4)
D_IN = 7


class MLP(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(D_IN, 13)
        self.fc2 = nn.Linear(13, 5)
        self.head = nn.Linear(5, 1)

    def forward(self, x):
        return self.head(torch.tanh(self.fc2(torch.tanh(self.fc1(x)))))


class TPNet(nn.Module):
    """fc1 column-parallel, fc2 row-parallel (its bias replicated over tp), ``norm``
    with a weight replicated over tp, ``head`` data-parallel only."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(D_IN, 16)
        self.fc2 = nn.Linear(16, 6)
        self.norm = nn.LayerNorm(6)
        self.head = nn.Linear(6, 1)
        with torch.no_grad():  # not the identity: its gradient must matter
            self.norm.weight.uniform_(0.5, 1.5)
            self.norm.bias.uniform_(-0.5, 0.5)

    def forward(self, x):
        return self.head(self.norm(self.fc2(torch.relu(self.fc1(x)))))


class Wide(nn.Module):
    """fc1 is big enough for 8-bit moments (4480 >= Q8_MIN_NUMEL elements), and its
    FSDP2 shards do not end on 256-element blocks (2240 elements on 2 ranks)."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(D_IN, 640)
        self.head = nn.Linear(640, 1)

    def forward(self, x):
        return self.head(torch.tanh(self.fc1(x)))


MODELS = {"mlp": MLP, "tp": TPNet, "wide": Wide}


def build_model(name: str, dtype: torch.dtype = torch.float32, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return MODELS[name]().to(dtype)


def batch(step: int, dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1000 + step)
    x = torch.randn(BATCH, D_IN, generator=g)
    y = torch.randn(BATCH, 1, generator=g)
    return x.to(dtype), y.to(dtype)


def full(t: torch.Tensor) -> torch.Tensor:
    return t.full_tensor() if is_dtensor(t) else t


def local(t: torch.Tensor) -> torch.Tensor:
    return t._local_tensor if is_dtensor(t) else t


def make_optimizer(name: str, params, **kwargs):
    return getattr(fastopt, name)(params, backend=BACKEND, **kwargs)


def make_scaler(kind: str | None, *, distributed: bool):
    """``torch`` / ``sharded`` / ``fastopt`` GradScaler on the CPU (the reference, one
    process, runs ``sharded`` as torch's: ShardedGradScaler needs a process group)."""
    if kind is None:
        return None
    init = dict(init_scale=2.0**12, growth_interval=3)
    if kind == "sharded" and distributed:
        from torch.distributed.fsdp.sharded_grad_scaler import ShardedGradScaler

        return ShardedGradScaler("cpu", **init)
    if kind == "fastopt":
        return fastopt.GradScaler("cpu", **init)
    return torch.amp.GradScaler("cpu", **init)


# ---- the training loop every run shares ---------------------------------------------------


def _loop(
    model: nn.Module,
    opt,
    steps: range,
    *,
    dp_index: int,
    dp_size: int,
    dtype: torch.dtype,
    scaler=None,
    sched=None,
    inject: dict | None = None,
    record_grads: bool = False,
    torch_norms: bool = False,
    watch_step: int | None = None,
    core: Callable[[], Any] | None = None,
) -> dict[str, Any]:
    """Forward/backward on this rank's slice of each global batch, then the step.

    ``inject = {"step", "rank", "value", "param"}`` writes ``value`` into the first
    local element of that parameter's gradient on that rank only (a single-process
    run, rank 0, writes it into the full gradient). ``watch_step``: record whether
    that step left the local parameters and states bitwise unchanged.
    """
    rank = dist.get_rank() if dist.is_initialized() else 0
    named = {n.removeprefix("module."): p for n, p in model.named_parameters()}  # DDP's prefix
    core = core or (lambda: opt)
    out: dict[str, Any] = {
        "norms": [], "torch_norms": [], "grads": [], "scales": [], "lrs": [], "cache_entries": [],
    }  # fmt: skip
    rows = slice(dp_index * BATCH // dp_size, (dp_index + 1) * BATCH // dp_size)
    for s in steps:
        x, y = batch(s, dtype)
        loss = F.mse_loss(model(x[rows]), y[rows])
        (loss if scaler is None else scaler.scale(loss)).backward()
        if inject is not None and inject["step"] == s and inject["rank"] == rank:
            local(named[inject["param"]].grad).view(-1)[0] = float(inject["value"])
        if record_grads:
            out["grads"].append({n: full(p.grad).clone() for n, p in named.items()})
        before = _local_snapshot(core()) if s == watch_step else None
        if scaler is None:
            opt.step()
        else:
            scaler.step(opt)
            scaler.update()
            out["scales"].append(float(scaler.get_scale()))
        if before is not None:
            out["unchanged_bitwise"] = _bitwise_equal(before, _local_snapshot(core()))
        gatherer = core().__dict__.get("_gatherer")  # NOTE [gather cache] in fastopt/_gather.py
        out["cache_entries"].append(None if gatherer is None else id(gatherer._cache.get(0)))
        norm = core().last_grad_norm
        out["norms"].append(None if norm is None else float(full(norm)))
        if torch_norms:
            # after the step: fastopt never rewrites .grad, and with an infinite
            # max_norm clip_grad_norm_ multiplies by 1.
            out["torch_norms"].append(torch_grad_norm(model))
        if sched is not None:
            sched.step()
        out["lrs"].append(float(opt.param_groups[0]["lr"]))
        opt.zero_grad(set_to_none=True)
    return out


def torch_grad_norm(model: nn.Module) -> float:
    """What ``torch.nn.utils.clip_grad_norm_`` returns for ``model`` (``.full_tensor()``
    under DTensor). torch's clipping refuses parameters on different meshes (one
    ``torch.stack`` over all norms), as in FSDP2 + TP where some parameters live
    on the dp mesh only; then it runs once per mesh, with the norms combined as
    torch's documentation for that case says."""
    by_mesh: dict = {}
    for p in model.parameters():
        if p.grad is not None:
            by_mesh.setdefault(p.device_mesh if is_dtensor(p) else None, []).append(p)
    norms = [
        float(full(torch.nn.utils.clip_grad_norm_(params, float("inf"))))
        for params in by_mesh.values()
    ]  # fmt: skip
    return sum(n * n for n in norms) ** 0.5


def _local_snapshot(opt) -> list[tuple[str, bytes]]:
    """Every local parameter and state tensor of ``opt``, as raw bytes."""
    snap = []
    for group in opt.param_groups:
        for p in group["params"]:
            snap.append(("param", _raw(p)))
            for key, value in sorted(opt.state.get(p, {}).items()):
                if isinstance(value, torch.Tensor):
                    snap.append((key, _raw(value)))
    return snap


def _raw(t: torch.Tensor) -> bytes:
    t = local(t).detach().contiguous().reshape(-1)
    return t.view(torch.uint8).numpy().tobytes()


def _bitwise_equal(a, b) -> bool:
    return len(a) == len(b) and all(x == y for x, y in zip(a, b))


def _full_params_and_state(model: nn.Module, opt) -> dict[str, Any]:
    """Full parameters and optimizer states by name (collectives: every rank calls)."""
    params, state = {}, {}
    for n, p in model.named_parameters():
        params[n] = full(p.detach()).clone()
        state[n] = {
            k: full(v).clone() for k, v in sorted(opt.state.get(p, {}).items())
            if isinstance(v, torch.Tensor) and k != "step"
        }  # fmt: skip
        if "step" in opt.state.get(p, {}):
            state[n]["step"] = float(opt.state[p]["step"])
    return {"params": params, "state": state}


def _summary(opt, out: dict[str, Any], model=None, core=None) -> dict[str, Any]:
    """What every rank reports; the gathered tensors only on rank 0."""
    core = core or opt
    res = dict(
        rank=dist.get_rank() if dist.is_initialized() else 0,
        skipped=core.skipped_steps, applied=core.applied_steps,
        scales=out["scales"], lrs=out["lrs"], norms=out["norms"], torch_norms=out["torch_norms"],
        unchanged_bitwise=out.get("unchanged_bitwise"),
        # how many different gather-cache entries the steps used (1: never rebuilt)
        gather_builds=len(set(out["cache_entries"])),
    )  # fmt: skip
    if model is not None:
        gathered = _full_params_and_state(model, core)
        if res["rank"] == 0:
            res.update(gathered, grads=out["grads"])
    return res


# ---- FSDP2 (+ TP) ----------------------------------------------------------------------------

_MESHES: dict = {}


def _mesh(shape: tuple[int, ...], names: tuple[str, ...] | None = None):
    """Meshes are cached: each new one creates process groups (a collective)."""
    from torch.distributed.device_mesh import init_device_mesh

    key = (shape, names)
    if key not in _MESHES:
        _MESHES[key] = init_device_mesh("cpu", shape, mesh_dim_names=names)
    return _MESHES[key]


def _replicate_over(module: nn.Module, mesh) -> None:
    """Make ``module``'s parameters Replicate DTensors on ``mesh``, fed replicated inputs."""
    from torch.distributed.tensor import DTensor, Replicate, distribute_module

    distribute_module(
        module, mesh,
        input_fn=lambda mod, inputs, m: tuple(DTensor.from_local(t, m, [Replicate()]) for t in inputs),
        output_fn=lambda mod, outputs, m: outputs.to_local(),
    )  # fmt: skip


def shard_model(name: str, dtype: torch.dtype = torch.float32, seed: int = 0):
    """The model ``name`` under FSDP2 over every rank ("mlp"), or FSDP2 over dp and
    tensor parallel over tp on a (world/2, 2) mesh ("tp"). Returns (model, dp index,
    dp size)."""
    from torch.distributed.fsdp import fully_shard

    world = dist.get_world_size()
    model = build_model(name, dtype, seed)
    if name == "tp":
        from torch.distributed.tensor.parallel import (
            ColwiseParallel,
            RowwiseParallel,
            parallelize_module,
        )

        mesh2 = _mesh((world // 2, 2), ("dp", "tp"))
        parallelize_module(model, mesh2["tp"], {"fc1": ColwiseParallel(), "fc2": RowwiseParallel()})
        _replicate_over(model.norm, mesh2["tp"])
        mesh = mesh2["dp"]
    else:
        mesh = _mesh((world,))
    for child in model.children():
        fully_shard(child, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model, mesh.get_local_rank(), mesh.size()


def fsdp_train(
    *,
    model: str = "mlp",
    optimizer: str = "AdamW",
    opt_kwargs: dict | None = None,
    dtype: str = "float32",
    scaler: str | None = None,
    steps: int = 10,
    inject: dict | None = None,
    watch_step: int | None = None,
    record_grads: bool = False,
) -> dict[str, Any]:
    """``steps`` steps of ``optimizer`` under FSDP2 (model "tp": FSDP2 + TP)."""
    dt = getattr(torch, dtype)
    net, dp_index, dp_size = shard_model(model, dt)
    opt = make_optimizer(optimizer, net.parameters(), **(opt_kwargs or {}))
    init = (
        {n: full(p.detach()).clone() for n, p in net.named_parameters()} if record_grads else None
    )
    out = _loop(
        net, opt, range(steps), dp_index=dp_index, dp_size=dp_size, dtype=dt,
        scaler=make_scaler(scaler, distributed=True), inject=inject, watch_step=watch_step,
        record_grads=record_grads, torch_norms=True,
    )  # fmt: skip
    res = _summary(opt, out, net)
    res["state_dict_check"] = _check_state_dict(net, opt)
    res["local_numel"] = {n: local(p).numel() for n, p in net.named_parameters()}
    if res["rank"] == 0:
        res["init"] = init
    return res


def _check_state_dict(model: nn.Module, opt) -> dict[str, Any]:
    """The top-level keys of state_dict(), and for every DTensor parameter whether
    each of its state tensors is a DTensor with the parameter's mesh and placements."""
    sd = opt.state_dict()
    params = [p for g in opt.param_groups for p in g["params"]]
    mismatches = []
    kinds = set()
    for i, p in enumerate(params):
        for key, value in sd["state"].get(i, {}).items():
            if key == "step" or not is_dtensor(p):
                continue
            kinds.add(key)
            ok = (
                is_dtensor(value)
                and value.device_mesh == p.device_mesh
                and value.placements == p.placements
            )
            if not ok:
                mismatches.append((i, key, type(value).__name__))
    return dict(keys=sorted(sd), mismatches=mismatches, state_keys=sorted(kinds),
                groups_have_counters=all("attempted_steps" in g and "skipped_steps" in g
                                         for g in sd["param_groups"]))  # fmt: skip


# ---- DDP and ZeroRedundancyOptimizer ---------------------------------------------------------


def _ddp_model(seed: int = 0):
    from torch.nn.parallel import DistributedDataParallel as DDP

    return DDP(build_model("mlp", seed=seed))


def _zero(module: nn.Module, opt_kwargs: dict, *, process_group: bool = True, groups: bool = False):
    """ZeRO over ``module``; ``groups``: two param groups (fc1 / the rest), which ZeRO
    partitions separately, so ranks hold different numbers of buckets."""
    from torch.distributed.optim import ZeroRedundancyOptimizer

    # ZeroRedundancyOptimizer consumes its own ``process_group`` keyword; the local
    # optimizer gets the group through the class it constructs.
    cls = (
        functools.partial(fastopt.AdamW, process_group=dist.group.WORLD, backend=BACKEND)
        if process_group
        else functools.partial(fastopt.AdamW, backend=BACKEND)
    )
    params = param_groups(module.module) if groups else module.parameters()
    return ZeroRedundancyOptimizer(params, optimizer_class=cls, **opt_kwargs)


def param_groups(mlp: MLP) -> list[dict[str, Any]]:
    """Two param groups of an MLP: fc1 (with its own lr) and the rest."""
    fc1 = {id(p) for p in mlp.fc1.parameters()}
    params = list(mlp.parameters())
    return [
        {"params": [p for p in params if id(p) in fc1], "lr": 2e-3},
        {"params": [p for p in params if id(p) not in fc1]},
    ]


def ddp_train(*, opt_kwargs: dict | None = None, steps: int = 10) -> dict[str, Any]:
    """fastopt.AdamW (no process_group: DDP's gradients are already global) under DDP."""
    net = _ddp_model()
    opt = make_optimizer("AdamW", net.parameters(), **(opt_kwargs or {}))
    out = _loop(
        net, opt, range(steps), dp_index=dist.get_rank(), dp_size=dist.get_world_size(),
        dtype=torch.float32, torch_norms=True,
    )  # fmt: skip
    return _summary(opt, out, net.module)


def zero_train(
    *,
    opt_kwargs: dict | None = None,
    steps: int = 10,
    inject: dict | None = None,
    watch_step: int | None = None,
    process_group: bool = True,
    schedule: dict | None = None,
    save_at: int | None = None,
    path: str | None = None,
    groups: bool = False,
) -> dict[str, Any]:
    """ZeroRedundancyOptimizer over fastopt.AdamW on a DDP model.

    ``schedule``: fastopt.schedules.warmup_decay on the ZeRO wrapper. ``save_at``:
    after that many steps, consolidate the state on rank 0 and torch.save it (with
    the model) to ``path``, then keep training (the uninterrupted run).
    """
    net = _ddp_model()
    zero = _zero(net, opt_kwargs or {}, process_group=process_group, groups=groups)
    if inject is not None and inject["rank"] == "owner":
        # the rank whose partition holds the parameter: only its optimizer reads the gradient
        owner = zero._param_to_rank[dict(net.module.named_parameters())[inject["param"]]]
        inject = dict(inject, rank=owner)
    sched = None if schedule is None else fastopt.schedules.warmup_decay(zero, **schedule)
    kw = dict(dp_index=dist.get_rank(), dp_size=dist.get_world_size(), dtype=torch.float32,
              sched=sched, inject=inject, watch_step=watch_step, torch_norms=True,
              core=lambda: zero.optim)  # fmt: skip
    first = range(steps if save_at is None else save_at)
    out = _loop(net, zero, first, **kw)
    res_mid = None
    if save_at is not None:
        zero.consolidate_state_dict(to=0)
        if dist.get_rank() == 0:
            torch.save({"model": net.module.state_dict(), "optim": zero.state_dict()}, path)
        res_mid = dict(applied=zero.optim.applied_steps, skipped=zero.optim.skipped_steps)
        dist.barrier()
        rest = _loop(net, zero, range(save_at, steps), **kw)
        for k in out:
            out[k] = out[k] + rest[k]
    res = _summary(zero, out, net.module, core=zero.optim)
    res["at_save"] = res_mid
    return res


def zero_resume(
    *, path: str, start: int, steps: int, opt_kwargs: dict | None = None,
    schedule: dict | None = None,
) -> dict[str, Any]:  # fmt: skip
    """A fresh DDP model and ZeRO loading ``path`` (saved by ``zero_train``), then
    steps ``start .. steps-1``."""
    net = _ddp_model(seed=123)  # different weights: the load must overwrite them
    zero = _zero(net, opt_kwargs or {})
    ckpt = torch.load(path, weights_only=False)
    net.module.load_state_dict(ckpt["model"])
    zero.load_state_dict(ckpt["optim"])
    loaded = dict(applied=zero.optim.applied_steps, skipped=zero.optim.skipped_steps)
    sched = None if schedule is None else fastopt.schedules.warmup_decay(zero, **schedule)
    out = _loop(
        net, zero, range(start, steps), dp_index=dist.get_rank(),
        dp_size=dist.get_world_size(), dtype=torch.float32, sched=sched,
        core=lambda: zero.optim,
    )  # fmt: skip
    res = _summary(zero, out, net.module, core=zero.optim)
    res["loaded"] = loaded
    return res


# ---- DCP checkpoints --------------------------------------------------------------------------


def _dcp_setup(seed: int, opt_kwargs: dict):
    """FSDP2 model + optimizer when a process group exists, the plain model otherwise."""
    if dist.is_initialized():
        net, dp_index, dp_size = shard_model("mlp", seed=seed)
    else:
        net, dp_index, dp_size = build_model("mlp", seed=seed), 0, 1
    opt = make_optimizer("AdamW", net.parameters(), **opt_kwargs)
    return net, opt, dp_index, dp_size


def dcp_train(
    *, path: str, save_at: int, steps: int, opt_kwargs: dict, schedule: dict,
    inject: dict | None = None,
) -> dict[str, Any]:  # fmt: skip
    """FSDP2 training that saves model + optimizer through DCP after ``save_at`` steps
    and goes on to ``steps`` (the uninterrupted run)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import (
        get_model_state_dict,
        get_optimizer_state_dict,
    )

    net, opt, dp_index, dp_size = _dcp_setup(0, opt_kwargs)
    sched = fastopt.schedules.warmup_decay(opt, **schedule)
    kw = dict(dp_index=dp_index, dp_size=dp_size, dtype=torch.float32, sched=sched, inject=inject)
    out = _loop(net, opt, range(save_at), **kw)
    osd = get_optimizer_state_dict(net, opt)
    top_keys = sorted(osd)
    dcp.save({"model": get_model_state_dict(net), "optim": osd}, checkpoint_id=path)
    at_save = dict(
        applied=opt.applied_steps, skipped=opt.skipped_steps, lr=opt.param_groups[0]["lr"]
    )
    rest = _loop(net, opt, range(save_at, steps), **kw)
    for k in out:
        out[k] = out[k] + rest[k]
    res = _summary(opt, out, net)
    res.update(at_save=at_save, top_keys=top_keys)
    return res


def dcp_resume(
    *, path: str, start: int, steps: int, opt_kwargs: dict, schedule: dict
) -> dict[str, Any]:
    """A fresh model and optimizer (FSDP2 over this pool's ranks; or plain when run
    without a process group) loaded from ``path`` through DCP, then steps
    ``start .. steps-1``."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import (
        get_model_state_dict,
        get_optimizer_state_dict,
        set_model_state_dict,
        set_optimizer_state_dict,
    )

    net, opt, dp_index, dp_size = _dcp_setup(123, opt_kwargs)
    sd = {"model": get_model_state_dict(net), "optim": get_optimizer_state_dict(net, opt)}
    dcp.load(sd, checkpoint_id=path)
    set_model_state_dict(net, sd["model"])
    set_optimizer_state_dict(net, opt, sd["optim"])
    loaded = dict(
        applied=opt.applied_steps, skipped=opt.skipped_steps, lr=opt.param_groups[0]["lr"]
    )
    sched = fastopt.schedules.warmup_decay(opt, **schedule)
    out = _loop(
        net, opt, range(start, steps), dp_index=dp_index, dp_size=dp_size, dtype=torch.float32,
        sched=sched,
    )  # fmt: skip
    res = _summary(opt, out, net)
    res.update(loaded=loaded, state_dict_check=_check_state_dict(net, opt))
    return res


# ---- 8-bit moments through DCP (NOTE [int8 moments]; fastopt/_state.py) -------------------

INT8_OPT = dict(lr=1e-2, state_dtype="int8", max_grad_norm=1.0)


def _int8_setup(seed: int):
    if dist.is_initialized():
        net, dp_index, dp_size = shard_model("wide", seed=seed)
    else:
        net, dp_index, dp_size = build_model("wide", seed=seed), 0, 1
    return net, make_optimizer("AdamW", net.parameters(), **INT8_OPT), dp_index, dp_size


def _int8_report(net, opt) -> dict[str, Any]:
    """Full params, the moments as state_dict() writes them (decoded fp32, gathered),
    and what the live state of each parameter is (collectives: every rank calls)."""
    sd = opt.state_dict()
    params, moments, live = {}, {}, {}
    for i, (n, p) in enumerate(net.named_parameters()):
        params[n] = full(p.detach()).clone()
        moments[n] = {k: full(v).clone() for k, v in sorted(sd["state"][i].items())
                      if k != "step" and isinstance(v, torch.Tensor)}  # fmt: skip
        live[n] = str(opt.state[p]["exp_avg"].dtype)
    return dict(params=params, moments=moments, live=live)


def int8_dcp_train(*, path: str, save_at: int, steps: int) -> dict[str, Any]:
    """FSDP2 + 8-bit moments, saved through DCP after ``save_at`` steps, then on."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import (
        get_model_state_dict,
        get_optimizer_state_dict,
    )

    net, opt, dp_index, dp_size = _int8_setup(0)
    kw = dict(dp_index=dp_index, dp_size=dp_size, dtype=torch.float32)
    _loop(net, opt, range(save_at), **kw)
    dcp.save({"model": get_model_state_dict(net), "optim": get_optimizer_state_dict(net, opt)},
             checkpoint_id=path)  # fmt: skip
    at_save = _int8_report(net, opt)
    _loop(net, opt, range(save_at, steps), **kw)
    res = _int8_report(net, opt)
    res.update(at_save=at_save, state_dict_check=_check_state_dict(net, opt),
               rank=dist.get_rank())  # fmt: skip
    return res


def int8_dcp_resume(*, path: str, start: int, steps: int) -> dict[str, Any]:
    """A fresh FSDP2 (or plain) model + 8-bit optimizer loaded from ``path`` through
    DCP (the moments coded again from their saved values, on this run's shards),
    then steps ``start .. steps-1``."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import (
        get_model_state_dict,
        get_optimizer_state_dict,
        set_model_state_dict,
        set_optimizer_state_dict,
    )

    net, opt, dp_index, dp_size = _int8_setup(123)
    sd = {"model": get_model_state_dict(net), "optim": get_optimizer_state_dict(net, opt)}
    dcp.load(sd, checkpoint_id=path)
    set_model_state_dict(net, sd["model"])
    set_optimizer_state_dict(net, opt, sd["optim"])
    loaded = _int8_report(net, opt)
    _loop(net, opt, range(start, steps), dp_index=dp_index, dp_size=dp_size, dtype=torch.float32)
    res = _int8_report(net, opt)
    res.update(loaded=loaded, rank=dist.get_rank() if dist.is_initialized() else 0)
    return res


# ---- the single-process comparison -----------------------------------------------------------


def reference(
    *,
    model: str = "mlp",
    optimizer: str = "AdamW",
    opt_kwargs: dict | None = None,
    dtype: str = "float32",
    scaler: str | None = None,
    steps: int = 10,
    inject: dict | None = None,
    schedule: dict | None = None,
    groups: bool = False,
) -> dict[str, Any]:
    """The same recipe in this process: the full model, the full global batch, fastopt."""
    dt = getattr(torch, dtype)
    net = build_model(model, dt)
    opt_kwargs = {k: v for k, v in (opt_kwargs or {}).items() if k != "process_group"}
    opt = make_optimizer(optimizer, param_groups(net) if groups else net.parameters(), **opt_kwargs)
    sched = None if schedule is None else fastopt.schedules.warmup_decay(opt, **schedule)
    if inject is not None:
        inject = dict(inject, rank=0)
    out = _loop(
        net, opt, range(steps), dp_index=0, dp_size=1, dtype=dt, sched=sched,
        scaler=make_scaler(scaler, distributed=False), inject=inject, torch_norms=True,
    )  # fmt: skip
    return _summary(opt, out, net)


def replay(
    init: dict[str, torch.Tensor], grads: list[dict[str, torch.Tensor]], *,
    optimizer: str = "AdamW", opt_kwargs: dict | None = None,
) -> dict[str, Any]:  # fmt: skip
    """A single-process optimizer on full copies of ``init`` fed the recorded full
    gradients: the optimizer's own arithmetic, free of the difference between FSDP's
    reduce-scatter and a full-batch backward (which in bf16 is bf16 rounding)."""
    params = {n: t.clone().requires_grad_(True) for n, t in init.items()}
    opt = make_optimizer(optimizer, list(params.values()), **(opt_kwargs or {}))
    norms = []
    for step_grads in grads:
        for n, p in params.items():
            p.grad = step_grads[n].clone()
        opt.step()
        norms.append(None if opt.last_grad_norm is None else float(opt.last_grad_norm))
    state = {
        n: {k: float(v) if k == "step" else v.clone() for k, v in opt.state[p].items()}
        for n, p in params.items()
    }
    return dict(params={n: p.detach() for n, p in params.items()}, state=state, norms=norms)
