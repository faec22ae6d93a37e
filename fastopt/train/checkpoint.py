"""Checkpoints: atomic save and load, and the state dict of a whole run.

A checkpoint holds everything the next step depends on, so ``--steps N`` in
one go and ``--stop-after K`` then ``--resume`` log the same losses bit for
bit: model, optimizer (with its applied and skipped counts), scheduler,
scaler, LAWA window, the data generator (the data position), torch's (and
CUDA's) and Python's RNG states and the early-stopping counters.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import random
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from fastopt.train.config import ConfigError

if TYPE_CHECKING:
    from fastopt.train.loop import Run

CHECKPOINT = "ckpt.pt"
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


def load_checkpoint(path: Path) -> dict:
    """The checkpoint at ``path``, every tensor on the CPU (the loaders move them)."""
    if not path.is_file():
        raise ConfigError(f"no checkpoint to resume from: {path} does not exist")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - a torn or foreign file: say which, in one line
        raise ConfigError(f"cannot read checkpoint {path}: {str(exc).splitlines()[0]}") from None


def _model_shape(model_config: dict | None) -> dict:
    return {k: (model_config or {}).get(k) for k in SHAPE_KEYS}


def run_state_dict(run: Run) -> dict:
    """Everything ``load_run_state_dict`` needs to continue ``run`` exactly."""
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
        "model": run.model.state_dict(),
        "optimizer": run.optimizer.state_dict(),
        "scheduler": run.scheduler.state_dict(),
        "scaler": run.scaler.state_dict() if run.scaler.is_enabled() else None,
        "lawa": run.lawa.state_dict() if run.lawa is not None else None,
        "data_rng": run.generator.get_state(),
        "torch_rng": torch.get_rng_state(),
        "cuda_rng": torch.cuda.get_rng_state() if cuda else None,  # dropout draws from it
        "python_rng": random.getstate(),
    }


def load_run_state_dict(run: Run, ckpt: dict, path: Path) -> None:
    """Restore ``run`` from ``ckpt`` (read from ``path``, named in errors)."""
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
    run.model.load_state_dict(ckpt["model"])
    run.optimizer.load_state_dict(ckpt["optimizer"])  # moves the state to the params' device
    run.scheduler.load_state_dict(ckpt["scheduler"])
    if run.scaler.is_enabled():
        run.scaler.load_state_dict(ckpt["scaler"])
    if run.lawa is not None and ckpt["lawa"] is not None:
        params = list(run.model.parameters())
        lawa = ckpt["lawa"] | {
            "snapshots": [
                [t.to(p.device) for t, p in zip(snap, params, strict=True)]
                for snap in ckpt["lawa"]["snapshots"]
            ]
        }
        run.lawa.load_state_dict(lawa)
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
