"""CPU optimizer-step benchmark: fastopt's ``cpu`` backend against torch and peers.

    PYTHONPATH=. python -m benchmarks.bench_cpu              # full table (~4 min when idle)
    PYTHONPATH=. python -m benchmarks.bench_cpu --quick      # smoke run: small sizes, 3 rounds
    PYTHONPATH=. python -m benchmarks.bench_cpu --json out.json --only a,b

Prints one markdown table (every row: median ms, spread, GB/s at SPEC §5's
minimum bytes, fraction of this machine's measured scale-add bandwidth, speedup
against the workload's named torch baseline), the peak extra resident memory
of one step of (a) per contender, the issue's targets as met/missed, and a
stamp (machine, versions, commit, date); ``--json`` writes all of it with the
raw per-round times.

Each workload is timed in one process with its contenders interleaved
(harness.time_interleaved). NOTE [cold cache between steps]: interleaving
also means every step starts with the cache full of another contender's data,
as a training step starts after forward and backward have streamed the
activations through it. This matters for (b), whose p/g/m/v (262 MB) are about
the size of this machine's 260 MiB LLC: run back to back (pytest-benchmark's
cases) its steps partly hit in cache and come out faster than in this table.
"% of bw" can exceed 100%: scale-add is a three-stream kernel, and a
seven-stream optimizer step can keep the memory system somewhat busier. Contenders that cannot run here (fastopt not built
yet, DeepSpeed absent or unable to build its CPU op, lion-pytorch absent) are
listed under the table with the reason; the rest still run.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

try:  # run as `python -m benchmarks.bench_cpu` or imported by pytest
    from benchmarks import harness
except ImportError:  # run as `python benchmarks/bench_cpu.py`
    import harness  # type: ignore[no-redef]

from torch.nn.utils import clip_grad_norm_

THREADS = 2
ADAMW_HP = dict(lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=1e-2)
LION_HP = dict(lr=1e-4, betas=(0.9, 0.99), weight_decay=1e-2)
# Both schedulers on, as the paper runs AdEMAMix, so the per-step alpha/beta3 work is measured.
ADEMAMIX_HP = dict(
    lr=1e-3, betas=(0.9, 0.999, 0.9999), alpha=5.0, t_alpha=1000, t_beta3=1000, eps=1e-8,
    weight_decay=1e-2,
)
# Far below the gradients' norm (~0.01 * sqrt(numel)), so clipping really scales.
MAX_GRAD_NORM = 1.0
LOSS_SCALE = 2.0**16
# Share of the machine's CPU time other processes may use during a workload
# before its numbers are flagged as contaminated (harness.OtherLoad).
NOISY_FRACTION = 0.05


# ---------------------------------------------------------------------------
# Shapes
# ---------------------------------------------------------------------------


def gpt2_small_named_shapes(
    n_layer: int = 12, vocab: int = 50257, n_ctx: int = 1024, d: int = 768
) -> list[tuple[str, tuple[int, ...]]]:
    """GPT-2 small's parameters by name (HF ``GPT2LMHeadModel``, lm_head tied to wte).

    Conv1D weights are stored (in, out). With the defaults: 148 tensors,
    124,439,808 parameters.
    """
    named = [("wte.weight", (vocab, d)), ("wpe.weight", (n_ctx, d))]
    for i in range(n_layer):
        layer = {
            "ln_1.weight": (d,),
            "ln_1.bias": (d,),
            "attn.c_attn.weight": (d, 3 * d),
            "attn.c_attn.bias": (3 * d,),
            "attn.c_proj.weight": (d, d),
            "attn.c_proj.bias": (d,),
            "ln_2.weight": (d,),
            "ln_2.bias": (d,),
            "mlp.c_fc.weight": (d, 4 * d),
            "mlp.c_fc.bias": (4 * d,),
            "mlp.c_proj.weight": (4 * d, d),
            "mlp.c_proj.bias": (d,),
        }
        named += [(f"h.{i}.{k}", shape) for k, shape in layer.items()]
    named += [("ln_f.weight", (d,)), ("ln_f.bias", (d,))]
    return named


def gpt2_small_shapes(**kwargs) -> list[tuple[int, ...]]:
    return [shape for _, shape in gpt2_small_named_shapes(**kwargs)]


@dataclass(frozen=True)
class Sizes:
    big: list  # (a) and the workloads built on it
    many: list  # (b)
    gpt2: list  # (c)
    bandwidth_elements: int
    rounds: int


def full_sizes() -> Sizes:
    return Sizes(
        big=[(1024, 1024)] * 64,  # 64M fp32 params in 64 tensors
        many=[(4096,)] * 4000,
        gpt2=gpt2_small_shapes(),
        # 2 x 1 GiB buffers: 8x the 260 MiB LLC this machine reports.
        bandwidth_elements=256 * 2**20,
        rounds=15,
    )


def quick_sizes() -> Sizes:
    return Sizes(
        big=[(256, 256)] * 64,  # 4M params
        many=[(4096,)] * 400,
        gpt2=gpt2_small_shapes(n_layer=1, vocab=4096, n_ctx=256),
        bandwidth_elements=32 * 2**20,
        rounds=3,
    )


# ---------------------------------------------------------------------------
# Workload data: read-only sources every contender clones, so all start equal
# ---------------------------------------------------------------------------


@dataclass
class Data:
    params: list[torch.Tensor]  # storage dtype of the workload
    grads: list[torch.Tensor]  # same dtype as params
    numel: int


def make_data(shapes: list, dtype: torch.dtype, seed: int = 0) -> Data:
    gen = torch.Generator().manual_seed(seed)
    params, grads = [], []
    for shape in shapes:
        params.append((torch.randn(shape, generator=gen) * 0.02).to(dtype))
        grads.append((torch.randn(shape, generator=gen) * 0.01).to(dtype))
    return Data(params, grads, sum(p.numel() for p in params))


def fresh_params(data: Data) -> list[torch.nn.Parameter]:
    """Own copies of the source parameters, with own copies of the gradients in ``.grad``."""
    out = []
    for p, g in zip(data.params, data.grads, strict=True):
        q = torch.nn.Parameter(p.clone())
        q.grad = g.clone()
        out.append(q)
    return out


_flusher: harness.CacheFlusher | None = None


def flush_cache() -> None:
    global _flusher
    if _flusher is None:
        _flusher = harness.CacheFlusher()
    _flusher()


# ---------------------------------------------------------------------------
# Optional contenders: import or explain
# ---------------------------------------------------------------------------


def _fastopt(attr: str):
    try:
        import fastopt
        from fastopt import backends
    except Exception as exc:
        raise harness.Unavailable(f"fastopt not importable: {type(exc).__name__}: {exc}") from None
    reason = backends.unavailable_reason("cpu")
    if reason is not None:
        raise harness.Unavailable(f"fastopt backend 'cpu' unavailable: {reason}")
    if not hasattr(fastopt, attr):
        raise harness.Unavailable(f"fastopt.{attr} does not exist in this fastopt")
    return getattr(fastopt, attr)


def _deepspeed(module: str, cls: str):
    # A CPU benchmark wants DeepSpeed's CPU op builder even where a GPU exists,
    # and naming the accelerator skips its (noisy) detection.
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    try:
        mod = __import__(f"deepspeed.ops.{module}", fromlist=[cls])
    except Exception as exc:
        raise harness.Unavailable(
            f"DeepSpeed not importable: {type(exc).__name__}: {exc}"
        ) from None
    return getattr(mod, cls)


def _optional_build(what: str, build: Callable[[], object]):
    """Run a peer's constructor, turning a failed JIT build into Unavailable."""
    try:
        return build()
    except Exception as exc:
        raise harness.Unavailable(
            f"{what} could not be built here: {type(exc).__name__}: {str(exc)[:300]}"
        ) from None


# ---------------------------------------------------------------------------
# Contender factories: (Data) -> harness.Contender
# ---------------------------------------------------------------------------

Factory = Callable[[Data], harness.Contender]


def torch_adamw(impl: str, *, clip: bool = False) -> Factory:
    flags = {
        "for-loop": dict(foreach=False),
        "foreach": dict(foreach=True),
        "fused": dict(fused=True),
    }[impl]

    def build(data: Data) -> harness.Contender:
        params = fresh_params(data)
        opt = torch.optim.AdamW(params, **ADAMW_HP, **flags)
        if clip:

            def step():
                clip_grad_norm_(params, MAX_GRAD_NORM)
                opt.step()
        else:
            step = opt.step
        return harness.Contender("", step, keep=[params, opt])

    return build


def fastopt_adamw(
    *, clip: bool = False, master_weights: bool | str = False, state_dtype=None
) -> Factory:
    def build(data: Data) -> harness.Contender:
        AdamW = _fastopt("AdamW")
        params = fresh_params(data)
        opt = AdamW(
            params,
            **ADAMW_HP,
            max_grad_norm=MAX_GRAD_NORM if clip else None,
            master_weights=master_weights,
            state_dtype=state_dtype,
            backend="cpu",
        )
        return harness.Contender("", opt.step, keep=[params, opt])

    return build


def deepspeed_cpu_adam(data: Data) -> harness.Contender:
    cls = _deepspeed("adam", "DeepSpeedCPUAdam")
    params = fresh_params(data)
    opt = _optional_build("DeepSpeedCPUAdam", lambda: cls(params, **ADAMW_HP, adamw_mode=True))
    return harness.Contender("", opt.step, keep=[params, opt])


def scaled(scaler_kind: str, optimizer_kind: str) -> Factory:
    """(e): ``scaler.step(opt); scaler.update()`` on gradients holding grad * LOSS_SCALE.

    The gradients are refilled (and the cache flushed) untimed before every
    step: torch's scaler may rewrite them in place, and every contender must
    see the same scaled values arriving from memory.
    """

    def build(data: Data) -> harness.Contender:
        params = fresh_params(data)
        source = [g * LOSS_SCALE for g in data.grads]
        if optimizer_kind == "torch fused":
            opt = torch.optim.AdamW(params, **ADAMW_HP, fused=True)
        else:
            opt = _fastopt("AdamW")(params, **ADAMW_HP, backend="cpu")
        cls = torch.amp.GradScaler if scaler_kind == "torch" else _fastopt("GradScaler")
        scaler = cls("cpu", init_scale=LOSS_SCALE)
        scaler.scale(torch.ones(()))  # the scale tensor is created lazily by the first scale()

        def prepare():
            for p, s in zip(params, source, strict=True):
                p.grad.copy_(s)
            flush_cache()

        def step():
            scaler.step(opt)
            scaler.update()

        return harness.Contender("", step, prepare=prepare, keep=[params, opt, scaler, source])

    return build


def torch_master_recipe(*, clip: bool = False) -> Factory:
    """(f)/(g): the hand recipe for bf16 params with fp32 masters in stock torch.

    bf16 grads are copied into the fp32 masters' grads, (clip_grad_norm_ on the
    fp32 master grads,) torch's fused AdamW steps the masters, and the masters
    are copied back (rounded to nearest even) into the bf16 params.
    """

    def build(data: Data) -> harness.Contender:
        params = fresh_params(data)  # bf16 params with bf16 grads
        masters = []
        for p in params:
            m = torch.nn.Parameter(p.detach().float())
            m.grad = torch.zeros_like(m)
            masters.append(m)
        opt = torch.optim.AdamW(masters, **ADAMW_HP, fused=True)

        def step():
            for m, p in zip(masters, params, strict=True):
                m.grad.copy_(p.grad)
            if clip:
                clip_grad_norm_(masters, MAX_GRAD_NORM)
            opt.step()
            with torch.no_grad():
                for p, m in zip(params, masters, strict=True):
                    p.copy_(m)

        return harness.Contender("", step, keep=[params, masters, opt])

    return build


def lion_pytorch(data: Data) -> harness.Contender:
    try:
        from lion_pytorch import Lion
    except Exception as exc:
        raise harness.Unavailable(
            f"lion-pytorch not importable: {type(exc).__name__}: {exc}"
        ) from None
    params = fresh_params(data)
    opt = Lion(params, **LION_HP)
    return harness.Contender("", opt.step, keep=[params, opt])


def deepspeed_cpu_lion(data: Data) -> harness.Contender:
    cls = _deepspeed("lion", "DeepSpeedCPULion")
    params = fresh_params(data)
    opt = _optional_build("DeepSpeedCPULion", lambda: cls(params, **LION_HP))
    return harness.Contender("", opt.step, keep=[params, opt])


def fastopt_lion(data: Data) -> harness.Contender:
    Lion = _fastopt("Lion")
    params = fresh_params(data)
    opt = Lion(params, **LION_HP, backend="cpu")
    return harness.Contender("", opt.step, keep=[params, opt])


def _bitsandbytes(cls_name: str, hp: dict) -> Factory:
    """A bitsandbytes optimizer (``pip install bitsandbytes``; from 0.45 on its
    optimizers run on CPU tensors)."""

    def build(data: Data) -> harness.Contender:
        try:
            import bitsandbytes.optim as bnb_optim
        except Exception as exc:
            raise harness.Unavailable(
                f"bitsandbytes not importable: {type(exc).__name__}: {exc}"
            ) from None
        params = fresh_params(data)
        cls = getattr(bnb_optim, cls_name)
        opt = _optional_build(f"bitsandbytes {cls_name}", lambda: cls(params, **hp))
        return harness.Contender("", opt.step, keep=[params, opt])

    return build


bitsandbytes_ademamix = _bitsandbytes("AdEMAMix", ADEMAMIX_HP)
# 8-bit AdamW: the dynamic code in blocks of 256 with an fp32 absmax
bitsandbytes_adamw8bit = _bitsandbytes("AdamW8bit", ADAMW_HP)


class ForeachAdEMAMix:
    """AdEMAMix (Pagliardini et al. 2024, Algorithm 1) written with torch's foreach ops:
    what a user gets without a fused kernel (the benchmark's stock-PyTorch baseline)."""

    def __init__(self, params, lr, betas, alpha, t_alpha, t_beta3, eps, weight_decay):
        self.params = list(params)
        self.lr, (self.b1, self.b2, self.b3), self.alpha = lr, betas, alpha
        self.t_alpha, self.t_beta3, self.eps, self.wd = t_alpha, t_beta3, eps, weight_decay
        self.m1 = [torch.zeros_like(p) for p in self.params]
        self.m2 = [torch.zeros_like(p) for p in self.params]
        self.v = [torch.zeros_like(p) for p in self.params]
        self.t = 0

    @torch.no_grad()
    def step(self) -> None:
        self.t += 1
        t, b1, b2, b3 = self.t, self.b1, self.b2, self.b3
        alpha = min(t * self.alpha / self.t_alpha, self.alpha)
        frac = t / self.t_beta3
        ln1, ln3 = math.log(b1), math.log(b3)
        beta3 = min(math.exp(ln1 * ln3 / ((1 - frac) * ln3 + frac * ln1)), b3)
        grads = [p.grad for p in self.params]
        torch._foreach_lerp_(self.m1, grads, 1 - b1)
        torch._foreach_lerp_(self.m2, grads, 1 - beta3)
        torch._foreach_mul_(self.v, b2)
        torch._foreach_addcmul_(self.v, grads, grads, value=1 - b2)
        denom = torch._foreach_sqrt(self.v)
        torch._foreach_div_(denom, math.sqrt(1 - b2**t))
        torch._foreach_add_(denom, self.eps)
        num = torch._foreach_div(self.m1, 1 - b1**t)
        torch._foreach_add_(num, self.m2, alpha=alpha)
        torch._foreach_div_(num, denom)
        torch._foreach_add_(num, self.params, alpha=self.wd)
        torch._foreach_add_(self.params, num, alpha=-self.lr)


def foreach_ademamix(data: Data) -> harness.Contender:
    params = fresh_params(data)
    opt = ForeachAdEMAMix(params, **ADEMAMIX_HP)
    return harness.Contender("", opt.step, keep=[params, opt])


def fastopt_ademamix(data: Data) -> harness.Contender:
    AdEMAMix = _fastopt("AdEMAMix")
    params = fresh_params(data)
    opt = AdEMAMix(params, **ADEMAMIX_HP, backend="cpu")
    return harness.Contender("", opt.step, keep=[params, opt])


# ---------------------------------------------------------------------------
# Workloads
# ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Target:
    """The issue's goal: ``contender`` at least ``ratio`` times as fast as ``reference``."""

    contender: str
    reference: str
    ratio: float


@dataclass(frozen=True)
class Workload:
    key: str
    title: str
    shapes: str  # which Sizes field
    dtype: torch.dtype
    bytes_per_param: int  # SPEC §5 minimum, from harness.min_bytes_per_param
    baseline: str  # the named torch contender every speedup is relative to
    contenders: tuple[tuple[str, Factory], ...]
    targets: tuple[Target, ...] = field(default=())


FASTOPT = "fastopt AdamW cpu"
ADAMW_CONTENDERS: tuple[tuple[str, Factory], ...] = (
    ("torch AdamW for-loop", torch_adamw("for-loop")),
    ("torch AdamW foreach", torch_adamw("foreach")),
    ("torch AdamW fused", torch_adamw("fused")),
    ("DeepSpeed CPUAdam", deepspeed_cpu_adam),
    (FASTOPT, fastopt_adamw()),
)
BF16 = torch.bfloat16

WORKLOADS: tuple[Workload, ...] = (
    Workload(
        "a",
        "64M fp32 params in 64 tensors, AdamW",
        "big",
        torch.float32,
        harness.min_bytes_per_param("adamw"),
        "torch AdamW fused",
        ADAMW_CONTENDERS,
        (Target(FASTOPT, "torch AdamW fused", 1.0), Target(FASTOPT, "DeepSpeed CPUAdam", 1.0)),
    ),
    Workload(
        "b",
        "4000 tensors x 4096 fp32, AdamW",
        "many",
        torch.float32,
        harness.min_bytes_per_param("adamw"),
        "torch AdamW fused",
        ADAMW_CONTENDERS,
        (Target(FASTOPT, "torch AdamW fused", 3.0),),
    ),
    Workload(
        "c",
        "GPT-2 small shapes (124M fp32, 148 tensors), AdamW",
        "gpt2",
        torch.float32,
        harness.min_bytes_per_param("adamw"),
        "torch AdamW fused",
        ADAMW_CONTENDERS,
    ),
    Workload(
        "d",
        "(a) + global-norm clipping (max norm 1.0)",
        "big",
        torch.float32,
        harness.min_bytes_per_param("adamw", extra_grad_read=True),
        "clip_grad_norm_ + torch fused",
        (
            ("clip_grad_norm_ + torch fused", torch_adamw("fused", clip=True)),
            ("fastopt cpu max_grad_norm", fastopt_adamw(clip=True)),
        ),
        (Target("fastopt cpu max_grad_norm", "clip_grad_norm_ + torch fused", 1.4),),
    ),
    Workload(
        "e",
        "(a) + loss scaling 2^16 (scaler.step + update)",
        "big",
        torch.float32,
        # the non-finite check needs the norm pass: one more read of g (SPEC §3, §5)
        harness.min_bytes_per_param("adamw", extra_grad_read=True),
        "torch GradScaler + torch fused",
        (
            ("torch GradScaler + torch fused", scaled("torch", "torch fused")),
            ("torch GradScaler + fastopt cpu", scaled("torch", "fastopt")),
            ("fastopt GradScaler + fastopt cpu", scaled("fastopt", "fastopt")),
        ),
        (Target("fastopt GradScaler + fastopt cpu", "torch GradScaler + torch fused", 1.2),),
    ),
    Workload(
        "f",
        "bf16 params/grads + fp32 master, AdamW (64M in 64)",
        "big",
        BF16,
        harness.min_bytes_per_param("adamw", param_dtype=BF16, master_weights=True),
        "torch recipe (copy, fused, copy back)",
        (
            ("torch recipe (copy, fused, copy back)", torch_master_recipe()),
            ("fastopt cpu master_weights", fastopt_adamw(master_weights=True)),
        ),
        (Target("fastopt cpu master_weights", "torch recipe (copy, fused, copy back)", 1.6),),
    ),
    Workload(
        "g",
        "(f) + global-norm clipping",
        "big",
        BF16,
        harness.min_bytes_per_param(
            "adamw", param_dtype=BF16, master_weights=True, extra_grad_read=True
        ),
        "torch recipe + clip_grad_norm_",
        (
            ("torch recipe + clip_grad_norm_", torch_master_recipe(clip=True)),
            (
                "fastopt cpu master_weights + max_grad_norm",
                fastopt_adamw(clip=True, master_weights=True),
            ),
        ),
        (
            Target(
                "fastopt cpu master_weights + max_grad_norm", "torch recipe + clip_grad_norm_", 1.9
            ),
        ),
    ),
    Workload(
        "h",
        "64M fp32 params in 64 tensors, Lion",
        "big",
        torch.float32,
        harness.min_bytes_per_param("lion"),
        "lion-pytorch Lion",
        (
            ("lion-pytorch Lion", lion_pytorch),
            ("DeepSpeed CPULion", deepspeed_cpu_lion),
            ("fastopt Lion cpu", fastopt_lion),
        ),
        (
            Target("fastopt Lion cpu", "DeepSpeed CPULion", 1.2),
            Target("fastopt Lion cpu", "lion-pytorch Lion", 6.0),
        ),
    ),
    Workload(
        "i",
        "64M fp32 params in 64 tensors, AdEMAMix (both schedulers on)",
        "big",
        torch.float32,
        harness.min_bytes_per_param("ademamix"),
        "torch foreach AdEMAMix",
        (
            ("torch foreach AdEMAMix", foreach_ademamix),
            ("bitsandbytes AdEMAMix", bitsandbytes_ademamix),
            ("fastopt AdEMAMix cpu", fastopt_ademamix),
        ),
    ),
)
WORKLOADS += (
    Workload(
        "j",
        "(a) per moment storage (state_dtype; GB/s at the fp32 floor of 28 B/param)",
        "big",
        torch.float32,
        harness.min_bytes_per_param("adamw"),
        "torch AdamW fused",
        (
            ("torch AdamW fused", torch_adamw("fused")),
            (FASTOPT, fastopt_adamw()),
            ("fastopt cpu bf16 moments", fastopt_adamw(state_dtype=BF16)),
            ("fastopt cpu int8 moments", fastopt_adamw(state_dtype="int8")),
            ("bitsandbytes AdamW8bit", bitsandbytes_adamw8bit),
        ),
    ),
    Workload(
        "k",
        "(f) per master mode: bf16 params, fp32 master vs remainder (+ 8-bit moments)",
        "big",
        BF16,
        harness.min_bytes_per_param("adamw", param_dtype=BF16, master_weights=True),
        "torch recipe (copy, fused, copy back)",
        (
            ("torch recipe (copy, fused, copy back)", torch_master_recipe()),
            ("fastopt cpu master_weights", fastopt_adamw(master_weights=True)),
            ("fastopt cpu remainder", fastopt_adamw(master_weights="remainder")),
            ("fastopt cpu remainder + bf16 moments",
             fastopt_adamw(master_weights="remainder", state_dtype=BF16)),
            ("fastopt cpu remainder + int8 moments",
             fastopt_adamw(master_weights="remainder", state_dtype="int8")),
        ),
    ),
)
WORKLOADS_BY_KEY = {w.key: w for w in WORKLOADS}
MEMORY_WORKLOAD = "a"


def build_contender(name: str, factory: Factory, data: Data) -> harness.Contender:
    """Construct a contender and run its first step (creating its optimizer state).

    Raises harness.Unavailable when it cannot run here; any other exception is
    a real failure of that contender.
    """
    c = factory(data)
    c.name = name
    if c.prepare is not None:
        c.prepare()
    c.step()
    return c


def _missing_reason(exc: Exception) -> str:
    if isinstance(exc, harness.Unavailable):
        return str(exc)
    return f"FAILED: {type(exc).__name__}: {str(exc)[:300]}"


def run_workload(wl: Workload, sizes: Sizes, rounds: int, log=print) -> dict:
    data = make_data(getattr(sizes, wl.shapes), wl.dtype)
    n_params, n_tensors = data.numel, len(data.params)
    built, missing = [], []
    for name, factory in wl.contenders:
        try:
            built.append(build_contender(name, factory, data))
        except Exception as exc:
            missing.append({"contender": name, "reason": _missing_reason(exc)})
            log(f"  ({wl.key}) skipping {name}: {missing[-1]['reason']}")
    del data
    load = harness.OtherLoad()
    timings = harness.time_interleaved(built, rounds=rounds) if built else {}
    other_load = load.fraction()
    del built
    base = timings.get(wl.baseline)
    rows = []
    for name, _ in wl.contenders:
        if name not in timings:
            continue
        t = timings[name]
        rows.append(
            {
                "contender": name,
                **t.summary(),
                "gbps": wl.bytes_per_param * n_params / t.median / 1e9,
                "speedup_vs_baseline": base.median / t.median if base else None,
            }
        )
    return {
        "key": wl.key,
        "title": wl.title,
        "n_params": n_params,
        "n_tensors": n_tensors,
        "dtype": str(wl.dtype).removeprefix("torch."),
        "bytes_per_param": wl.bytes_per_param,
        "baseline": wl.baseline,
        "other_processes_cpu_fraction": other_load,
        "rows": rows,
        "missing": missing,
    }


# ---------------------------------------------------------------------------
# Peak extra RSS of one step of (a), one fresh process per contender
# ---------------------------------------------------------------------------


def _memory_probe_child(name: str, quick: bool) -> dict:
    torch.set_num_threads(THREADS)
    wl = WORKLOADS_BY_KEY[MEMORY_WORKLOAD]
    sizes = quick_sizes() if quick else full_sizes()
    factory = dict(wl.contenders)[name]
    data = make_data(getattr(sizes, wl.shapes), wl.dtype)
    try:
        c = build_contender(name, factory, data)
    except Exception as exc:
        return {"contender": name, "reason": _missing_reason(exc)}
    del data
    c.step()  # a second untimed step: anything lazily built on step 2 is not "extra"
    return {"contender": name, "peak_extra_mb": harness.peak_extra_rss_mb(c.step)}


def measure_memory(quick: bool, log=print) -> list[dict]:
    """Peak extra RSS of one (a) step per contender, each in a fresh child process.

    NOTE [malloc and peak RSS] in harness.py: the child runs with a small
    malloc mmap threshold so temporaries are visible to the high-water mark.
    """
    env = harness.memory_probe_env()
    env["FASTOPT_BENCH_SYSPATH"] = json.dumps(sys.path)
    code = (
        "import importlib.util, json, os, sys\n"
        "sys.path[:] = json.loads(os.environ['FASTOPT_BENCH_SYSPATH'])\n"
        f"spec = importlib.util.spec_from_file_location('bench_cpu_probe', {os.path.abspath(__file__)!r})\n"
        "mod = importlib.util.module_from_spec(spec); sys.modules[spec.name] = mod\n"
        "spec.loader.exec_module(mod)\n"
        "print('@@' + json.dumps(mod._memory_probe_child(sys.argv[1], sys.argv[2] == '1')))\n"
    )
    out = []
    for name, _ in WORKLOADS_BY_KEY[MEMORY_WORKLOAD].contenders:
        proc = subprocess.run(
            [sys.executable, "-c", code, name, "1" if quick else "0"],
            env=env,
            capture_output=True,
            text=True,
            timeout=600,
        )
        lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("@@")]
        if proc.returncode != 0 or not lines:
            res = {
                "contender": name,
                "reason": f"FAILED: probe exited {proc.returncode}: {proc.stderr.strip()[-300:]}",
            }
        else:
            res = json.loads(lines[-1][2:])
        log(f"  memory {name}: {res.get('peak_extra_mb', res.get('reason'))}")
        out.append(res)
    return out


# ---------------------------------------------------------------------------
# Report
# ---------------------------------------------------------------------------


def evaluate_targets(workloads: list[dict]) -> list[dict]:
    medians = {(w["key"], r["contender"]): r["median_s"] for w in workloads for r in w["rows"]}
    out = []
    for w in workloads:
        for t in WORKLOADS_BY_KEY[w["key"]].targets:
            mine, ref = medians.get((w["key"], t.contender)), medians.get((w["key"], t.reference))
            measured = ref / mine if mine and ref else None
            out.append(
                {
                    "workload": w["key"],
                    "contender": t.contender,
                    "reference": t.reference,
                    "target": t.ratio,
                    "measured": measured,
                    "met": None if measured is None else measured >= t.ratio,
                }
            )
    return out


def render_markdown(result: dict) -> str:
    bw = result["bandwidth"]
    lines = [
        ("" if result["complete"] else "**INCOMPLETE RUN: partial results**\n\n")
        + "## fastopt CPU optimizer-step benchmark"
        + (
            " (QUICK smoke run: small sizes that fit in cache, not a measurement)"
            if result["quick"]
            else ""
        ),
        "",
    ]
    lines += harness.stamp_lines(result["stamp"])
    lines += [
        f"- load average at start {' '.join(f'{x:.2f}' for x in result['load_average_start'])}, "
        f"at end {' '.join(f'{x:.2f}' for x in result['load_average_end'])}; other processes used "
        f"{result['other_processes_cpu_fraction'] * 100:.0f}% of the CPUs over the whole run",
        f"- scale-add bandwidth (`y += a*x`, fp32, {bw['elements'] >> 20}M elements per buffer, "
        f"{result['stamp']['torch_threads']} threads): median {bw['gbps_median']:.1f} GB/s "
        f"(best {bw['gbps_best']:.1f}) over {bw['rounds']} rounds; other procs "
        f"{bw['other_processes_cpu_fraction'] * 100:.0f}% CPU",
        f"- {result['rounds']} interleaved rounds per workload; ms = median per step; spread = IQR / median; "
        "GB/s = SPEC §5 minimum bytes / median time; x base = baseline median / contender median",
        "",
        "| workload | contender | ms | spread | GB/s | % of bw | x base |",
        "|---|---|---:|---:|---:|---:|---:|",
    ]
    for w in result["workloads"]:
        label = (
            f"({w['key']}) {w['title']} [{w['n_params'] / 1e6:.1f}M params, {w['bytes_per_param']} B/param; "
            f"other procs {w['other_processes_cpu_fraction'] * 100:.0f}% CPU]"
        )
        for r in w["rows"]:
            speed = (
                f"{r['speedup_vs_baseline']:.2f}" if r["speedup_vs_baseline"] is not None else "n/a"
            )
            name = f"**{r['contender']}**" if r["contender"] == w["baseline"] else r["contender"]
            lines.append(
                f"| {label} | {name} | {r['median_s'] * 1e3:.1f} | {r['iqr_frac'] * 100:.1f}% | "
                f"{r['gbps']:.1f} | {r['gbps'] / bw['gbps_median'] * 100:.0f}% | {speed} |"
            )
            label = ""
    lines += [
        "",
        'Baseline of each workload in **bold**. "other procs": CPU time other processes used during that workload\'s timing, as a share of the machine (harness.OtherLoad).',
    ]
    noisy = [
        w["key"] for w in result["workloads"] if w["other_processes_cpu_fraction"] > NOISY_FRACTION
    ]
    if noisy:
        lines += [
            f"**WARNING: other processes used more than {NOISY_FRACTION:.0%} of the CPUs while timing "
            f"({', '.join(noisy)}); those numbers are contaminated, rerun on an idle machine.**"
        ]
    missing = [(w["key"], m) for w in result["workloads"] for m in w["missing"]]
    if missing:
        lines += ["", "Missing contenders:"]
        lines += [f"- ({k}) {m['contender']}: {m['reason']}" for k, m in missing]
    if result.get("memory"):
        lines += [
            "",
            "Peak extra resident memory during one step of (a) (MB, fresh process per contender):",
            "",
        ]
        lines += ["| contender | peak extra MB |", "|---|---:|"]
        for m in result["memory"]:
            val = f"{m['peak_extra_mb']:.0f}" if "peak_extra_mb" in m else f"n/a ({m['reason']})"
            lines.append(f"| {m['contender']} | {val} |")
    if result.get("targets"):
        lines += [
            "",
            "Targets (issue 3):",
            "",
            "| workload | contender | vs | target | measured | |",
            "|---|---|---|---:|---:|---|",
        ]
        for t in result["targets"]:
            meas = f"{t['measured']:.2f}x" if t["measured"] is not None else "n/a"
            verdict = {True: "met", False: "MISSED", None: "not measured"}[t["met"]]
            lines.append(
                f"| ({t['workload']}) | {t['contender']} | {t['reference']} | {t['target']:.1f}x | {meas} | {verdict} |"
            )
    return "\n".join(lines) + "\n"


def run(
    quick: bool = False,
    rounds: int | None = None,
    only: str | None = None,
    memory: bool = True,
    wait_idle: float = 0.0,
    log=print,
    on_update: Callable[[dict], object] | None = None,
) -> dict:
    """Measure everything; ``on_update(result)`` sees the partial result after each stage."""
    torch.set_num_threads(THREADS)
    sizes = quick_sizes() if quick else full_sizes()
    rounds = rounds or sizes.rounds
    keys = [k.strip() for k in only.split(",")] if only else [w.key for w in WORKLOADS]
    unknown = [k for k in keys if k not in WORKLOADS_BY_KEY]
    if unknown:
        raise SystemExit(f"unknown workload(s) {unknown}; choose from {list(WORKLOADS_BY_KEY)}")
    whole_run = harness.OtherLoad()
    result = {
        "complete": False,
        "stamp": harness.machine_stamp(
            extra_packages=("deepspeed", "lion-pytorch", "pytest-benchmark")
        ),
        "quick": quick,
        "rounds": rounds,
        "threads": THREADS,
        "load_average_start": harness.load_average(),
        "workloads": [],
        "memory": [],
    }

    def update() -> None:
        result["load_average_end"] = harness.load_average()
        result["other_processes_cpu_fraction"] = whole_run.fraction()
        result["targets"] = evaluate_targets(result["workloads"])
        if on_update is not None:
            on_update(result)

    def maybe_wait() -> None:
        if wait_idle > 0:
            waited = harness.wait_for_idle(wait_idle)
            log(f"  waited {waited:.0f} s for other processes to go quiet")

    log(f"scale-add bandwidth over {sizes.bandwidth_elements >> 20}M elements ...")
    maybe_wait()
    bw_load = harness.OtherLoad()
    bw = harness.scale_add_bandwidth(sizes.bandwidth_elements, rounds=max(rounds, 7)).summary()
    bw["other_processes_cpu_fraction"] = bw_load.fraction()
    result["bandwidth"] = bw
    log(f"  {bw['gbps_median']:.1f} GB/s")
    if memory and MEMORY_WORKLOAD in keys:
        # Peak RSS does not depend on the machine being quiet: measure it first.
        result["memory"] = measure_memory(quick, log=log)
    update()
    for k in keys:
        maybe_wait()
        log(f"workload ({k}) {WORKLOADS_BY_KEY[k].title} ...")
        w = run_workload(WORKLOADS_BY_KEY[k], sizes, rounds, log=log)
        for r in w["rows"]:
            r["fraction_of_scale_add_bw"] = r["gbps"] / bw["gbps_median"]
            log(f"  {r['contender']}: {r['median_s'] * 1e3:.2f} ms")
        result["workloads"].append(w)
        update()
    result["complete"] = True
    update()
    return result


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="small sizes, 3 rounds: a smoke run")
    ap.add_argument(
        "--rounds",
        type=int,
        default=None,
        help="interleaved rounds per workload (default 15; quick 3)",
    )
    ap.add_argument("--only", default=None, help="comma-separated workload keys, e.g. a,b,h")
    ap.add_argument("--no-memory", action="store_true", help="skip the peak-RSS probes of (a)")
    ap.add_argument(
        "--wait-idle",
        type=float,
        default=0.0,
        metavar="S",
        help="before each workload, wait up to S seconds for other processes to leave the CPUs idle",
    )
    ap.add_argument(
        "--json", default=None, help="write the full result (raw per-round times too) here"
    )
    ap.add_argument("--markdown", default=None, help="also write the markdown table here")
    args = ap.parse_args(argv)
    log = lambda msg: print(msg, file=sys.stderr, flush=True)  # noqa: E731 - progress to stderr, table to stdout

    save = harness.result_writer(args.markdown, args.json, render_markdown)

    result = run(
        on_update=save,
        quick=args.quick,
        rounds=args.rounds,
        only=args.only,
        memory=not args.no_memory,
        wait_idle=args.wait_idle,
        log=log,
    )
    print(render_markdown(result))
    return result


if __name__ == "__main__":
    main()
