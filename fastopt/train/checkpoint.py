"""Checkpoints: atomic save and load, and the state dict of a whole run.

A checkpoint holds everything the next step depends on, so ``--steps N`` in
one go and ``--stop-after K`` then ``--resume`` log the same losses bit for
bit: model, optimizer (with its applied and skipped counts), scheduler,
scaler, LAWA window, the data generator (the data position), torch's (and
CUDA's) and Python's RNG states and the early-stopping counters.

A single process (``--parallel none``) writes one file, ``ckpt.pt``; under
``--parallel`` every rank writes its shards into a DCP folder, ``ckpt.dcp``
(NOTE [sharded checkpoint]).
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import random
import shutil
from pathlib import Path
from typing import TYPE_CHECKING

import torch
import torch.distributed as dist

from fastopt.train import parallel
from fastopt.train.config import ConfigError

if TYPE_CHECKING:
    from fastopt.train.loop import Run
    from fastopt.train.parallel import Parallel

CHECKPOINT = "ckpt.pt"
SHARDED_CHECKPOINT = "ckpt.dcp"
LOOP_STATE = "loop.pt"  # inside a DCP folder: the loop's own state, written last by rank 0
FORMAT = 1
# what must match to load the weights; dropout and max_seq_len are hyperparameters, not shape
SHAPE_KEYS = ("vocab_size", "d_model", "n_layers", "n_heads")


def save_checkpoint(path: Path, state: dict) -> None:
    """Write ``state`` to ``path`` atomically: a crash leaves either the old or the new file.

    NOTE [atomic checkpoint]
    torch.save goes to ``path.tmp``, which is flushed and fsynced, then
    ``os.replace`` renames it over ``path`` in one step (atomic on POSIX and
    Windows within a filesystem). A crash at any point before the rename
    leaves the previous checkpoint untouched; a stale ``.tmp`` is simply
    overwritten by the next save and never read.
    """
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        torch.save(state, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    with contextlib.suppress(OSError):  # make the rename itself durable where the OS allows
        dir_fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)


def checkpoint_path(out: Path, par: Parallel) -> Path:
    """``ckpt.pt`` for a single process, the DCP folder ``ckpt.dcp`` under ``--parallel``."""
    return out / (SHARDED_CHECKPOINT if par.sharded_checkpoint else CHECKPOINT)


def load_checkpoint(path: Path) -> dict:
    """The checkpoint at ``path``, every tensor on the CPU (the loaders move them).

    For a DCP folder this is the loop's own state; ``load_run_state_dict`` reads
    the shards. ``ckpt["dcp_folder"]`` names the complete folder found
    (NOTE [sharded checkpoint]: after a crash mid-swap, the temp or old one).
    """
    sharded = path.name == SHARDED_CHECKPOINT
    folder = _complete_folder(path) if sharded else None
    if (folder is None) if sharded else not path.is_file():
        other = path.with_name(CHECKPOINT if sharded else SHARDED_CHECKPOINT)
        hint = ""
        if other.exists():
            hint = (
                f" ({other.name} there is a single-process checkpoint: resume it without --parallel)"
                if sharded
                else f" ({other.name} there is a sharded checkpoint: resume it under torchrun "
                "with --parallel ddp|fsdp|zero)"
            )
        raise ConfigError(f"no checkpoint to resume from: {path} does not exist{hint}")
    file = folder / LOOP_STATE if sharded else path
    try:
        ckpt = torch.load(file, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - a torn or foreign file: say which, in one line
        raise ConfigError(f"cannot read checkpoint {file}: {str(exc).splitlines()[0]}") from None
    if sharded:
        ckpt["dcp_folder"] = str(folder)
    return ckpt


def _model_shape(model_config: dict | None) -> dict:
    return {k: (model_config or {}).get(k) for k in SHAPE_KEYS}


def run_state_dict(run: Run) -> dict:
    """Everything ``load_run_state_dict`` needs to continue ``run`` exactly (one process)."""
    return _loop_state(run) | {
        "model": run.model.state_dict(),
        "optimizer": run.optimizer.state_dict(),
        "lawa": run.lawa.state_dict() if run.lawa is not None else None,
    }


def _loop_state(run: Run) -> dict:
    """All but the model, the optimizer and the LAWA snapshots: the loop's own state."""
    cuda = run.device == "cuda"
    return {
        "format": FORMAT,
        "model_config": dataclasses.asdict(run.cfg.model_config()) | {"max_seq_len": None},
        "optimizer_name": run.cfg.optimizer,
        "precision": run.cfg.precision,
        "step": run.step,
        "tokens": run.tokens,
        "seed": run.seed,
        "best_val": run.best_val,
        "evals_since_best": run.evals_since_best,
        "scheduler": run.scheduler.state_dict(),
        "scaler": run.scaler.state_dict() if run.scaler.is_enabled() else None,
        "data_rng": run.generator.get_state(),
        "torch_rng": torch.get_rng_state(),
        "cuda_rng": torch.cuda.get_rng_state() if cuda else None,  # dropout draws from it
        "python_rng": random.getstate(),
    }


def save_run(run: Run, path: Path) -> None:
    """Checkpoint ``run`` at ``path`` (``checkpoint_path``): one file, or a DCP folder."""
    if run.par.sharded_checkpoint:
        _save_sharded(run, path)
    else:
        save_checkpoint(path, run_state_dict(run))


def load_run_state_dict(run: Run, ckpt: dict, path: Path) -> None:
    """Restore ``run`` from ``ckpt`` (read from ``path``, named in errors)."""
    _check_compatible(run, ckpt, path)
    if run.par.sharded_checkpoint:
        _load_sharded(run, ckpt)
    else:
        _load_single(run, ckpt)
    _load_loop_state(run, ckpt)


def _check_compatible(run: Run, ckpt: dict, path: Path) -> None:
    cfg = run.cfg
    want, have = _model_shape(dataclasses.asdict(cfg.model_config())), ckpt.get("model_config")
    if _model_shape(have) != want:
        diff = ", ".join(
            f"{k}={_model_shape(have)[k]} (this run: {want[k]})"
            for k in want
            if _model_shape(have)[k] != want[k]
        )
        raise ConfigError(f"checkpoint {path} is from a different model shape: {diff}")
    for key, mine in (("optimizer_name", cfg.optimizer), ("precision", cfg.precision)):
        if ckpt[key] != mine:
            raise ConfigError(
                f"checkpoint {path} was written with --{key.split('_')[0]} {ckpt[key]}, "
                f"this run asks for {mine}"
            )


def _load_single(run: Run, ckpt: dict) -> None:
    run.model.load_state_dict(ckpt["model"])
    run.optimizer.load_state_dict(ckpt["optimizer"])  # moves the state to the params' device
    if run.lawa is not None and ckpt["lawa"] is not None:
        params = list(run.model.parameters())
        lawa = ckpt["lawa"] | {
            "snapshots": [
                [t.to(p.device) for t, p in zip(snap, params, strict=True)]
                for snap in ckpt["lawa"]["snapshots"]
            ]
        }
        run.lawa.load_state_dict(lawa)


def _load_loop_state(run: Run, ckpt: dict) -> None:
    run.scheduler.load_state_dict(ckpt["scheduler"])
    if run.scaler.is_enabled():
        run.scaler.load_state_dict(ckpt["scaler"])
    run.generator.set_state(ckpt["data_rng"])
    torch.set_rng_state(ckpt["torch_rng"])
    if run.device == "cuda" and ckpt.get("cuda_rng") is not None:
        torch.cuda.set_rng_state(ckpt["cuda_rng"])
    random.setstate(ckpt["python_rng"])
    run.step = ckpt["step"]
    run.tokens = ckpt["tokens"]
    run.seed = ckpt["seed"]
    run.best_val = ckpt["best_val"]
    run.evals_since_best = ckpt["evals_since_best"]


# ---------------------------------------------------------------------------------------------
# sharded checkpoints (--parallel ddp|fsdp|zero)

# NOTE [sharded checkpoint]
# Under --parallel the checkpoint is a DCP folder (torch.distributed.checkpoint),
# ``ckpt.dcp``: every rank writes its own shards of the model and optimizer
# state (get_model_state_dict / get_optimizer_state_dict, the optimizer's
# flattened to per-parameter keys so ZeRO's partitions and FSDP's shards alike
# are stored by parameter name) and the LAWA snapshots; DCP stores a
# replicated tensor once. Rank 0 adds ``loop.pt``: the loop's own state
# (step, data generator, scheduler, scaler, counters, Python RNG), the same
# on every rank, plus each rank's torch (and CUDA) RNG state. Loading into
# tensors laid out for this run's ranks reshards everything, so a run resumes
# onto a different N (or another mode); only the per-rank dropout streams,
# which have no counterpart on a different N, are then reseeded from (seed,
# step, rank).
#
# Atomically: all ranks write into ``ckpt.dcp.tmp`` (removed by rank 0 first,
# then a barrier); dcp.save returns once every rank's files and the metadata
# are written; rank 0 then writes ``loop.pt`` (fsynced; its presence marks
# the folder complete), renames the current ``ckpt.dcp`` to ``ckpt.dcp.old``,
# renames the temp folder to ``ckpt.dcp`` and deletes the old one; a final
# barrier holds every rank until the new checkpoint is in place. A directory
# cannot be renamed over a non-empty one in one step, so a crash between the
# two renames leaves no ``ckpt.dcp`` but two complete folders: ``--resume``
# then takes the temp one (the newer), else the old one.


def _options():
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(flatten_optimizer_state_dict=True)


def _complete_folder(path: Path) -> Path | None:
    """The DCP folder to resume from; NOTE [sharded checkpoint]."""
    tmp, old = path.with_name(path.name + ".tmp"), path.with_name(path.name + ".old")
    for folder in (path, tmp, old):
        if (folder / LOOP_STATE).is_file():
            return folder
    return None


def _param_names(run: Run) -> list[str]:
    return [name for name, _ in run.model.named_parameters()]


def _sharded_state(run: Run, lawa_snapshots: int) -> dict:
    """The tensors DCP saves or loads into, laid out as this run's ranks hold them."""
    from torch.distributed.checkpoint.state_dict import (
        get_model_state_dict,
        get_optimizer_state_dict,
    )

    opts = _options()
    state = {
        "model": get_model_state_dict(run.model, options=opts),
        # ZeRO: this rank's optimizer, whose parameters are its partition
        "optimizer": get_optimizer_state_dict(run.model, run.local_optimizer, options=opts),
    }
    if lawa_snapshots:
        names = _param_names(run)
        if run.lawa is not None and len(run.lawa.snapshots) == lawa_snapshots:
            snaps = list(run.lawa.snapshots)
        else:  # to load into: fp32, with the parameters' shapes and placements
            params = list(run.model.parameters())
            snaps = [
                [torch.empty_like(p, dtype=torch.float32) for p in params]
                for _ in range(lawa_snapshots)
            ]
        state["lawa"] = {
            str(i): dict(zip(names, snap, strict=True)) for i, snap in enumerate(snaps)
        }
    return state


def _sync_zero_groups(run: Run, to_local: bool) -> None:
    """ZeRO copies its own param groups' settings into the local optimizer's before each
    step and back after it; around a checkpoint the two must agree (lr, counters)."""
    outer, inner = run.optimizer.param_groups, run.local_optimizer.param_groups
    if run.optimizer is run.local_optimizer:
        return
    src, dst = (outer, inner) if to_local else (inner, outer)
    for s, d in zip(src, dst, strict=True):
        d.update({k: v for k, v in s.items() if k != "params"})


def _save_sharded(run: Run, path: Path) -> None:
    import torch.distributed.checkpoint as dcp

    par = run.par
    tmp, old = path.with_name(path.name + ".tmp"), path.with_name(path.name + ".old")
    if par.is_main:
        shutil.rmtree(tmp, ignore_errors=True)
    par.barrier()
    _sync_zero_groups(run, to_local=True)  # the lr the next step will use
    n_snaps = len(run.lawa.snapshots) if run.lawa is not None else 0
    dcp.save(_sharded_state(run, n_snaps), checkpoint_id=str(tmp))
    rng = (torch.get_rng_state(), torch.cuda.get_rng_state() if run.device == "cuda" else None)
    rank_rng = [None] * par.world
    dist.all_gather_object(rank_rng, rng)
    if par.is_main:
        loop = _loop_state(run) | {
            "parallel": run.cfg.parallel,
            "world_size": par.world,
            "rank_rng": rank_rng,
            "lawa": None if run.lawa is None else {"window": run.lawa.window, "count": n_snaps},
        }
        save_checkpoint(tmp / LOOP_STATE, loop)
        if path.exists():
            shutil.rmtree(old, ignore_errors=True)
            os.replace(path, old)
        os.replace(tmp, path)
        shutil.rmtree(old, ignore_errors=True)
        with contextlib.suppress(OSError):
            dir_fd = os.open(path.parent, os.O_RDONLY)
            try:
                os.fsync(dir_fd)
            finally:
                os.close(dir_fd)
    par.barrier()


def _load_sharded(run: Run, ckpt: dict) -> None:
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import (
        set_model_state_dict,
        set_optimizer_state_dict,
    )

    par = run.par
    lawa = ckpt.get("lawa")
    n_snaps = lawa["count"] if lawa is not None and run.lawa is not None else 0
    state = _sharded_state(run, n_snaps)
    # A param-group setting the checkpoint lacks keeps this run's value: ZeRO adds its
    # constructor's keywords (max_grad_norm, backend, ...) to every group, so a checkpoint
    # written under ddp or fsdp has no such entry, and vice versa.
    saved = dcp.FileSystemReader(ckpt["dcp_folder"]).read_metadata().state_dict_metadata
    optim = state["optimizer"]
    to_load = state | {
        "optimizer": {
            k: v
            for k, v in optim.items()
            if not k.startswith("param_groups.") or f"optimizer.{k}" in saved
        }
    }
    dcp.load(to_load, checkpoint_id=ckpt["dcp_folder"])  # tensors in place, settings replaced
    optim.update(to_load["optimizer"])
    opts = _options()
    set_model_state_dict(run.model, state["model"], options=opts)
    set_optimizer_state_dict(run.model, run.local_optimizer, optim, options=opts)
    _sync_zero_groups(run, to_local=False)
    if n_snaps:
        names = _param_names(run)
        run.lawa.load_state_dict(
            {
                "window": lawa["window"],
                "snapshots": [[state["lawa"][str(i)][n] for n in names] for i in range(n_snaps)],
            }
        )
    # the per-rank torch RNG (dropout) follows _load_loop_state's common one
    rank_rng = ckpt["rank_rng"]
    if len(rank_rng) == par.world:
        ckpt["torch_rng"], ckpt["cuda_rng"] = rank_rng[par.rank]
    else:
        torch.manual_seed(parallel.dropout_seed(ckpt["seed"], par.rank) + ckpt["step"])
        ckpt["torch_rng"] = torch.get_rng_state()
        ckpt["cuda_rng"] = torch.cuda.get_rng_state() if run.device == "cuda" else None
