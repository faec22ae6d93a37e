"""The optimizer step under FSDP2 on 2 gloo ranks: fastopt against torch's AdamW.

    PYTHONPATH=. python -m benchmarks.bench_fsdp              # GPT-2 small + 4000 tensors
    PYTHONPATH=. python -m benchmarks.bench_fsdp --quick      # small shapes, 3 rounds
    PYTHONPATH=. python -m benchmarks.bench_fsdp --json out.json

Two spawned ranks (gloo, one torch thread each) shard each model with
``fully_shard`` (one FSDP unit per transformer layer, or per 40 tensors) and
give every parameter a gradient (a DTensor with the parameter's placements; no
forward or backward is run, only ``optimizer.step()`` is timed). Contenders:

* ``fastopt`` / ``fastopt + clip``: ``fastopt.AdamW`` (backend ``auto``: the cpu
  kernels) on the DTensor parameters; with ``max_grad_norm`` the step includes
  the global norm's all-reduce.
* ``torch fused`` / ``torch foreach``: ``torch.optim.AdamW(fused=True)`` and
  ``(foreach=True)`` on the same DTensor parameters (they dispatch through
  DTensor, pytorch#134191).
* ``fastopt local`` / ``fastopt local + clip``: ``fastopt.AdamW`` on plain
  copies of the same local shards, no FSDP: the ratio of the sharded step to it
  is what sharding costs fastopt (goal: at most 1.1x).

Every round runs each contender once, in a rotated order (NOTE [interleaved
rounds] in benchmarks/harness.py); before each timed step both ranks meet at a
barrier, and a step's time is the slower rank's. One model is built at a time
(GPT-2 small with four optimizers' states is ~3 GB per rank).
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import os
import sys
import tempfile
import time
from dataclasses import dataclass

import torch

try:  # run as `python -m benchmarks.bench_fsdp` or imported by pytest
    from benchmarks import bench_cpu, harness
except ImportError:  # run as `python benchmarks/bench_fsdp.py`
    import bench_cpu  # type: ignore[no-redef]
    import harness  # type: ignore[no-redef]

WORLD = 2
ADAMW_HP = bench_cpu.ADAMW_HP
MAX_GRAD_NORM = bench_cpu.MAX_GRAD_NORM
CONTENDERS = (
    "fastopt", "fastopt + clip", "torch fused", "torch foreach", "fastopt local",
    "fastopt local + clip",
)  # fmt: skip


@dataclass(frozen=True)
class ModelSpec:
    key: str
    title: str
    units: list  # [[(name, shape), ...] per FSDP unit]


def gpt2_units(**kwargs) -> list:
    """GPT-2 small's tensors, one FSDP unit per transformer layer, one for the
    embeddings and one for the final norm (148 tensors, 124M parameters)."""
    units: dict[str, list] = {}
    for name, shape in bench_cpu.gpt2_small_named_shapes(**kwargs):
        head = name.split(".")[0]
        key = (
            f"h.{name.split('.')[1]}"
            if head == "h"
            else ("emb" if head in ("wte", "wpe") else head)
        )
        units.setdefault(key, []).append((name, shape))
    return list(units.values())


def many_units(n: int, numel: int = 4096, per_unit: int = 40) -> list:
    shapes = [(f"t{i}", (numel,)) for i in range(n)]
    return [shapes[i : i + per_unit] for i in range(0, n, per_unit)]


def models(size: str) -> list[ModelSpec]:
    if size == "full":
        return [
            ModelSpec("gpt2", "GPT-2 small (148 tensors, 124M params; 12 layers, d=768, vocab 50257)",
                      gpt2_units()),
            ModelSpec("many", "4000 tensors of 4096 (16.4M params)", many_units(4000)),
        ]  # fmt: skip
    if size == "quick":
        return [
            ModelSpec("gpt2", "GPT-2 shapes, 1 layer, vocab 4096", gpt2_units(n_layer=1, vocab=4096, n_ctx=256)),
            ModelSpec("many", "400 tensors of 4096", many_units(400)),
        ]  # fmt: skip
    return [  # smoke: only that it runs
        ModelSpec("gpt2", "GPT-2 shapes, 1 layer, d=64", gpt2_units(n_layer=1, vocab=256, n_ctx=32, d=64)),
        ModelSpec("many", "40 tensors of 256", many_units(40, numel=256, per_unit=10)),
    ]  # fmt: skip


# ---------------------------------------------------------------------------
# One rank
# ---------------------------------------------------------------------------


class Unit(torch.nn.Module):
    def __init__(self, named_shapes: list, gen: torch.Generator) -> None:
        super().__init__()
        for name, shape in named_shapes:
            w = torch.randn(shape, generator=gen) * 0.02
            self.register_parameter(name.replace(".", "_"), torch.nn.Parameter(w))


def _sharded_model(spec: ModelSpec, mesh):
    from torch.distributed.fsdp import fully_shard

    gen = torch.Generator().manual_seed(0)
    model = torch.nn.Sequential(*[Unit(u, gen) for u in spec.units])
    for unit in model:
        fully_shard(unit, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model


def _give_grads(params: list, seed: int) -> None:
    """A gradient for every DTensor parameter: its placements, a random local shard."""
    from torch.distributed.tensor import DTensor

    gen = torch.Generator().manual_seed(seed)
    for p in params:
        local = torch.randn(p._local_tensor.shape, generator=gen) * 0.01
        p.grad = DTensor.from_local(
            local, p.device_mesh, p.placements, shape=p.shape, stride=p.stride()
        )


def _local_copies(params: list) -> list:
    out = []
    for p in params:
        q = torch.nn.Parameter(p._local_tensor.detach().clone())
        q.grad = p.grad._local_tensor.clone()
        out.append(q)
    return out


def _optimizers(params: list, local: list) -> dict:
    import fastopt

    return {
        "fastopt": fastopt.AdamW(params, **ADAMW_HP),
        "fastopt + clip": fastopt.AdamW(params, max_grad_norm=MAX_GRAD_NORM, **ADAMW_HP),
        "torch fused": torch.optim.AdamW(params, fused=True, **ADAMW_HP),
        "torch foreach": torch.optim.AdamW(params, foreach=True, **ADAMW_HP),
        "fastopt local": fastopt.AdamW(local, **ADAMW_HP),
        # the norm of the local shards only: the same kernels, no collective
        "fastopt local + clip": fastopt.AdamW(local, max_grad_norm=MAX_GRAD_NORM, **ADAMW_HP),
    }


def _time_model(spec: ModelSpec, mesh, rounds: int) -> dict:
    import torch.distributed as dist

    model = _sharded_model(spec, mesh)
    params = list(model.parameters())
    _give_grads(params, seed=1 + dist.get_rank())
    local = _local_copies(params)
    opts = _optimizers(params, local)
    names = list(opts)
    for name in names:  # warm-up: states created, caches built, untimed
        dist.barrier()
        opts[name].step()
    seconds: dict[str, list[float]] = {n: [] for n in names}
    load: list[float] = []
    for r in range(rounds):
        probe = harness.OtherLoad()
        for k in range(len(names)):
            name = names[(r + k) % len(names)]
            dist.barrier()
            start = time.perf_counter()
            opts[name].step()
            seconds[name].append(time.perf_counter() - start)
        load.append(probe.fraction())
    # a step takes as long as its slower rank
    gathered: list = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, seconds)
    slowest = {n: [max(rank[n][i] for rank in gathered) for i in range(rounds)] for n in names}
    n_local = sum(p._local_tensor.numel() for p in params)
    return dict(
        key=spec.key, title=spec.title, tensors=len(params),
        params=sum(p.numel() for p in params), params_per_rank_max=n_local,
        timings={n: harness.Timing(n, s, load).summary() for n, s in slowest.items()},
    )  # fmt: skip


def _rank_main(rank: int, size: str, rounds: int, port: int, out_path: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh

    dist.init_process_group(
        "gloo", rank=rank, world_size=WORLD, timeout=datetime.timedelta(seconds=300)
    )
    mesh = init_device_mesh("cpu", (WORLD,))
    results = []
    for spec in models(size):
        results.append(_time_model(spec, mesh, rounds))
        gc.collect()  # the previous model's tensors go before the next is built
    if rank == 0:
        import fastopt

        with open(out_path, "w") as f:
            json.dump(dict(models=results, backends=fastopt.available_backends()), f)
    dist.destroy_process_group()


# ---------------------------------------------------------------------------
# Driver and table
# ---------------------------------------------------------------------------


def run(size: str = "full", rounds: int | None = None) -> dict:
    import torch.multiprocessing as mp

    from fastopt.backends import unavailable_reason

    rounds = rounds or {"full": 9, "quick": 3, "smoke": 1}[size]
    stamp = harness.machine_stamp()
    stamp["torch_threads"] = 1  # per rank
    load_start = harness.load_average()
    whole = harness.OtherLoad()
    with tempfile.TemporaryDirectory() as tmp:
        out_path = os.path.join(tmp, "result.json")
        port = _free_port()
        mp.spawn(_rank_main, args=(size, rounds, port, out_path), nprocs=WORLD, join=True)
        with open(out_path) as f:
            result = json.load(f)
    result.update(
        stamp=stamp, size=size, rounds=rounds, world=WORLD, load_average_start=load_start,
        load_average_end=harness.load_average(), other_processes_cpu_fraction=whole.fraction(),
        cpu_backend=unavailable_reason("cpu") or "available",
    )  # fmt: skip
    return result


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def ratios(model: dict) -> dict[str, float]:
    med = {n: t["median_s"] for n, t in model["timings"].items()}
    return {
        "fastopt sharded / local": med["fastopt"] / med["fastopt local"],
        "fastopt + clip sharded / local": med["fastopt + clip"] / med["fastopt local + clip"],
        "torch fused / fastopt": med["torch fused"] / med["fastopt"],
        "torch foreach / fastopt": med["torch foreach"] / med["fastopt"],
    }


def render_markdown(result: dict) -> str:
    lines = [
        f"### Optimizer step under FSDP2, {result['world']} gloo ranks (1 thread each), "
        f"{result['size']} sizes, {result['rounds']} rounds",
        "",
        *harness.stamp_lines(result["stamp"]),
        f"- fastopt backends: {', '.join(result['backends'])}; other processes used "
        f"{result['other_processes_cpu_fraction']:.0%} of the CPUs meanwhile "
        f"(load average {result['load_average_start'][0]:.1f} -> {result['load_average_end'][0]:.1f})",
        "",
        "| model | contender | median ms | p25–p75 ms | × fastopt (FSDP2) |",
        "|---|---|---:|---:|---:|",
    ]
    for m in result["models"]:
        base = m["timings"]["fastopt"]["median_s"]
        for name, t in m["timings"].items():
            lines.append(
                f"| {m['key']} | {name} | {t['median_s'] * 1e3:.2f} | "
                f"{t['p25_s'] * 1e3:.2f}–{t['p75_s'] * 1e3:.2f} | {t['median_s'] / base:.2f} |"
            )
    lines += ["", "| model | ratio | value | goal |", "|---|---|---:|---|"]
    goals = {"fastopt sharded / local": "≤ 1.1", "fastopt + clip sharded / local": "≤ 1.1"}
    for m in result["models"]:
        for name, value in ratios(m).items():
            goal = goals.get(
                name, "≥ 3 (many)" if name == "torch fused / fastopt" and m["key"] == "many" else ""
            )
            lines.append(f"| {m['key']} | {name} | {value:.2f} | {goal} |")
    lines += ["", *(f"- {m['key']}: {m['title']}; largest local shard {m['params_per_rank_max']:,} params"
                    for m in result["models"])]  # fmt: skip
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--quick", action="store_true", help="small shapes, 3 rounds")
    parser.add_argument("--smoke", action="store_true", help="tiny shapes, 1 round (tests)")
    parser.add_argument("--rounds", type=int, default=None)
    parser.add_argument("--json", type=str, default=None, help="write the raw result here")
    args = parser.parse_args(argv)
    size = "smoke" if args.smoke else "quick" if args.quick else "full"
    result = run(size, args.rounds)
    print(render_markdown(result))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)
    return result


if __name__ == "__main__":
    sys.exit(0 if main() else 1)
