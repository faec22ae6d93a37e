"""GPU optimizer-step benchmark: fastopt's cuda and triton backends against torch fused and foreach.

    PYTHONPATH=. python -m benchmarks.bench_gpu                        # workloads (a)-(h)
    PYTHONPATH=. python -m benchmarks.bench_gpu --only a,f --json out.json --markdown out.md
    PYTHONPATH=. python -m benchmarks.bench_gpu --device cpu --tiny    # the code path, on CPU

The workloads are bench_cpu's (a)-(h): the same shapes, dtypes, hyperparameters,
clipping threshold, loss scale and SPEC §5 bytes (taken from bench_cpu, not
copied), with GPU contenders: torch.optim.AdamW ``foreach=True`` and
``fused=True`` (for (d) with ``clip_grad_norm_``, for (e) under torch's
GradScaler, for (f)/(g) in the fp32-master recipe), and fastopt with
``backend="triton"`` and ``backend="cuda"``. torch has no Lion, so (h)'s
baseline is Lion written with torch's foreach ops (lion-pytorch too, when it
is installed).

Every row: median ms per step and spread (IQR / median) over interleaved rounds
(NOTE [interleaved rounds] in harness.py; NOTE [CUDA event timing] below),
GB/s = SPEC §5 minimum bytes / median, that as a share of a device-to-device
copy measured in the same run, the speedup against the workload's torch
baseline, the launches of one step (NOTE [counting launches]) and the peak
device memory one step allocates beyond what is resident. Stamped with machine,
GPU, versions, commit and date (harness.machine_stamp).

``--device cpu`` runs the same code on CPU tensors with the wall-clock timer
(harness.time_interleaved) and the triton backend under TRITON_INTERPRET=1:
it exists so the code path can be tested without a GPU
(benchmarks/test_bench_gpu.py, ``scripts/gpu_check.sh --dry-run``), its table
says so in its title, and its numbers are not GPU numbers. Test hook:
``run(timer=...)`` replaces the timing function (same signature as
``cuda_time_interleaved``).
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import gc
import os
import subprocess
import sys
from collections.abc import Callable, Sequence

import torch
from torch.nn.utils import clip_grad_norm_

try:  # run as `python -m benchmarks.bench_gpu` or imported by pytest
    from benchmarks import bench_cpu, harness
except ImportError:  # run as `python benchmarks/bench_gpu.py`
    import bench_cpu  # type: ignore[no-redef]
    import harness  # type: ignore[no-redef]

ADAMW_HP = bench_cpu.ADAMW_HP
LION_HP = bench_cpu.LION_HP
MAX_GRAD_NORM = bench_cpu.MAX_GRAD_NORM
LOSS_SCALE = bench_cpu.LOSS_SCALE
FASTOPT_BACKENDS = ("triton", "cuda")

Data = bench_cpu.Data
Factory = bench_cpu.Factory
Timer = Callable[..., dict]  # (contenders, *, rounds) -> {name: harness.Timing}


# ---------------------------------------------------------------------------
# Sizes
# ---------------------------------------------------------------------------


def full_sizes() -> bench_cpu.Sizes:
    """bench_cpu's full shapes; the copy reference over 2 x 1 GiB (far above any GPU's L2)."""
    return dataclasses.replace(bench_cpu.full_sizes(), bandwidth_elements=256 * 2**20, rounds=21)


def quick_sizes() -> bench_cpu.Sizes:
    return dataclasses.replace(bench_cpu.quick_sizes(), bandwidth_elements=32 * 2**20, rounds=3)


def tiny_sizes() -> bench_cpu.Sizes:
    """For ``--device cpu``: small enough for the Triton interpreter in a few seconds."""
    return bench_cpu.Sizes(
        big=[(64, 64)] * 8,
        many=[(256,)] * 40,
        gpt2=bench_cpu.gpt2_small_shapes(n_layer=1, vocab=256, n_ctx=32, d=32),
        bandwidth_elements=1 << 20,
        rounds=3,
    )


SIZES = {"full": full_sizes, "quick": quick_sizes, "tiny": tiny_sizes}


def make_data(shapes: list, dtype: torch.dtype, device: torch.device, seed: int = 0) -> Data:
    """bench_cpu.make_data's distribution, drawn directly on ``device``."""
    gen = torch.Generator(device=device).manual_seed(seed)
    params, grads = [], []
    for shape in shapes:
        params.append((torch.randn(shape, generator=gen, device=device) * 0.02).to(dtype))
        grads.append((torch.randn(shape, generator=gen, device=device) * 0.01).to(dtype))
    return Data(params, grads, sum(p.numel() for p in params))


# ---------------------------------------------------------------------------
# Contenders: (Data) -> harness.Contender; the device is the data's
# ---------------------------------------------------------------------------


def _fastopt(attr: str, backend: str):
    try:
        import fastopt
        from fastopt import backends
    except Exception as exc:
        raise harness.Unavailable(f"fastopt not importable: {type(exc).__name__}: {exc}") from None
    reason = backends.unavailable_reason(backend)
    if reason is not None:
        raise harness.Unavailable(f"fastopt backend {backend!r} unavailable: {reason}")
    return getattr(fastopt, attr)


def fastopt_adamw(backend: str, *, clip: bool = False, master_weights: bool = False) -> Factory:
    def build(data: Data) -> harness.Contender:
        AdamW = _fastopt("AdamW", backend)
        params = bench_cpu.fresh_params(data)
        opt = AdamW(
            params,
            **ADAMW_HP,
            max_grad_norm=MAX_GRAD_NORM if clip else None,
            master_weights=master_weights,
            backend=backend,
        )
        return harness.Contender("", opt.step, keep=[params, opt])

    return build


def fastopt_lion(backend: str) -> Factory:
    def build(data: Data) -> harness.Contender:
        Lion = _fastopt("Lion", backend)
        params = bench_cpu.fresh_params(data)
        opt = Lion(params, **LION_HP, backend=backend)
        return harness.Contender("", opt.step, keep=[params, opt])

    return build


def scaled(scaler_kind: str, optimizer: str) -> Factory:
    """(e): ``scaler.step(opt); scaler.update()`` on gradients holding grad * LOSS_SCALE.

    ``optimizer`` is "torch fused", "torch foreach" or "fastopt <backend>". The
    gradients are refilled untimed before every step (torch's scaler may
    rewrite them in place; every contender must see the same scaled values).
    """
    kind, impl = optimizer.split()

    def build(data: Data) -> harness.Contender:
        device = data.params[0].device
        params = bench_cpu.fresh_params(data)
        source = [g * LOSS_SCALE for g in data.grads]
        grads = [p.grad for p in params]
        if kind == "torch":
            opt = torch.optim.AdamW(params, **ADAMW_HP, **{impl: True})
        else:
            opt = _fastopt("AdamW", impl)(params, **ADAMW_HP, backend=impl)
        cls = torch.amp.GradScaler if scaler_kind == "torch" else _fastopt("GradScaler", impl)
        scaler = cls(device.type, init_scale=LOSS_SCALE)
        scaler.scale(torch.ones((), device=device))  # the scale tensor is created lazily

        def prepare():
            torch._foreach_copy_(grads, source)

        def step():
            scaler.step(opt)
            scaler.update()

        return harness.Contender("", step, prepare=prepare, keep=[params, opt, scaler, source])

    return build


def torch_master_recipe(impl: str, *, clip: bool = False) -> Factory:
    """(f)/(g): bf16 params with fp32 masters in stock torch, with foreach copies.

    bf16 grads are copied into the fp32 masters' grads, (clip_grad_norm_ on the
    master grads,) torch's AdamW (``impl``: fused or foreach) steps the
    masters, and the masters are copied back (rounded to nearest even) into
    the bf16 params. ``torch._foreach_copy_`` keeps the copies to a few
    launches, as a GPU recipe would.
    """

    def build(data: Data) -> harness.Contender:
        params = bench_cpu.fresh_params(data)  # bf16 params with bf16 grads
        masters = []
        for p in params:
            m = torch.nn.Parameter(p.detach().float())
            m.grad = torch.zeros_like(m)
            masters.append(m)
        opt = torch.optim.AdamW(masters, **ADAMW_HP, **{impl: True})
        master_grads, grads = [m.grad for m in masters], [p.grad for p in params]

        def step():
            with torch.no_grad():
                torch._foreach_copy_(master_grads, grads)
            if clip:
                clip_grad_norm_(masters, MAX_GRAD_NORM, foreach=True)
            opt.step()
            with torch.no_grad():
                torch._foreach_copy_(params, masters)

        return harness.Contender("", step, keep=[params, masters, opt])

    return build


def torch_foreach_lion(data: Data) -> harness.Contender:
    """Lion (SPEC §2) in torch's foreach ops: the strongest stock-torch Lion there is."""
    params = bench_cpu.fresh_params(data)
    ps = [p.detach() for p in params]
    grads = [p.grad for p in params]
    exp_avgs = [torch.zeros_like(p) for p in ps]
    lr, (beta1, beta2), wd = LION_HP["lr"], LION_HP["betas"], LION_HP["weight_decay"]

    def step():
        update = torch._foreach_lerp(exp_avgs, grads, 1 - beta1)  # b1*m + (1-b1)*g
        torch._foreach_sign_(update)
        torch._foreach_mul_(ps, 1 - lr * wd)
        torch._foreach_add_(ps, update, alpha=-lr)
        torch._foreach_lerp_(exp_avgs, grads, 1 - beta2)  # m = b2*m + (1-b2)*g

    return harness.Contender("", step, keep=[params, exp_avgs])


# ---------------------------------------------------------------------------
# Workloads: bench_cpu's (a)-(h) with GPU contenders
# ---------------------------------------------------------------------------


def _fastopt_names(stem: str) -> list[str]:
    return [f"{stem} {b}" for b in FASTOPT_BACKENDS]


def _like(key: str, baseline: str, contenders: Sequence[tuple[str, Factory]]) -> bench_cpu.Workload:
    """bench_cpu's workload ``key`` (title, shapes, dtype, bytes) with these contenders."""
    return dataclasses.replace(
        bench_cpu.WORKLOADS_BY_KEY[key], baseline=baseline, contenders=tuple(contenders), targets=()
    )


def _adamw_contenders(clip: bool = False) -> list[tuple[str, Factory]]:
    torch_prefix = "clip_grad_norm_ + " if clip else ""
    fastopt_stem = "fastopt max_grad_norm" if clip else "fastopt AdamW"
    return [
        (f"{torch_prefix}torch AdamW foreach", bench_cpu.torch_adamw("foreach", clip=clip)),
        (f"{torch_prefix}torch AdamW fused", bench_cpu.torch_adamw("fused", clip=clip)),
    ] + [
        (name, fastopt_adamw(b, clip=clip))
        for name, b in zip(_fastopt_names(fastopt_stem), FASTOPT_BACKENDS)
    ]


def _master_contenders(clip: bool) -> list[tuple[str, Factory]]:
    torch_stem = (
        "torch recipe + clip_grad_norm_" if clip else "torch recipe (copy, AdamW, copy back)"
    )
    fastopt_stem = "fastopt master_weights" + (" + max_grad_norm" if clip else "")
    return [
        (f"{torch_stem} foreach", torch_master_recipe("foreach", clip=clip)),
        (f"{torch_stem} fused", torch_master_recipe("fused", clip=clip)),
    ] + [
        (name, fastopt_adamw(b, clip=clip, master_weights=True))
        for name, b in zip(_fastopt_names(fastopt_stem), FASTOPT_BACKENDS)
    ]


def _workloads() -> tuple[bench_cpu.Workload, ...]:
    scaled_contenders = [
        ("torch GradScaler + torch foreach", scaled("torch", "torch foreach")),
        ("torch GradScaler + torch fused", scaled("torch", "torch fused")),
    ] + [
        (f"fastopt GradScaler + fastopt {b}", scaled("fastopt", f"fastopt {b}"))
        for b in FASTOPT_BACKENDS
    ]
    lion_contenders = [
        ("torch foreach Lion (hand-written)", torch_foreach_lion),
        ("lion-pytorch Lion", bench_cpu.lion_pytorch),
    ] + [(f"fastopt Lion {b}", fastopt_lion(b)) for b in FASTOPT_BACKENDS]
    return (
        _like("a", "torch AdamW fused", _adamw_contenders()),
        _like("b", "torch AdamW fused", _adamw_contenders()),
        _like("c", "torch AdamW fused", _adamw_contenders()),
        _like("d", "clip_grad_norm_ + torch AdamW fused", _adamw_contenders(clip=True)),
        _like("e", "torch GradScaler + torch fused", scaled_contenders),
        _like("f", "torch recipe (copy, AdamW, copy back) fused", _master_contenders(False)),
        _like("g", "torch recipe + clip_grad_norm_ fused", _master_contenders(True)),
        _like("h", "torch foreach Lion (hand-written)", lion_contenders),
    )


WORKLOADS = _workloads()
WORKLOADS_BY_KEY = {w.key: w for w in WORKLOADS}


# ---------------------------------------------------------------------------
# Timing, launches, memory
# ---------------------------------------------------------------------------


def cuda_time_interleaved(
    contenders: Sequence[harness.Contender],
    *,
    rounds: int,
    warmup_rounds: int = 2,
    min_round_seconds: float = 0.01,
) -> dict[str, harness.Timing]:
    """harness.time_interleaved's rounds, timed with CUDA events.

    NOTE [CUDA event timing]: a GPU step returns to Python long before its
    kernels finish, so wall-clock time around ``step()`` measures launches, not
    the step. Each step gets a start and an end event on the current stream;
    the round's time is the mean of their elapsed times, read after one
    synchronisation at the end of the contender's turn (none inside it). When
    the host launches slower than the GPU runs, the GPU waits between kernels
    and that wait is inside the events: the step is charged the time it
    really holds the stream. ``prepare`` (untimed) runs before the start event.
    """
    if rounds < 1:
        raise ValueError("rounds must be >= 1")

    def turn(c: harness.Contender, reps: int) -> float:
        events = []
        for _ in range(reps):
            if c.prepare is not None:
                c.prepare()
            start = torch.cuda.Event(enable_timing=True)
            end = torch.cuda.Event(enable_timing=True)
            start.record()
            c.step()
            end.record()
            events.append((start, end))
        torch.cuda.synchronize()
        return sum(s.elapsed_time(e) for s, e in events) / reps / 1e3

    repeats = {}
    for c in contenders:
        t = min(turn(c, 1) for _ in range(max(1, warmup_rounds)))
        repeats[c.name] = (
            1 if t >= min_round_seconds else min(100, int(min_round_seconds / max(t, 1e-9)) + 1)
        )
    results = {c.name: harness.Timing(c.name, []) for c in contenders}
    n = len(contenders)
    for r in range(rounds):
        gc.collect()
        gc.disable()
        try:
            for k in range(n):
                c = contenders[(r + k) % n]
                results[c.name].seconds.append(turn(c, repeats[c.name]))
        finally:
            gc.enable()
    return results


def default_timer(device: torch.device) -> Timer:
    return cuda_time_interleaved if device.type == "cuda" else harness.time_interleaved


def launch_counts(events, device_type: str) -> dict:
    """Launches in a list of torch.profiler events (``prof.events()``) of one step.

    NOTE [counting launches]: on a GPU every kernel that ran is a CUDA activity
    event in the profile (CUPTI sees kernels whatever launched them: ATen,
    Triton's launcher, our extension), so the count needs no cooperation from
    the code measured; copies and memsets are counted apart from kernels
    (fastopt's scalars moving host to device show up there). On CPU there are
    no device kernels: the count is of top-level aten ops (those not called by
    another aten op), the nearest thing to a launch, so that the code path can
    be tested here.
    """
    from torch.autograd import DeviceType

    names: collections.Counter = collections.Counter()
    if device_type == "cuda":
        memcpy = memset = 0
        for e in events:
            if e.device_type != DeviceType.CUDA:
                continue
            low = e.name.lower()
            if "memcpy" in low:
                memcpy += 1
            elif "memset" in low:
                memset += 1
            else:
                names[e.name[:80]] += 1
        if not names and not memcpy and not memset:
            raise RuntimeError("the profiler recorded no GPU activity (is CUPTI available?)")
        what = "GPU kernels (torch.profiler CUDA activity)"
    else:
        memcpy = memset = 0
        for e in events:
            if e.device_type != DeviceType.CPU or not e.name.startswith("aten::"):
                continue
            parent = e.cpu_parent
            while parent is not None and not parent.name.startswith("aten::"):
                parent = parent.cpu_parent
            if parent is None:
                names[e.name[:80]] += 1
        what = "top-level aten ops (CPU mode: there are no device kernels)"
    return {
        "what": what,
        "kernels": sum(names.values()),
        "memcpy": memcpy,
        "memset": memset,
        "by_name": dict(names.most_common(12)),
    }


def count_launches(c: harness.Contender, device: torch.device) -> dict:
    """Launches of one step of ``c`` (NOTE [counting launches]); ``prepare`` runs outside."""
    from torch.profiler import ProfilerActivity, profile

    cuda = device.type == "cuda"
    if c.prepare is not None:
        c.prepare()
    if cuda:
        torch.cuda.synchronize()
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with profile(activities=activities) as prof:
        c.step()
        if cuda:
            torch.cuda.synchronize()
    return launch_counts(prof.events(), device.type)


def extra_device_mb(c: harness.Contender, device: torch.device) -> float | None:
    """Peak device memory (MB) one step allocates above what is allocated before it."""
    if device.type != "cuda":
        return None  # CPU peak RSS is bench_cpu's business (harness.peak_extra_rss_mb)
    if c.prepare is not None:
        c.prepare()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    c.step()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - before) / 1e6


def copy_bandwidth(n_elements: int, device: torch.device, *, rounds: int, timer: Timer) -> dict:
    """Bandwidth of ``dst.copy_(src)`` in fp32 (8 bytes per element: read + write)."""
    src = torch.ones(n_elements, dtype=torch.float32, device=device)
    dst = torch.empty_like(src)
    c = harness.Contender("copy", lambda: dst.copy_(src))
    t = timer([c], rounds=rounds)["copy"]
    nbytes = 8 * n_elements
    return {
        "kernel": f"dst.copy_(src), fp32, on {device.type} (read src + write dst)",
        "elements": n_elements,
        "bytes_per_pass": nbytes,
        "gbps_median": nbytes / t.median / 1e9,
        "gbps_best": nbytes / min(t.seconds) / 1e9,
        **t.summary(),
    }


# ---------------------------------------------------------------------------
# One workload, the run, the table
# ---------------------------------------------------------------------------


def _release(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def run_workload(
    wl: bench_cpu.Workload,
    sizes: bench_cpu.Sizes,
    rounds: int,
    device: torch.device,
    timer: Timer,
    log=print,
) -> dict:
    data = make_data(getattr(sizes, wl.shapes), wl.dtype, device)
    n_params, n_tensors = data.numel, len(data.params)
    built, missing = [], []
    for name, factory in wl.contenders:
        try:
            built.append(bench_cpu.build_contender(name, factory, data))
        except Exception as exc:
            missing.append({"contender": name, "reason": bench_cpu._missing_reason(exc)})
            log(f"  ({wl.key}) skipping {name}: {missing[-1]['reason']}")
        if device.type == "cuda":
            torch.cuda.synchronize()
    del data
    timings = timer(built, rounds=rounds) if built else {}
    extras = {}
    for c in built:
        extra: dict = {}
        try:
            extra["launches"] = count_launches(c, device)
        except Exception as exc:  # the profiler is a measurement aid: report, never fail the row
            extra["launches"] = {"error": f"{type(exc).__name__}: {str(exc)[:200]}"}
        extra["extra_device_mb"] = extra_device_mb(c, device)
        extras[c.name] = extra
    del built
    _release(device)
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
                **extras[name],
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
        "rows": rows,
        "missing": missing,
    }


def _nvidia_smi(field: str) -> str | None:
    try:
        out = subprocess.run(
            ["nvidia-smi", f"--query-gpu={field}", "--format=csv,noheader"],
            capture_output=True,
            text=True,
            timeout=20,
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    return (
        out.stdout.strip().splitlines()[0] if out.returncode == 0 and out.stdout.strip() else None
    )


def device_stamp(device: torch.device) -> dict:
    """What the benchmark ran on, beyond harness.machine_stamp's host and versions."""
    if device.type != "cuda":
        return {"type": "cpu", "name": f"CPU ({harness._cpu_model()}); no GPU: a code-path run"}
    props = torch.cuda.get_device_properties(device)
    return {
        "type": "cuda",
        "name": props.name,
        "capability": f"{props.major}.{props.minor}",
        "memory_gib": round(props.total_memory / 2**30, 1),
        "sm_count": props.multi_processor_count,
        "torch_cuda": torch.version.cuda,
        "driver": _nvidia_smi("driver_version"),
    }


def run(
    *,
    device: str | torch.device = "cuda",
    sizes: str = "full",
    rounds: int | None = None,
    only: str | None = None,
    timer: Timer | None = None,
    log=print,
    on_update: Callable[[dict], object] | None = None,
) -> dict:
    """Measure the copy reference and every workload; ``on_update`` sees each partial result.

    ``timer`` is the test hook: any function with ``cuda_time_interleaved``'s
    signature; by default CUDA events on a GPU, the wall clock on CPU.
    """
    device = torch.device(device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("no CUDA device (use --device cpu to exercise the code path)")
    if device.type == "cpu":
        torch.set_num_threads(bench_cpu.THREADS)
    timer = timer or default_timer(device)
    sz = SIZES[sizes]()
    rounds = rounds or sz.rounds
    keys = [k.strip() for k in only.split(",")] if only else [w.key for w in WORKLOADS]
    unknown = [k for k in keys if k not in WORKLOADS_BY_KEY]
    if unknown:
        raise SystemExit(f"unknown workload(s) {unknown}; choose from {list(WORKLOADS_BY_KEY)}")
    result = {
        "complete": False,
        "device": device_stamp(device),
        "stamp": harness.machine_stamp(extra_packages=("triton", "lion-pytorch")),
        "timer": f"{timer.__module__}.{timer.__qualname__}",
        "sizes": sizes,
        "rounds": rounds,
        "workloads": [],
        "errors": [],
    }

    def update() -> None:
        if on_update is not None:
            on_update(result)

    log(f"copy bandwidth over {sz.bandwidth_elements >> 20}M fp32 elements on {device} ...")
    result["copy"] = copy_bandwidth(
        sz.bandwidth_elements, device, rounds=max(rounds, 7), timer=timer
    )
    _release(device)
    log(f"  {result['copy']['gbps_median']:.1f} GB/s")
    update()
    for k in keys:
        log(f"workload ({k}) {WORKLOADS_BY_KEY[k].title} ...")
        try:
            w = run_workload(WORKLOADS_BY_KEY[k], sz, rounds, device, timer, log=log)
        except Exception as exc:  # one workload failing (say, out of memory) keeps the others
            result["errors"].append({"workload": k, "error": f"{type(exc).__name__}: {exc}"[:500]})
            log(f"  ({k}) FAILED: {result['errors'][-1]['error']}")
            _release(device)
            update()
            continue
        for r in w["rows"]:
            r["fraction_of_copy_bw"] = r["gbps"] / result["copy"]["gbps_median"]
            log(f"  {r['contender']}: {r['median_s'] * 1e3:.3f} ms")
        result["workloads"].append(w)
        update()
    result["complete"] = True
    update()
    return result


def _launch_cell(row: dict) -> str:
    la = row.get("launches") or {}
    if "kernels" not in la:
        return "n/a"
    copies = la["memcpy"] + la["memset"]
    return f"{la['kernels']}" + (f" +{copies} copy/set" if copies else "")


def render_markdown(result: dict) -> str:
    dev = result["device"]
    on_gpu = dev["type"] == "cuda"
    title = "## fastopt GPU optimizer-step benchmark"
    if not on_gpu:
        title += " (CPU CODE-PATH RUN: no GPU, not GPU numbers)"
    elif result["sizes"] != "full":
        title += f" ({result['sizes'].upper()} sizes: a smoke run, not a measurement)"
    lines = [("" if result["complete"] else "**INCOMPLETE RUN: partial results**\n\n") + title, ""]
    if on_gpu:
        lines.append(
            f"- GPU: {dev['name']} (sm {dev['capability']}, {dev['sm_count']} SMs, "
            f"{dev['memory_gib']} GiB), driver {dev['driver'] or 'unknown'}, torch CUDA {dev['torch_cuda']}"
        )
    else:
        lines.append(f"- device: {dev['name']}")
    lines += harness.stamp_lines(result["stamp"])
    cp = result["copy"]
    lines += [
        f"- copy reference: `{cp['kernel']}`, {cp['elements'] >> 20}M elements: "
        f"median {cp['gbps_median']:.1f} GB/s (best {cp['gbps_best']:.1f}) over {cp['rounds']} rounds",
        f"- {result['rounds']} interleaved rounds per workload, timer `{result['timer']}`; "
        "ms = median per step; spread = IQR / median; GB/s = SPEC §5 minimum bytes / median; "
        "% copy = that / the copy's GB/s; x base = baseline median / contender median; "
        "launches = kernels of one step (+ memcpy/memset); extra MB = peak device memory a step "
        "allocates beyond what is resident",
        "",
        "| workload | contender | ms | spread | GB/s | % copy | x base | launches | extra MB |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for w in result["workloads"]:
        label = (
            f"({w['key']}) {w['title']} [{w['n_params'] / 1e6:.1f}M params in {w['n_tensors']} "
            f"tensors, {w['bytes_per_param']} B/param]"
        )
        for r in w["rows"]:
            speed = (
                f"{r['speedup_vs_baseline']:.2f}" if r["speedup_vs_baseline"] is not None else "n/a"
            )
            name = f"**{r['contender']}**" if r["contender"] == w["baseline"] else r["contender"]
            mb = r.get("extra_device_mb")
            lines.append(
                f"| {label} | {name} | {r['median_s'] * 1e3:.3f} | {r['iqr_frac'] * 100:.1f}% | "
                f"{r['gbps']:.1f} | {r['fraction_of_copy_bw'] * 100:.0f}% | {speed} | "
                f"{_launch_cell(r)} | {'n/a' if mb is None else f'{mb:.0f}'} |"
            )
            label = ""
    lines += ["", "Baseline of each workload in **bold**."]
    if not on_gpu:
        lines += [
            "CPU code-path run: launches are top-level aten ops (NOTE [counting launches]); "
            "times are wall clock on CPU tensors, the triton backend runs in the interpreter."
        ]
    missing = [(w["key"], m) for w in result["workloads"] for m in w["missing"]]
    if missing:
        lines += ["", "Missing contenders:"]
        lines += [f"- ({k}) {m['contender']}: {m['reason']}" for k, m in missing]
    no_count = [
        (w["key"], r["contender"], r["launches"]["error"])
        for w in result["workloads"]
        for r in w["rows"]
        if "error" in (r.get("launches") or {})
    ]
    if no_count:
        lines += ["", "Launches not counted:"]
        lines += [f"- ({k}) {name}: {err}" for k, name, err in no_count]
    if result["errors"]:
        lines += ["", "Failed workloads:"]
        lines += [f"- ({e['workload']}) {e['error']}" for e in result["errors"]]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument(
        "--device",
        default="cuda",
        choices=("cuda", "cpu"),
        help="cuda (default), or cpu to exercise the code path without a GPU",
    )
    size = ap.add_mutually_exclusive_group()
    size.add_argument("--quick", action="store_true", help="bench_cpu's quick sizes: a smoke run")
    size.add_argument("--tiny", action="store_true", help="tiny sizes (for --device cpu)")
    ap.add_argument("--rounds", type=int, default=None, help="interleaved rounds (default 21)")
    ap.add_argument("--only", default=None, help="comma-separated workload keys, e.g. a,f,h")
    ap.add_argument("--json", default=None, help="write the full result (raw per-round times) here")
    ap.add_argument("--markdown", default=None, help="also write the markdown table here")
    args = ap.parse_args(argv)
    log = lambda msg: print(msg, file=sys.stderr, flush=True)  # noqa: E731 - progress to stderr

    if args.device == "cpu":
        # the triton backend runs CPU tensors only under the interpreter; set before triton loads
        os.environ.setdefault("TRITON_INTERPRET", "1")
    elif os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        log("warning: TRITON_INTERPRET is set, so the triton rows cannot run on the GPU")
    if args.device == "cuda" and not torch.cuda.is_available():
        print("skipped: no CUDA device (use --device cpu to exercise the code path)")
        return 0

    save = harness.result_writer(args.markdown, args.json, render_markdown)

    result = run(
        device=args.device,
        sizes="quick" if args.quick else "tiny" if args.tiny else "full",
        rounds=args.rounds,
        only=args.only,
        log=log,
        on_update=save,
    )
    print(render_markdown(result))
    return 1 if result["errors"] else 0


if __name__ == "__main__":
    sys.exit(main())
