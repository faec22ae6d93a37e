"""Sharded parameters: DTensor unwrapping and the global reduction of the norm pass.

NOTE [DTensor parameters]
A DTensor parameter (FSDP2 ``fully_shard``, tensor parallel, 2-D meshes) is
updated through its local shard: the gatherer hands the kernels
``t._local_tensor`` of the parameter, its gradient and every state tensor, so
the update never dispatches through DTensor (whose per-op overhead made torch's
own AdamW step grow from 2.5% to 33% of FSDP2 step time, pytorch#134191). The
states themselves are created and kept as DTensors with the parameter's mesh
and placements (``torch.zeros_like`` of a DTensor), so ``state_dict()`` carries
DTensors and DCP reshards them. A local shard may be empty (uneven shards).

NOTE [global norm over shards]
The clip norm and the skip decision must be the same on every rank. Each
rank computes the sum of squares of its local gradients per *reduction
domain*: plain tensors belong to the optimizer's ``process_group`` (None: not
reduced, e.g. DDP, whose gradients are already identical everywhere); a
DTensor belongs to its mesh. Over a mesh every rank's contribution is summed,
except that along a mesh dimension where the parameter is ``Replicate`` only
the rank at coordinate 0 contributes its sum, so a replicated tensor (a
tensor-parallel norm weight, an HSDP replica) counts once; the other replicas
contribute ``sum * 0``, zero unless their copy is not finite. Each rank adds
its buckets per set of process groups and all-reduces one ``[sum of squares,
found_inf]`` pair per set (a ZeRO partition gives ranks different numbers of
buckets; the pair has the same size everywhere), meshes first in bucket order,
the ``process_group`` last, so every rank issues the same collectives in the
same order; on NCCL the host never waits for them. Then the domains are added.
Non-finite values propagate through the sums, so every rank sees the same
non-finite norm and skips the same step; ``found_inf`` from the scaler joins
the same reduction.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.distributed as dist
from torch import Tensor

try:
    from torch.distributed.tensor import DTensor, Partial, Replicate
except ImportError:  # a torch built without distributed support
    DTensor = Partial = Replicate = None  # type: ignore[assignment,misc]


def is_dtensor(t: Tensor | None) -> bool:
    return DTensor is not None and isinstance(t, DTensor)


def local(t: Tensor) -> Tensor:
    """The local shard of a DTensor (the tensor itself otherwise)."""
    return t._local_tensor if is_dtensor(t) else t


def domain_of(p: Tensor, g: Tensor, process_group, where: str):
    """The reduction domain of one parameter (NOTE [global norm over shards]):
    ``("group", process_group)`` for a plain tensor, ``("mesh", mesh,
    replicated mesh dims)`` for a DTensor."""
    if not is_dtensor(p):
        return None if process_group is None else ("group", process_group)
    if is_dtensor(g) and any(isinstance(pl, Partial) for pl in g.placements):
        raise RuntimeError(
            f"the gradient of {where} is a Partial DTensor (placements {g.placements}); "
            "fastopt needs gradients reduced to the parameter's placements"
        )
    replicated = tuple(d for d, pl in enumerate(p.placements) if isinstance(pl, Replicate))
    return ("mesh", p.device_mesh, replicated)


def counts_here(domain) -> bool:
    """False where this rank's copy of a replicated tensor must not be counted."""
    if domain is None or domain[0] == "group":
        return True
    mesh, replicated = domain[1], domain[2]
    return all(mesh.get_local_rank(d) == 0 for d in replicated)


def _groups(domain) -> list:
    if domain[0] == "group":
        return [domain[1]]
    mesh = domain[1]
    return [mesh.get_group(d) for d in range(mesh.ndim)]


def reduce_sums(
    per_domain: Sequence[tuple[object, Tensor]], found: Tensor | None, device: torch.device
) -> tuple[Tensor, Tensor | None]:
    """Global (sum of squares, found_inf) from local float64 sums per domain.

    ``per_domain`` must name the same meshes in the same order on every rank of
    each mesh (the gatherer's bucket order, which follows the parameter order,
    guarantees it); how many buckets a rank has per domain may differ (a ZeRO
    partition, say). Returns the float64 total and the float64 found count.
    """
    zero = torch.zeros((), dtype=torch.float64, device=device)
    found = zero if found is None else found.to(device=device, dtype=torch.float64)
    # One [sum of squares, found] pair per set of process groups: the buckets of
    # a domain are summed here first, so every rank sends the same two numbers
    # however many buckets it holds. Meshes come in bucket order, then the
    # optimizer's process_group: the same order of collectives on every rank.
    by_groups: dict[tuple, Tensor] = {}
    local_total = zero
    for kind in ("mesh", "group"):
        for domain, total in per_domain:
            if domain is None or domain[0] != kind:
                continue
            if not counts_here(domain):
                # A replica that is not counted still carries non-finiteness
                # (inf * 0 and nan * 0 are NaN): a NaN in one rank's copy of a
                # replicated gradient skips the step on every rank.
                total = total * 0
            key = tuple(_groups(domain))
            by_groups[key] = by_groups.get(key, zero) + total
    for domain, total in per_domain:
        if domain is None:
            local_total = local_total + total
    totals = [local_total]
    found_out = found
    for groups, part in by_groups.items():
        # The collective runs on the groups' device (gloo: CPU, NCCL: the GPU).
        vec = torch.stack([part, found]).to(_collective_device(groups[0], device))
        # A 2-D mesh sums over each dimension in turn. With NCCL a collective
        # only orders the current stream after it: the host does not wait.
        for g in groups:
            dist.all_reduce(vec, group=g)
        vec = vec.to(device)
        totals.append(vec[0])
        found_out = torch.maximum(found_out, vec[1])
    return torch.stack(totals).sum(), found_out


def _collective_device(group, fallback: torch.device) -> torch.device:
    backend = dist.get_backend(group)
    if backend == "nccl":
        return (
            fallback
            if fallback.type == "cuda"
            else torch.device("cuda", torch.cuda.current_device())
        )
    return torch.device("cpu") if backend == "gloo" else fallback
