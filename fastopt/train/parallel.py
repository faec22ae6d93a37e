"""Data parallelism: ``torchrun --nproc_per_node N -m fastopt.train --parallel ddp|fsdp|zero``.

NOTE [parallel modes]
Every mode trains the same model on the same global batch as a single
process: all ranks draw the batch from the same generator and each keeps
its own ``batch_size / N`` rows (``Parallel.shard``), so the gradient is the
mean over the global batch whatever N is.

``ddp``   ``DistributedDataParallel``: the whole model and optimizer on every
          rank; the backward pass all-reduces (averages) the gradients, which
          are then the same everywhere, so the optimizer needs no
          ``process_group``.
``zero``  DDP plus ``torch.distributed.optim.ZeroRedundancyOptimizer``: each
          rank's optimizer holds and updates only its partition of the
          parameters and broadcasts them after the step. ZeRO consumes its own
          ``process_group`` keyword, so fastopt's is bound with
          ``functools.partial(cls, process_group=WORLD)``: the clipping norm
          and the skip are reduced over all partitions (SPEC §7).
``fsdp``  FSDP2: ``fully_shard`` on each transformer block and on the root.
          Parameters, gradients and optimizer state are DTensor shards; the
          fastopt optimizer updates the local shards and reduces the norm over
          the mesh. With bf16 the parameters are sharded as bf16 and the
          optimizer keeps fp32 master shards (NOTE [precision policy]).

The process group is gloo on the CPU and NCCL on a GPU (one GPU per rank,
``cuda:LOCAL_RANK``). Only rank 0 prints, logs metrics, draws the progress bar
and plots; every rank checkpoints its shards (NOTE [sharded checkpoint] in
checkpoint.py).
"""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

MODES = ("none", "ddp", "fsdp", "zero")


def launched_by_torchrun() -> bool:
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


def launch_problem(mode: str, batch_size: int) -> str | None:
    """What is wrong with how this process was launched for ``mode`` (None: nothing)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if mode == "none":
        if launched_by_torchrun() and world > 1:
            return (
                f"launched by torchrun with {world} processes but --parallel none; "
                "add --parallel ddp|fsdp|zero (or run a single process)"
            )
        return None
    if not launched_by_torchrun():
        return (
            f"--parallel {mode} must be launched by torchrun (RANK and WORLD_SIZE are not set): "
            f"torchrun --nproc_per_node N -m fastopt.train --parallel {mode} ..."
        )
    if batch_size % world:
        return (
            f"--batch-size {batch_size} (the global batch) does not divide by the {world} "
            "ranks: each rank takes batch-size / N sequences of every batch"
        )
    return None


@dataclass(frozen=True)
class Parallel:
    """Where this process stands: the mode, its rank and the world size."""

    mode: str = "none"
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def sharded_checkpoint(self) -> bool:
        """Any mode but none checkpoints through DCP (even on one rank)."""
        return self.mode != "none"

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def shard(self, t: torch.Tensor) -> torch.Tensor:
        """This rank's rows of a global batch (contiguous, ``len(t) / world`` of them)."""
        if self.world == 1:
            return t
        n = t.shape[0] // self.world
        return t[self.rank * n : (self.rank + 1) * n]

    def mean(self, t: torch.Tensor) -> torch.Tensor:
        """The mean of ``t`` over the ranks (for the log: each rank's loss is of its slice)."""
        if self.world == 1:
            return t
        t = t.clone()
        dist.all_reduce(t)
        return t / self.world

    def barrier(self) -> None:
        if dist.is_initialized():
            dist.barrier()


SINGLE = Parallel()


def setup(mode: str, device: str) -> Parallel:
    """Join the process group torchrun set up the environment for (gloo on CPU, NCCL on CUDA)."""
    if mode == "none":
        return SINGLE
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local_rank = int(os.environ.get("LOCAL_RANK", rank))
    if device == "cuda":
        torch.cuda.set_device(local_rank)  # "cuda" below means this rank's GPU
        dist.init_process_group("nccl", device_id=torch.device("cuda", local_rank))
    else:
        dist.init_process_group("gloo")
    return Parallel(mode, rank, world, local_rank)


def teardown(par: Parallel, finished: bool = False) -> None:
    """Leave the process group. After a finished run, a barrier first: no rank closes
    its connections while another still has a collective in flight on them (once in
    a test-suite run a gloo rank aborted in its shutdown, "terminate called without
    an active exception", after the run had saved its checkpoint). Not after an
    error: the failing rank must exit so torchrun stops the others."""
    if par.mode != "none" and dist.is_initialized():
        if finished:
            dist.barrier()
        dist.destroy_process_group()


def dropout_seed(seed: int, rank: int) -> int:
    """Each rank's own torch RNG stream (dropout) after the identical initialisation."""
    return (seed * 1_000_003 + rank + 1) % 2**63


def wrap(model: nn.Module, par: Parallel, device: str) -> nn.Module:
    """The module the forward pass goes through; NOTE [parallel modes]."""
    if par.mode in ("ddp", "zero"):
        ids = [par.local_rank] if device == "cuda" else None
        return nn.parallel.DistributedDataParallel(model, device_ids=ids)
    if par.mode == "fsdp":
        from torch.distributed.fsdp import fully_shard

        for block in model.blocks:
            fully_shard(block)
        fully_shard(model)  # in place: ``model`` itself is now the sharded root
    return model


def set_grad_sync(forward: nn.Module, model: nn.Module, par: Parallel, sync: bool) -> None:
    """Gradient accumulation communicates only on the last micro-batch (as nanoGPT does)."""
    if par.mode in ("ddp", "zero"):
        ddp = getattr(forward, "_orig_mod", forward)  # through torch.compile
        ddp.require_backward_grad_sync = sync
    elif par.mode == "fsdp":
        model.set_requires_gradient_sync(sync)


def zero_optimizer(groups: list[dict], optimizer_class, fused: bool, **kwargs):
    """``ZeroRedundancyOptimizer`` over ``groups``; fastopt's global norm spans the world."""
    from torch.distributed.optim import ZeroRedundancyOptimizer

    if fused:
        # ZeRO takes a process_group keyword of its own; ours reaches the local optimizer bound
        optimizer_class = functools.partial(optimizer_class, process_group=dist.group.WORLD)
    return ZeroRedundancyOptimizer(groups, optimizer_class=optimizer_class, **kwargs)


def local_optimizer(optimizer: torch.optim.Optimizer) -> torch.optim.Optimizer:
    """ZeRO: this rank's own optimizer (with the fastopt counters and norm); else itself."""
    from torch.distributed.optim import ZeroRedundancyOptimizer

    return optimizer.optim if isinstance(optimizer, ZeroRedundancyOptimizer) else optimizer


def full_value(t: torch.Tensor) -> torch.Tensor:
    """A DTensor's full value (the norm ``clip_grad_norm_`` returns under FSDP); else ``t``."""
    return t.full_tensor() if hasattr(t, "full_tensor") else t
