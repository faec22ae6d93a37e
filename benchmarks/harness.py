"""The one benchmark harness: interleaved timing, SPEC §5 bytes, bandwidth, stamps.

Everything a benchmark script needs that is not a workload lives here, so every
table fastopt prints is measured and labelled the same way:

* ``time_interleaved``: each round runs every contender once (in a rotated
  order), so slow drift of the machine (frequency, a noisy neighbour) lands on
  all contenders alike; medians and quartiles over the rounds.
* ``min_bytes_per_param``: the minimum memory traffic of one step, written out
  from SPEC §5. GB/s in every table is that minimum divided by the measured
  time (an *effective* bandwidth: a contender that makes extra passes is
  charged its time, not credited its bytes).
* ``scale_add_bandwidth``: what this machine's memory actually streams for
  ``y += a*x`` over buffers far larger than the last-level cache, the ceiling
  an optimizer step can approach.
* ``peak_extra_rss_mb``: peak resident memory a callable adds on top of what is
  resident before it, via the kernel's resettable high-water mark.
* ``machine_stamp``: CPU, ISA, versions, commit and date, attached to every
  result so a number is never separated from where it was measured.
"""

from __future__ import annotations

import datetime as _dt
import gc
import importlib
import importlib.metadata
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

# ---------------------------------------------------------------------------
# SPEC §5: minimum bytes moved per parameter per step
# ---------------------------------------------------------------------------

# exp_avg (+ exp_avg_sq for AdamW; + exp_avg_slow and exp_avg_sq for AdEMAMix)
_STATES_PER_PARAM = {"adamw": 2, "lion": 1, "ademamix": 3}


def min_bytes_per_param(
    algo: str,
    *,
    param_dtype: torch.dtype = torch.float32,
    grad_dtype: torch.dtype | None = None,
    state_dtype: torch.dtype = torch.float32,
    master_weights: bool = False,
    extra_grad_read: bool = False,
) -> int:
    """Bytes one step must move per parameter (SPEC §5), from the storage dtypes.

    Without master weights a step reads p, g and every state and writes back p
    and every state. With master weights (bf16/fp16 params) it reads g, the
    fp32 master and the states, and writes the master, the states and the
    rounded parameter; the low-precision parameter is never read.
    ``extra_grad_read`` adds the one more read of g that a global norm (for
    clipping, or the non-finite check of loss scaling) needs before the update.

    >>> min_bytes_per_param("adamw")                     # p g m v read, p m v written
    28
    >>> min_bytes_per_param("lion")
    20
    >>> min_bytes_per_param("adamw", param_dtype=torch.bfloat16, master_weights=True)
    28
    >>> min_bytes_per_param("adamw", extra_grad_read=True)
    32
    """
    grad_dtype = param_dtype if grad_dtype is None else grad_dtype
    p = torch.empty((), dtype=param_dtype).element_size()
    g = torch.empty((), dtype=grad_dtype).element_size()
    s = torch.empty((), dtype=state_dtype).element_size()
    states = _STATES_PER_PARAM[algo] * s
    if master_weights and p < 4:
        master = 4
        reads = g + master + states
        writes = p + master + states
    else:
        reads = p + g + states
        writes = p + states
    return reads + writes + (g if extra_grad_read else 0)


# ---------------------------------------------------------------------------
# Timing
# ---------------------------------------------------------------------------


class Unavailable(Exception):
    """A contender that cannot run in this environment; the message says why."""


@dataclass
class Contender:
    """One thing being timed: ``step`` is timed, ``prepare`` (if any) runs untimed before it."""

    name: str
    step: Callable[[], object]
    prepare: Callable[[], object] | None = None
    # Objects kept alive with the contender (optimizer, tensors) and dropped with it.
    keep: list = field(default_factory=list)


@dataclass
class Timing:
    """Per-round seconds of one contender and the summary statistics of them."""

    name: str
    seconds: list[float]
    # per round: share of the CPUs other processes used meanwhile (OtherLoad)
    other_load: list[float] = field(default_factory=list)

    @property
    def median(self) -> float:
        return statistics.median(self.seconds)

    def quantile(self, q: float) -> float:
        xs = sorted(self.seconds)
        pos = q * (len(xs) - 1)
        lo = int(pos)
        hi = min(lo + 1, len(xs) - 1)
        return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)

    @property
    def iqr_frac(self) -> float:
        """Interquartile range relative to the median: the spread printed in tables."""
        return (self.quantile(0.75) - self.quantile(0.25)) / self.median

    def summary(self) -> dict:
        return {
            "median_s": self.median,
            "p25_s": self.quantile(0.25),
            "p75_s": self.quantile(0.75),
            "iqr_frac": self.iqr_frac,
            "min_s": min(self.seconds),
            "max_s": max(self.seconds),
            "rounds": len(self.seconds),
            "seconds": list(self.seconds),
            "other_load_per_round": list(self.other_load),
        }


def time_interleaved(
    contenders: Sequence[Contender],
    *,
    rounds: int,
    warmup_rounds: int = 1,
    min_round_seconds: float = 0.02,
) -> dict[str, Timing]:
    """Median-ready per-step times of every contender, measured in interleaved rounds.

    Every round runs each contender once, starting at a different contender each
    round (NOTE [interleaved rounds]). A contender whose step is shorter than
    ``min_round_seconds`` runs several steps per round (the count fixed after
    warm-up, the same in every round) and the round records their mean, so
    timer resolution and per-call jitter stay small against the step.
    ``prepare`` runs untimed before every step.

    NOTE [interleaved rounds]: timing contender A for a minute and then B for a
    minute compares A on one machine state with B on another (thermal and
    frequency drift, a neighbour's load on a shared host). Interleaving makes
    every round a paired comparison; rotating the start removes the bias of
    always running after the same neighbour (whose step leaves the cache full
    of its own data). Python's garbage collector is off during a round so a
    collection triggered by one contender's allocations is not billed to it.
    """
    if rounds < 1:
        raise ValueError("rounds must be >= 1")

    def one_step(c: Contender) -> float:
        if c.prepare is not None:
            c.prepare()
        t0 = time.perf_counter()
        c.step()
        return time.perf_counter() - t0

    # Warm-up: first steps create optimizer state (page faults on fresh
    # memory), build JIT kernels and fill caches; none of it is timed.
    repeats = {}
    for c in contenders:
        t = min(one_step(c) for _ in range(max(1, warmup_rounds)))
        repeats[c.name] = (
            1 if t >= min_round_seconds else min(50, int(min_round_seconds / max(t, 1e-9)) + 1)
        )

    results = {c.name: Timing(c.name, []) for c in contenders}
    n = len(contenders)
    for r in range(rounds):
        gc.collect()
        gc.disable()
        load = OtherLoad()
        try:
            for k in range(n):
                c = contenders[(r + k) % n]
                reps = repeats[c.name]
                total = sum(one_step(c) for _ in range(reps))
                results[c.name].seconds.append(total / reps)
        finally:
            gc.enable()
        frac = load.fraction()
        for t in results.values():
            t.other_load.append(frac)
    return results


# ---------------------------------------------------------------------------
# Machine bandwidth and caches
# ---------------------------------------------------------------------------


def last_level_cache_bytes() -> int:
    """Size of the largest CPU cache that sysfs reports (0 when unknown)."""
    best = 0
    base = Path("/sys/devices/system/cpu/cpu0/cache")
    for idx in base.glob("index*"):
        try:
            text = (idx / "size").read_text().strip()
        except OSError:
            continue
        mult = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}.get(text[-1:], 1)
        digits = text[:-1] if text[-1:] in "KMG" else text
        if digits.isdigit():
            best = max(best, int(digits) * mult)
    return best


class CacheFlusher:
    """Evicts the caches by streaming through a buffer twice the last-level cache.

    Used after an untimed ``prepare`` that touched the data the timed step
    reads next (for example refilling gradients), so that the step starts from
    memory as it would in training rather than from a warm cache.
    """

    def __init__(self) -> None:
        nbytes = max(2 * last_level_cache_bytes(), 64 << 20)
        self._buf = torch.ones(nbytes // 4, dtype=torch.float32)

    def __call__(self) -> None:
        self._buf.add_(0.0)


@dataclass
class Bandwidth:
    timing: Timing
    bytes_per_pass: int

    @property
    def gbps(self) -> float:
        return self.bytes_per_pass / self.timing.median / 1e9

    def summary(self) -> dict:
        return {
            "kernel": "y.add_(x, alpha=a)  (fp32: read x, read y, write y)",
            "elements": self.bytes_per_pass // 12,
            "bytes_per_pass": self.bytes_per_pass,
            "gbps_median": self.gbps,
            "gbps_best": self.bytes_per_pass / min(self.timing.seconds) / 1e9,
            **self.timing.summary(),
        }


def scale_add_bandwidth(n_elements: int, *, rounds: int) -> Bandwidth:
    """Streaming bandwidth of ``y += a*x`` in fp32 with torch's own kernel.

    12 bytes per element (read x, read y, write y) — the same read-modify-write
    shape as an optimizer step, so it is the ceiling an optimizer step can
    approach. Choose ``n_elements`` so that x and y together are many times
    the last-level cache. The threads are whatever ``torch.get_num_threads()``
    is at the call.
    """
    x = torch.full((n_elements,), 1.0, dtype=torch.float32)
    y = torch.full((n_elements,), 2.0, dtype=torch.float32)
    # alpha tiny so y stays well inside normal fp32 range over any number of passes
    c = Contender("scale-add", lambda: y.add_(x, alpha=1e-6))
    timing = time_interleaved([c], rounds=rounds, warmup_rounds=2)["scale-add"]
    return Bandwidth(timing, 12 * n_elements)


class OtherLoad:
    """How much CPU *other* processes used while a measurement ran.

    A benchmark of a 2-thread step on a 2-core machine is only as good as the
    machine is idle: one busy neighbour process deschedules one of the two
    OpenMP workers and every parallel region waits a scheduler time slice for
    it (observed here: a 64K-element ``mul_`` going from 9 us to 15 ms). We
    cannot stop other processes, so every result carries this number instead:
    system busy time (/proc/stat) minus this process's own CPU time
    (/proc/self/stat), as a fraction of all CPUs' time over the interval.
    """

    def __init__(self) -> None:
        self._start = self._sample()

    @staticmethod
    def _sample() -> tuple[int, int, int]:
        fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:9]]
        total = sum(fields)
        busy = total - fields[3] - fields[4]  # minus idle, iowait
        st = Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()
        own = sum(int(x) for x in st[11:15])  # utime stime cutime cstime
        return total, busy, own

    def fraction(self) -> float:
        total, busy, own = self._sample()
        t0, b0, o0 = self._start
        return max(0.0, ((busy - b0) - (own - o0)) / max(1, total - t0))


def wait_for_idle(max_wait_s: float, *, threshold: float = 0.05, window_s: float = 1.0) -> float:
    """Wait (up to ``max_wait_s``) for a ``window_s`` in which others use < ``threshold`` of the CPUs.

    Returns the seconds waited. It only delays a measurement on a shared
    machine; whether the measurement itself was quiet is what OtherLoad
    reports afterwards.
    """
    start = time.monotonic()
    while time.monotonic() - start < max_wait_s:
        probe = OtherLoad()
        time.sleep(window_s)
        if probe.fraction() < threshold:
            break
    return time.monotonic() - start


def load_average() -> tuple[float, float, float]:
    return tuple(float(x) for x in Path("/proc/loadavg").read_text().split()[:3])


# ---------------------------------------------------------------------------
# Peak resident memory
# ---------------------------------------------------------------------------


def _status_kb(key: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{key} not in /proc/self/status")


def peak_extra_rss_mb(fn: Callable[[], object]) -> float:
    """Peak resident memory (MB, 1e6 bytes) that ``fn()`` adds above the RSS before it.

    Writing "5" to /proc/self/clear_refs resets the kernel's high-water mark
    (VmHWM) to the current RSS; VmHWM after the call minus RSS before it is the
    largest transient the call held, whether or not it was freed again.

    NOTE [malloc and peak RSS]: memory that the C allocator got from the
    kernel earlier and kept after a free is already resident, so a temporary
    that reuses it adds nothing to RSS and would be invisible here. Callers
    that want a faithful number run this in a fresh process with
    ``MALLOC_MMAP_THRESHOLD_`` small (``memory_probe_env``), so every sizeable
    block is its own mapping, returned to the kernel on free and faulted in
    fresh (counted) when allocated again.
    """
    Path("/proc/self/clear_refs").write_text("5")
    before = _status_kb("VmRSS")
    fn()
    after = _status_kb("VmHWM")
    return max(0, after - before) * 1024 / 1e6


def memory_probe_env() -> dict[str, str]:
    """Environment for a child process that measures peak RSS (NOTE [malloc and peak RSS])."""
    env = dict(os.environ)
    env["MALLOC_MMAP_THRESHOLD_"] = str(64 * 1024)
    env["MALLOC_TRIM_THRESHOLD_"] = str(64 * 1024)
    return env


# ---------------------------------------------------------------------------
# Stamp
# ---------------------------------------------------------------------------


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _cpu_flags() -> set[str]:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def _git(args: list[str], cwd: Path) -> str | None:
    try:
        out = subprocess.run(
            # --no-optional-locks: never take index.lock, so a benchmark run cannot
            # collide with someone committing in the same checkout.
            ["git", "--no-optional-locks", *args],
            cwd=cwd,
            capture_output=True,
            text=True,
            timeout=10,
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


def package_version(name: str) -> str | None:
    """Version of an installed distribution, or None when it is not installed."""
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def machine_stamp(extra_packages: Sequence[str] = ()) -> dict:
    """Where and with what a result was measured: machine, versions, commit, date.

    The commit is that of the checkout the imported ``fastopt`` comes from (the
    code being measured); without an importable fastopt, that of this file.
    """
    flags = _cpu_flags()
    isa_flags = sorted(
        f
        for f in flags
        if f in {"avx2", "fma", "avx512f", "avx512bw", "avx512_bf16", "avx512_fp16", "amx_bf16"}
    )
    fastopt_info: dict = {"importable": False}
    where = Path(__file__).resolve().parent
    try:
        fastopt = importlib.import_module("fastopt")
        fastopt_info = {
            "importable": True,
            "path": str(Path(fastopt.__file__).resolve().parent),
            "version": getattr(fastopt, "__version__", None) or package_version("fastopt"),
        }
        where = Path(fastopt.__file__).resolve().parent
    except Exception as exc:  # report, never fail the stamp
        fastopt_info["error"] = f"{type(exc).__name__}: {exc}"
    commit = _git(["rev-parse", "HEAD"], where)
    dirty = _git(["status", "--porcelain", "--untracked-files=no"], where)
    return {
        "date_utc": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "cpu_model": _cpu_model(),
        "logical_cpus": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch_cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "isa_flags": isa_flags,
        "last_level_cache_bytes": last_level_cache_bytes(),
        "mem_total_gib": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "fastopt": fastopt_info,
        "git_commit": commit or "unknown (not a git checkout)",
        "git_dirty": bool(dirty) if dirty is not None else None,
        "packages": {name: package_version(name) for name in extra_packages},
        "argv": sys.argv,
    }


def stamp_lines(stamp: dict) -> list[str]:
    """The stamp as short markdown lines to print above a table."""
    fo = stamp["fastopt"]
    fo_text = (
        f"{fo.get('version')} from {fo.get('path')}"
        if fo.get("importable")
        else f"not importable ({fo.get('error')})"
    )
    pkgs = ", ".join(f"{k} {v or 'not installed'}" for k, v in stamp["packages"].items())
    commit = stamp["git_commit"]
    if stamp["git_dirty"] is not None:
        commit = commit[:12] + (" + uncommitted changes" if stamp["git_dirty"] else "")
    return [
        f"- machine: {stamp['cpu_model']}, {stamp['logical_cpus']} logical CPUs, "
        f"torch threads {stamp['torch_threads']}, ISA {stamp['torch_cpu_capability']} "
        f"({' '.join(stamp['isa_flags'])}), LLC {stamp['last_level_cache_bytes'] >> 20} MiB, "
        f"{stamp['mem_total_gib']} GiB RAM",
        f"- versions: python {stamp['python']}, torch {stamp['torch']}, fastopt {fo_text}"
        + (f", {pkgs}" if pkgs else ""),
        f"- commit {commit}, date {stamp['date_utc']}",
    ]


def result_writer(
    markdown: str | None, json_path: str | None, render: Callable[[dict], str]
) -> Callable[[dict], None]:
    """The ``on_update`` callback of a benchmark's ``run``: rewrites the markdown
    (``render``) and JSON outputs after every measurement, so a run cut short
    keeps what it measured."""

    def save(partial: dict) -> None:
        if markdown:
            with open(markdown, "w") as f:
                f.write(render(partial))
        if json_path:
            with open(json_path, "w") as f:
                json.dump(partial, f, indent=1)

    return save
