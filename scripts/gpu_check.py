"""One-shot GPU check (issue 13): build for this GPU, then every GPU path, in one go.

    bash scripts/gpu_check.sh OUTDIR [--dry-run] [--budget SECONDS]

Stages, each in its own process with its own timeout, each timed, a failure
recorded and the next stage run all the same:

  environment   machine, GPU, driver, python/torch/triton/nvcc versions
  build         pip install --no-build-isolation --no-deps -e . for this GPU's arch
  gpu-tests     python -m pytest -m gpu tests benchmarks/test_bench_gpu.py
  benchmark     python -m benchmarks.bench_gpu (workloads (a)-(h), GB/s, launches)
  train-*       python -m fastopt.train --device cuda, 200 steps, bf16 with masters,
                fastopt AdamW (auto and triton backends) against --optimizer torch-adamw

Writes OUTDIR/report.md (self-contained), OUTDIR/results.json and every stage's
full output under OUTDIR/logs/. Exit status 0 when no stage failed.

NOTE [time budget]: the whole check must end within --budget seconds
(default 450, so under 8 minutes with start-up). Every stage has a cap; its
timeout is the smaller of the cap and what is left of the budget after
reserving each later stage's minimum, so a slow stage eats its own slack and
never the later stages' turn. A stage with less than its minimum left is
SKIPPED, saying so.

``--dry-run`` (a machine without a GPU, CI): the GPU-only stages are SKIPPED
with the reason; what needs no GPU still runs for real: argument parsing, the
environment probe, the gpu-marked tests (they skip without a device), the
benchmark's code path on CPU tensors (``bench_gpu --device cpu --tiny``,
whose table says it is not GPU numbers), a check that ``fastopt.train`` has
the flags the GPU runs use plus a few CPU steps through the same stage code,
and the report. It builds nothing: an editable build in place would replace
the checkout's extension.

Standard library only: a broken torch is something to report, not a reason
this script cannot run.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import re
import shutil
import signal
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_BUDGET_S = 450.0
TRAIN_STEPS = 200
PYTHON = sys.executable


# ---------------------------------------------------------------------------
# Stages
# ---------------------------------------------------------------------------


@dataclass
class Stage:
    """One stage's plan and, once run, its outcome."""

    name: str
    title: str
    cap_s: float  # longest it may run (NOTE [time budget])
    min_s: float  # below this much time left it is skipped
    status: str = "PENDING"  # PASS | FAIL | TIMEOUT | SKIPPED
    seconds: float = 0.0
    timeout_s: float | None = None
    command: list[str] | None = None
    rc: int | None = None
    reason: str = ""  # one line: why it failed or was skipped, or what passing showed
    log: str | None = None  # path relative to OUTDIR
    log_tail: list[str] = field(default_factory=list)
    details: dict = field(default_factory=dict)


PLAN = [
    # name, title, cap_s, min_s
    ("environment", "Machine, GPU and versions", 90, 10),
    ("build", "Editable install and extension build for this GPU", 240, 60),
    ("gpu-tests", "gpu-marked tests (pytest -m gpu)", 180, 40),
    ("benchmark", "GPU benchmark, workloads (a)-(h)", 150, 45),
    ("train-fastopt", "Training loop, fastopt AdamW (backend auto)", 75, 25),
    ("train-torch", "Training loop, torch.optim.AdamW (--optimizer torch-adamw)", 75, 25),
    ("train-fastopt-triton", "Training loop, fastopt AdamW (backend triton)", 75, 25),
]

TRAIN_RUNS = {
    "train-fastopt": ["--optimizer", "adamw", "--backend", "auto"],
    "train-torch": ["--optimizer", "torch-adamw"],
    "train-fastopt-triton": ["--optimizer", "adamw", "--backend", "triton"],
}
# The flags every training run passes (checked against --help before running).
TRAIN_FLAGS = ("--device", "--steps", "--precision", "--optimizer", "--backend", "--out")


def make_stages() -> list[Stage]:
    return [Stage(n, t, c, m) for n, t, c, m in PLAN]


class Budget:
    """NOTE [time budget]: the timeout a stage gets and whether it runs at all."""

    def __init__(self, total_s: float, clock=time.monotonic) -> None:
        self.total_s = total_s
        self._clock = clock
        self._start = clock()

    def elapsed(self) -> float:
        return self._clock() - self._start

    def timeout_for(self, stages: list[Stage], index: int) -> float | None:
        """Seconds stage ``index`` may run, or None when it no longer fits."""
        reserve = sum(s.min_s for s in stages[index + 1 :] if s.status == "PENDING")
        left = self.total_s - self.elapsed() - reserve
        stage = stages[index]
        if left < stage.min_s:
            return None
        return min(stage.cap_s, left)


def run_command(
    cmd: list[str], *, log_path: Path, timeout_s: float, env: dict, cwd: Path = ROOT
) -> tuple[int | None, float, bool]:
    """Run ``cmd`` (stdout and stderr into ``log_path``); (rc, seconds, timed_out).

    The command runs in its own session; on timeout the whole process group
    gets SIGTERM, then SIGKILL after 10 s, so a hung pytest worker or compiler
    does not outlive its stage.
    """
    log_path.parent.mkdir(parents=True, exist_ok=True)
    t0 = time.monotonic()
    with open(log_path, "w") as log:
        log.write(f"$ {' '.join(cmd)}\n")
        log.flush()
        try:
            proc = subprocess.Popen(
                cmd, cwd=cwd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
            )
        except OSError as exc:
            log.write(f"could not start: {exc}\n")
            return None, time.monotonic() - t0, False
        try:
            rc = proc.wait(timeout=timeout_s)
            return rc, time.monotonic() - t0, False
        except subprocess.TimeoutExpired:
            for sig, grace in ((signal.SIGTERM, 10), (signal.SIGKILL, 10)):
                try:
                    os.killpg(proc.pid, sig)
                except ProcessLookupError:
                    break
                try:
                    proc.wait(timeout=grace)
                    break
                except subprocess.TimeoutExpired:
                    continue
            log.write(f"\n[gpu_check: timed out after {timeout_s:.0f} s; process group killed]\n")
            return proc.returncode, time.monotonic() - t0, True


def tail(path: Path, n: int = 25) -> list[str]:
    try:
        lines = path.read_text(errors="replace").splitlines()
    except OSError:
        return []
    return [ln[:300] for ln in lines[-n:]]


# ---------------------------------------------------------------------------
# Environment
# ---------------------------------------------------------------------------

PROBE = r"""
import importlib.metadata as md, json, platform, sys
out = {"python": platform.python_version(), "python_executable": sys.executable, "packages": {}}
for name in ("torch", "triton", "numpy", "pytest", "hypothesis", "setuptools", "wheel", "ninja", "pip"):
    try:
        out["packages"][name] = md.version(name)
    except md.PackageNotFoundError:
        out["packages"][name] = None
try:
    import torch
    out["torch"] = torch.__version__
    out["torch_cuda"] = torch.version.cuda
    out["cudnn"] = torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None
    out["cuda_available"] = torch.cuda.is_available()
    if out["cuda_available"]:
        out["gpu_count"] = torch.cuda.device_count()
        p = torch.cuda.get_device_properties(0)
        out["gpu"] = {"name": p.name, "capability": f"{p.major}.{p.minor}",
                      "memory_gib": round(p.total_memory / 2**30, 1),
                      "sm_count": p.multi_processor_count}
except Exception as exc:
    out["torch_error"] = f"{type(exc).__name__}: {exc}"
print("@@" + json.dumps(out))
"""


def _capture(cmd: list[str], timeout: float = 30) -> str | None:
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


def find_cuda_home() -> str | None:
    """The toolkit root, as scripts/run.sh finds it: CUDA_HOME, /usr/local/cuda, nvcc on PATH."""
    candidates = [os.environ.get("CUDA_HOME"), "/usr/local/cuda"]
    nvcc = shutil.which("nvcc")
    if nvcc:
        candidates.append(str(Path(nvcc).resolve().parent.parent))
    for c in candidates:
        if c and (Path(c) / "bin" / "nvcc").exists() and (Path(c) / "include").is_dir():
            return c
    return None


def host_info() -> dict:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem_gib = None
    try:
        mem_gib = round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1)
    except (ValueError, OSError):
        pass
    return {
        "cpu_model": cpu,
        "logical_cpus": os.cpu_count(),
        "mem_gib": mem_gib,
        "platform": platform.platform(),
    }


def git_info() -> dict:
    commit = _capture(["git", "--no-optional-locks", "-C", str(ROOT), "rev-parse", "HEAD"], 10)
    dirty = _capture(
        ["git", "--no-optional-locks", "-C", str(ROOT), "status", "--porcelain", "-uno"], 10
    )
    return {
        "commit": commit or "unknown (not a git checkout)",
        "dirty": None if dirty is None else bool(dirty),
    }


def stage_environment(stage: Stage, ctx: dict) -> None:
    log = ctx["outdir"] / "logs" / "environment.log"
    rc, secs, timed_out = run_command(
        [PYTHON, "-c", PROBE], log_path=log, timeout_s=stage.timeout_s, env=ctx["env"]
    )
    stage.command = [PYTHON, "-c", "<environment probe>"]
    lines = [ln for ln in log.read_text(errors="replace").splitlines() if ln.startswith("@@")]
    probe = json.loads(lines[-1][2:]) if lines else {}
    cuda_home = find_cuda_home()
    nvcc = _capture([str(Path(cuda_home) / "bin" / "nvcc"), "--version"]) if cuda_home else None
    smi = _capture(
        ["nvidia-smi", "--query-gpu=name,driver_version,memory.total", "--format=csv,noheader"]
    )
    release = re.search(r"release [^\n]*", nvcc or "")
    info = {
        "host": host_info(),
        "probe": probe,
        "cuda_home": cuda_home,
        "nvcc": release.group(0) if release else None,
        "nvidia_smi": smi.splitlines() if smi else None,
        "driver": smi.splitlines()[0].split(",")[1].strip() if smi else None,
        "git": git_info(),
    }
    stage.details = info
    ctx["env_info"] = info
    stage.rc, stage.seconds = rc, secs
    if timed_out or not probe:
        stage.status, stage.reason = "FAIL", "the environment probe did not report (log below)"
    elif "torch_error" in probe:
        stage.status, stage.reason = "FAIL", f"torch does not import: {probe['torch_error']}"
    elif not probe.get("cuda_available") and not ctx["dry_run"]:
        stage.status = "FAIL"
        stage.reason = (
            "torch sees no CUDA device (torch.cuda.is_available() is False); use --dry-run"
        )
    else:
        gpu = probe.get("gpu")
        stage.status = "PASS"
        stage.reason = f"GPU {gpu['name']} (sm {gpu['capability']})" if gpu else "no GPU"


# ---------------------------------------------------------------------------
# Build
# ---------------------------------------------------------------------------


def arch_list(env_info: dict) -> str | None:
    """TORCH_CUDA_ARCH_LIST for the local GPU only ("9.0" on an H100/H200)."""
    gpu = (env_info.get("probe") or {}).get("gpu")
    return gpu["capability"] if gpu else None


PIP_EDITABLE = ["-m", "pip", "install", "--no-build-isolation", "--no-deps", "-v", "-e", "."]
SETUP_INPLACE = ["setup.py", "build_ext", "--inplace"]

CHECK_IMPORT = (
    "import fastopt, fastopt._C; from fastopt import _build_info as b; "
    "print('@@' + __import__('json').dumps({'backends': fastopt.available_backends(), "
    "'with_cuda': b.WITH_CUDA, 'cuda_reason': b.CUDA_REASON}))"
)


def _import_check(ctx: dict, name: str, deadline: float | None = None) -> dict | None:
    """What the installed extension offers; within the build stage's ``deadline`` (monotonic)."""
    log = ctx["outdir"] / "logs" / f"{name}.log"
    timeout = 45.0 if deadline is None else max(5.0, min(45.0, deadline - time.monotonic()))
    run_command([PYTHON, "-c", CHECK_IMPORT], log_path=log, timeout_s=timeout, env=ctx["env"])
    lines = [ln for ln in log.read_text(errors="replace").splitlines() if ln.startswith("@@")]
    return json.loads(lines[-1][2:]) if lines else None


def build_attempts(first_log: str | None) -> list[tuple[str, list[str], dict]]:
    """What to try after the editable install failed, given its log.

    NOTE [build fallbacks]: the GPU machine is borrowed for minutes, so a
    failed build must not leave the later stages with nothing to run.
    If pip failed before compiling anything (an externally managed Python, a
    setuptools too old for pyproject's metadata, no pip), ``setup.py build_ext
    --inplace`` builds the same extension without pip; the stages import
    fastopt from the checkout (PYTHONPATH). If the CUDA compile itself failed,
    rebuilding it would fail again: the CPU-only extension lets the triton
    and training stages still run. Either way the build stage reports FAIL.
    """
    compiled = first_log is not None and re.search(r"^\s*\[\d+/\d+\]", first_log, re.M)
    attempts = []
    if not compiled:
        attempts.append(("setup.py build_ext --inplace", [PYTHON, *SETUP_INPLACE], {}))
    attempts.append(
        ("CPU-only editable install", [PYTHON, *PIP_EDITABLE], {"FASTOPT_BUILD_CUDA": "0"})
    )
    return attempts


def stage_build(stage: Stage, ctx: dict) -> None:
    arch = arch_list(ctx.get("env_info", {}))
    # No network: pip never waits on an index. A throwaway machine's system Python may be
    # marked externally managed (PEP 668); installing into it is what this check is for.
    env = dict(ctx["env"], PIP_NO_INDEX="1", PIP_BREAK_SYSTEM_PACKAGES="1")
    if arch:
        env["TORCH_CUDA_ARCH_LIST"] = arch
    cuda_home = (ctx.get("env_info") or {}).get("cuda_home")
    if cuda_home:
        env.setdefault("CUDA_HOME", cuda_home)
    stage.command = [PYTHON, *PIP_EDITABLE]
    stage.details["TORCH_CUDA_ARCH_LIST"] = arch
    stage.details["CUDA_HOME"] = cuda_home
    if ctx["dry_run"]:
        stage.status = "SKIPPED"
        stage.reason = (
            "dry run: an editable build here would replace this checkout's extension; "
            f"the GPU run builds with TORCH_CUDA_ARCH_LIST from the GPU ({arch or 'none: no GPU'})"
        )
        stage.details["installed"] = _import_check(ctx, "build-import-check")
        return
    deadline = time.monotonic() + stage.timeout_s
    stage.log = "logs/build.log"
    log = ctx["outdir"] / stage.log
    # the GPU run must build the CUDA kernels: fail loudly rather than skip them
    rc, secs, timed_out = run_command(
        stage.command,
        log_path=log,
        timeout_s=stage.timeout_s,
        env=dict(env, FASTOPT_BUILD_CUDA="1"),
    )
    stage.rc = rc
    text = log.read_text(errors="replace")
    stage.details["decisions"] = sorted(
        {ln.strip() for ln in text.splitlines() if "fastopt:" in ln}
    )[:5]
    stage.details["attempts"] = [{"what": "pip editable install", "rc": rc, "seconds": secs,
                                  "timed_out": timed_out, "log": stage.log}]  # fmt: skip
    check = (
        _import_check(ctx, "build-import-check", deadline) if rc == 0 and not timed_out else None
    )
    stage.details["installed"] = check
    if check is not None and check["with_cuda"]:
        stage.status, stage.reason = "PASS", f"backends {check['backends']}"
        return
    if rc == 0 and not timed_out:
        stage.status, stage.reason = "FAIL", "pip install succeeded but `import fastopt._C` fails"
    else:
        stage.status = "TIMEOUT" if timed_out else "FAIL"
        stage.reason = "`pip install --no-build-isolation --no-deps -e .` with CUDA kernels failed"
    stage.log_tail = tail(log)
    for i, (what, cmd, extra) in enumerate(build_attempts(text)):  # NOTE [build fallbacks]
        left = deadline - time.monotonic()
        if left < 20:
            break
        name = f"logs/build-fallback-{i + 1}.log"
        rc2, secs2, to2 = run_command(
            cmd, log_path=ctx["outdir"] / name, timeout_s=left, env=dict(env, **extra)
        )
        stage.details["attempts"].append({"what": what, "command": cmd, "env": extra, "rc": rc2,
                                          "seconds": secs2, "timed_out": to2, "log": name})  # fmt: skip
        if rc2 == 0:
            check = _import_check(ctx, f"build-import-check-{i + 1}", deadline)
            if check is not None:
                stage.details["installed"] = check
                stage.reason += f"; fallback {what} worked: backends {check['backends']}"
                return
        stage.reason += f"; fallback {what} failed too ({name})"


# ---------------------------------------------------------------------------
# gpu-marked tests
# ---------------------------------------------------------------------------


def parse_junit(path: Path) -> dict:
    """Counts, failures and skip reasons from pytest's --junitxml."""
    import xml.etree.ElementTree as ET

    try:
        root = ET.parse(path).getroot()
    except (OSError, ET.ParseError) as exc:
        return {"error": f"no junit report: {exc}"}
    counts = {"passed": 0, "failed": 0, "errors": 0, "skipped": 0}
    failed, skips = [], {}
    for case in root.iter("testcase"):
        test_id = f"{case.get('classname', '')}::{case.get('name', '')}"
        outcome = "passed"
        for child in case:
            if child.tag in ("failure", "error"):
                outcome = "failed" if child.tag == "failure" else "errors"
                failed.append({"test": test_id, "message": (child.get("message") or "")[:300]})
            elif child.tag == "skipped":
                outcome = "skipped"
                msg = (child.get("message") or "").strip()[:200]
                skips[msg] = skips.get(msg, 0) + 1
        counts[outcome] += 1
    return {"counts": counts, "failed": failed[:50], "skip_reasons": skips}


def stage_gpu_tests(stage: Stage, ctx: dict) -> None:
    junit = ctx["outdir"] / "gpu_tests.xml"
    # benchmarks/test_bench_gpu.py's gpu-marked cases test the benchmark's CUDA timer and
    # launch counter on the device.
    stage.command = [
        PYTHON, "-m", "pytest", "-m", "gpu", "tests", "benchmarks/test_bench_gpu.py", "-q",
        "-p", "no:cacheprovider", "-rfE", f"--junitxml={junit}",
    ]  # fmt: skip
    env = dict(ctx["env"])
    if not ctx["dry_run"]:
        # compiled Triton on the GPU (tests/conftest.py defaults to the interpreter)
        env["TRITON_INTERPRET"] = "0"
    stage.log = "logs/gpu-tests.log"
    rc, secs, timed_out = run_command(
        stage.command,
        log_path=ctx["outdir"] / stage.log,
        timeout_s=stage.timeout_s,
        env=env,
    )
    stage.rc, stage.seconds = rc, secs
    stage.details = parse_junit(junit)
    counts = stage.details.get("counts", {})
    summary = ", ".join(f"{v} {k}" for k, v in counts.items() if v) or "no result"
    if timed_out:
        stage.status, stage.reason = "TIMEOUT", f"after {stage.timeout_s:.0f} s ({summary} so far)"
    elif rc == 5:
        stage.status, stage.reason = "FAIL", "no gpu-marked tests were collected"
    elif rc != 0:
        stage.status, stage.reason = "FAIL", summary
    elif ctx["dry_run"] and counts.get("passed", 0) == 0:
        stage.status = "SKIPPED"
        stage.reason = f"dry run, no GPU: every gpu-marked test skipped itself ({summary})"
    else:
        stage.status, stage.reason = "PASS", summary
    if stage.status in ("FAIL", "TIMEOUT"):
        stage.log_tail = tail(ctx["outdir"] / stage.log)


# ---------------------------------------------------------------------------
# Benchmark
# ---------------------------------------------------------------------------


def bench_verdict(result: dict | None, dry_run: bool) -> tuple[str, str]:
    """(status, reason) of a bench_gpu result: every fastopt contender must have run on a GPU."""
    if result is None:
        return "FAIL", "the benchmark wrote no bench.json"
    problems = [f"({e['workload']}) {e['error']}" for e in result.get("errors", [])]
    for w in result.get("workloads", []):
        for m in w["missing"]:
            needed = m["contender"].startswith("fastopt") or m["contender"] == w["baseline"]
            if m["reason"].startswith("FAILED") or (needed and not dry_run):
                problems.append(f"({w['key']}) {m['contender']}: {m['reason']}")
    if not result.get("complete"):
        problems.insert(0, "incomplete run")
    if problems:
        return "FAIL", f"{len(problems)} problem(s): " + "; ".join(problems)
    n_rows = sum(len(w["rows"]) for w in result["workloads"])
    if dry_run:
        return "SKIPPED", (
            f"dry run, no GPU: the code path ran on CPU tensors ({n_rows} rows, tiny sizes); "
            "its table below is not GPU numbers"
        )
    return "PASS", f"{n_rows} rows over {len(result['workloads'])} workloads"


def stage_benchmark(stage: Stage, ctx: dict) -> None:
    out = ctx["outdir"]
    stage.command = [
        PYTHON, "-m", "benchmarks.bench_gpu", "--json", str(out / "bench.json"),
        "--markdown", str(out / "bench.md"),
    ]  # fmt: skip
    env = dict(ctx["env"])
    if ctx["dry_run"]:
        stage.command += ["--device", "cpu", "--tiny"]
        env["TRITON_INTERPRET"] = "1"
    else:
        stage.command += ["--device", "cuda"]
        env["TRITON_INTERPRET"] = "0"
    stage.log = "logs/benchmark.log"
    rc, secs, timed_out = run_command(
        stage.command, log_path=out / stage.log, timeout_s=stage.timeout_s, env=env
    )
    stage.rc, stage.seconds = rc, secs
    try:
        result = json.loads((out / "bench.json").read_text())
    except (OSError, ValueError):
        result = None
    ctx["bench"] = result
    stage.status, stage.reason = bench_verdict(result, ctx["dry_run"])
    if timed_out:
        stage.status = "TIMEOUT"
        stage.reason = f"after {stage.timeout_s:.0f} s; partial results kept. {stage.reason}"
    elif rc != 0 and stage.status != "FAIL":
        stage.status, stage.reason = "FAIL", f"exit status {rc}. {stage.reason}"
    if stage.status in ("FAIL", "TIMEOUT"):
        stage.log_tail = tail(out / stage.log)


# ---------------------------------------------------------------------------
# Training loop
# ---------------------------------------------------------------------------


def missing_train_flags(help_text: str) -> list[str]:
    return [f for f in TRAIN_FLAGS if not re.search(rf"(^|[\s\[,]){re.escape(f)}\b", help_text)]


def train_command(name: str, out_dir: Path, dry_run: bool) -> list[str]:
    cmd = [PYTHON, "-m", "fastopt.train", *TRAIN_RUNS[name], "--out", str(out_dir)]
    cmd += ["--no-progress", "--no-plot"]
    if dry_run:
        # the stage's code path on CPU: a tiny model for a few steps, not a measurement
        return cmd + ["--device", "cpu", "--precision", "bf16", "--steps", "3", "--eval-every", "3",
                      "--eval-batches", "1", "--d-model", "32", "--n-layers", "1", "--n-heads", "2",
                      "--batch-size", "2", "--seq-len", "32"]  # fmt: skip
    return cmd + ["--device", "cuda", "--precision", "bf16", "--steps", str(TRAIN_STEPS),
                  "--eval-every", "100"]  # fmt: skip


def summarize_metrics(path: Path, warmup: int = 10) -> dict:
    """The numbers of one run from its metrics.jsonl (one JSON object per step or evaluation)."""
    recs = [json.loads(ln) for ln in path.read_text().splitlines() if ln.strip()]
    steps = [r for r in recs if "loss" in r and "candidate" not in r]
    vals = [r for r in recs if "val_loss" in r and "candidate" not in r]
    timed = steps[warmup:] or steps

    def med(key: str) -> float | None:
        xs = [r[key] for r in timed if isinstance(r.get(key), (int, float))]
        return statistics.median(xs) * 1e3 if xs else None

    losses = [r["loss"] for r in steps[-20:] if isinstance(r.get("loss"), (int, float))]
    tok = sum(r.get("tokens_step", 0) for r in timed)
    secs = sum(r.get("step_time", 0.0) for r in timed)
    return {
        "steps": len(steps),
        "last_step": steps[-1]["step"] if steps else None,
        "train_loss_last20": statistics.fmean(losses) if losses else None,
        "val_loss": vals[-1]["val_loss"] if vals else None,
        "median_step_ms": med("step_time"),
        "median_opt_ms": med("opt_time"),
        "tokens_per_s": tok / secs if secs > 0 else None,
        "skipped_steps": sum(1 for r in steps if r.get("skipped")),
        "steps_excluded_as_warmup": len(steps) - len(timed),
    }


def stage_train(stage: Stage, ctx: dict) -> None:
    if "train_help" not in ctx:
        log = ctx["outdir"] / "logs" / "train-help.log"
        rc, _, _ = run_command(
            [PYTHON, "-m", "fastopt.train", "--help"], log_path=log, timeout_s=60, env=ctx["env"]
        )
        ctx["train_help"] = log.read_text(errors="replace") if rc == 0 else None
    out_dir = ctx["outdir"] / "train" / stage.name.removeprefix("train-")
    stage.command = train_command(stage.name, out_dir, ctx["dry_run"])
    if ctx["train_help"] is None:
        stage.status = "FAIL"
        stage.reason = "`python -m fastopt.train --help` failed (logs/train-help.log)"
        stage.log_tail = tail(ctx["outdir"] / "logs" / "train-help.log")
        return
    missing = missing_train_flags(ctx["train_help"])
    if missing:
        stage.status = "FAIL"
        stage.reason = f"fastopt.train has no {', '.join(missing)}: the GPU run cannot be made"
        return
    if ctx["dry_run"] and stage.name != "train-fastopt":
        stage.status = "SKIPPED"
        stage.reason = (
            "dry run, no GPU (the flags it uses exist; train-fastopt ran the stage's code on CPU)"
        )
        return
    shutil.rmtree(out_dir, ignore_errors=True)
    stage.log = f"logs/{stage.name}.log"
    rc, secs, timed_out = run_command(
        stage.command, log_path=ctx["outdir"] / stage.log, timeout_s=stage.timeout_s, env=ctx["env"]
    )
    stage.rc, stage.seconds = rc, secs
    metrics = out_dir / "metrics.jsonl"
    if metrics.exists():
        try:
            stage.details = summarize_metrics(metrics)
        except (ValueError, KeyError, TypeError) as exc:
            stage.details = {"error": f"unreadable metrics.jsonl: {exc}"}
    want = 3 if ctx["dry_run"] else TRAIN_STEPS
    if timed_out:
        stage.status, stage.reason = "TIMEOUT", f"after {stage.timeout_s:.0f} s"
    elif rc != 0:
        stage.status, stage.reason = "FAIL", f"exit status {rc}"
    elif stage.details.get("steps") != want:
        stage.status = "FAIL"
        stage.reason = f"{stage.details.get('steps')} steps in metrics.jsonl, expected {want}"
    elif ctx["dry_run"]:
        stage.status = "SKIPPED"
        stage.reason = (
            "dry run, no GPU: 3 steps of a tiny model on CPU ran the stage's code (not GPU numbers)"
        )
    else:
        stage.status = "PASS"
        stage.reason = f"{want} steps, final val loss {stage.details.get('val_loss')}"
    if stage.status in ("FAIL", "TIMEOUT"):
        stage.log_tail = tail(ctx["outdir"] / stage.log)


RUNNERS = {
    "environment": stage_environment,
    "build": stage_build,
    "gpu-tests": stage_gpu_tests,
    "benchmark": stage_benchmark,
    "train-fastopt": stage_train,
    "train-torch": stage_train,
    "train-fastopt-triton": stage_train,
}


# ---------------------------------------------------------------------------
# Report
# ---------------------------------------------------------------------------


def overall(stages: list[Stage]) -> str:
    return "FAIL" if any(s.status in ("FAIL", "TIMEOUT") for s in stages) else "PASS"


def _fmt(x, spec: str = ".3f") -> str:
    return "n/a" if x is None else format(x, spec)


def render_report(results: dict) -> str:
    stages = [Stage(**s) for s in results["stages"]]
    env = results.get("environment") or {}
    probe = env.get("probe") or {}
    pk = probe.get("packages") or {}
    gpu = probe.get("gpu")
    host = env.get("host") or {}
    git = env.get("git") or {}
    verdict = results["overall"]
    head = f"# fastopt GPU check: {verdict}" + (" (DRY RUN)" if results["dry_run"] else "")
    lines = [head, ""]
    if results["dry_run"]:
        lines += [
            "**DRY RUN on a machine without a GPU: nothing below is a GPU number.** Stages that "
            "need a GPU are SKIPPED with the reason; what needs none ran for real.",
            "",
        ]
    commit = git.get("commit", "unknown")
    if git.get("dirty") is not None:
        commit = commit[:12] + (" + uncommitted changes" if git["dirty"] else "")
    lines += [
        f"- date {results['started_utc']} (UTC), {results['total_s']:.0f} s in all, "
        f"budget {results['budget_s']:.0f} s; command `{' '.join(results['argv'])}`",
        f"- machine: {host.get('cpu_model')}, {host.get('logical_cpus')} logical CPUs, "
        f"{host.get('mem_gib')} GiB RAM, {host.get('platform')}",
        "- GPU: "
        + (
            f"{gpu['name']} (sm {gpu['capability']}, {gpu['sm_count']} SMs, {gpu['memory_gib']} GiB)"
            f" x{probe.get('gpu_count', 1)}, driver {env.get('driver') or 'unknown'}"
            if gpu
            else "none visible to torch"
        ),
        f"- versions: python {probe.get('python')} ({probe.get('python_executable')}), "
        f"torch {probe.get('torch')} (CUDA {probe.get('torch_cuda')}, cuDNN {probe.get('cudnn')}), "
        f"triton {pk.get('triton')}, nvcc {env.get('nvcc') or 'not found'} "
        f"({env.get('cuda_home') or 'no CUDA_HOME'})",
        "- build tools and test deps: "
        + ", ".join(f"{k} {pk.get(k) or 'MISSING'}" for k in ("pip", "setuptools", "wheel", "ninja", "numpy", "pytest", "hypothesis")),
        f"- fastopt commit {commit}",
        "",
        "## Stages",
        "",
        "| # | stage | status | seconds | timeout s | result |",
        "|---|---|---|---:|---:|---|",
    ]  # fmt: skip
    for i, s in enumerate(stages):
        reason = s.reason.replace("|", "/")
        if len(reason) > 240:  # the whole reason is in the stage's section or results.json
            reason = reason[:240] + " ..."
        lines.append(
            f"| {i} | {s.name}: {s.title} | **{s.status}** | {s.seconds:.1f} | "
            f"{_fmt(s.timeout_s, '.0f')} | {reason} |"
        )
    by_name = {s.name: s for s in stages}

    build = by_name.get("build")
    if build is not None:
        lines += ["", "## Build", ""]
        lines += [f"- command: `{' '.join(build.command or [])}`"]
        arch = build.details.get("TORCH_CUDA_ARCH_LIST") or "unset (no GPU seen)"
        lines += [f"- TORCH_CUDA_ARCH_LIST={arch}, CUDA_HOME={build.details.get('CUDA_HOME')}"]
        for d in build.details.get("decisions", []):
            lines.append(f"- `{d}`")
        inst = build.details.get("installed")
        if inst:
            lines.append(f"- installed extension: backends {inst['backends']}, CUDA kernels {inst['with_cuda']} ({inst['cuda_reason']})")  # fmt: skip

    tests = by_name.get("gpu-tests")
    if tests is not None and tests.details:
        lines += ["", "## gpu-marked tests", ""]
        counts = tests.details.get("counts")
        if counts:
            lines.append("- " + ", ".join(f"{v} {k}" for k, v in counts.items()))
        for f in tests.details.get("failed", []):
            lines.append(f"- FAILED `{f['test']}`: {f['message']}")
        skips = tests.details.get("skip_reasons") or {}
        if skips:
            lines.append("- skip reasons:")
            lines += [f"  - {n} x {msg or '(no reason)'}" for msg, n in skips.items()]
        if "error" in tests.details:
            lines.append(f"- {tests.details['error']}")

    lines += ["", "## GPU benchmark", ""]
    bench = by_name.get("benchmark")
    if bench is not None and bench.status in ("FAIL", "TIMEOUT"):
        lines += [f"**{bench.status}**: {bench.reason}", ""]
    if results.get("bench_markdown"):
        lines.append(results["bench_markdown"].replace("## fastopt", "### fastopt", 1).rstrip())
    else:
        lines.append("No benchmark table (see the benchmark stage).")

    train = [by_name[n] for n in TRAIN_RUNS if n in by_name]
    lines += [
        "",
        "## Training loop",
        "",
        (
            f"{TRAIN_STEPS} steps on the GPU, `--precision bf16` (autocast; fastopt keeps bf16 "
            "params with fp32 masters, torch-adamw keeps fp32 params), default model; the "
            "times are as the loop logs them (host wall clock per step, first 10 steps excluded)."
            if not results["dry_run"]
            else "Dry run: only train-fastopt ran, 3 steps of a tiny model on CPU (not GPU numbers)."
        ),
        "",
        "| run | status | seconds | steps | train loss (last 20) | val loss | step ms | opt ms | tokens/s | skipped |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]  # fmt: skip
    for s in train:
        d = s.details
        tok = d.get("tokens_per_s")
        lines.append(
            f"| {s.name} (`{' '.join(TRAIN_RUNS[s.name])}`) | {s.status} | {s.seconds:.1f} | "
            f"{d.get('steps', 'n/a')} | {_fmt(d.get('train_loss_last20'), '.4f')} | "
            f"{_fmt(d.get('val_loss'), '.4f')} | {_fmt(d.get('median_step_ms'), '.2f')} | "
            f"{_fmt(d.get('median_opt_ms'), '.2f')} | {_fmt(tok, ',.0f')} | "
            f"{d.get('skipped_steps', 'n/a')} |"
        )

    failed = [s for s in stages if s.log_tail]
    if failed:
        lines += ["", "## Output of failed stages (last lines; full logs under logs/)", ""]
        for s in failed:
            lines += [f"### {s.name} ({s.status})", "", "```", *s.log_tail, "```", ""]
    return "\n".join(lines).rstrip() + "\n"


def write_outputs(outdir: Path, results: dict) -> None:
    (outdir / "results.json").write_text(json.dumps(results, indent=1, default=str) + "\n")
    (outdir / "report.md").write_text(render_report(results))


# ---------------------------------------------------------------------------
# Main
# ---------------------------------------------------------------------------


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(
        prog="scripts/gpu_check.sh",
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    ap.add_argument("outdir", help="folder for report.md, results.json and logs/ (created)")
    ap.add_argument(
        "--dry-run", action="store_true", help="no GPU: skip what needs one, run the rest"
    )
    ap.add_argument(
        "--budget",
        type=float,
        default=DEFAULT_BUDGET_S,
        metavar="S",
        help=f"seconds the whole check may take (default {DEFAULT_BUDGET_S:.0f}; NOTE [time budget])",
    )
    return ap.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    outdir = Path(args.outdir).resolve()
    (outdir / "logs").mkdir(parents=True, exist_ok=True)
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH")) if p)
    env["PYTHONUNBUFFERED"] = "1"
    stages = make_stages()
    ctx = {
        "outdir": outdir,
        "dry_run": args.dry_run,
        "env": env,
        "stages": stages,
        "budget": Budget(args.budget),
    }
    started = dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
    results: dict = {
        "schema": 1,
        "dry_run": args.dry_run,
        "argv": ["scripts/gpu_check.sh", *(argv if argv is not None else sys.argv[1:])],
        "started_utc": started,
        "budget_s": args.budget,
    }

    def save() -> None:
        results["stages"] = [asdict(s) for s in stages]
        results["overall"] = overall(stages)
        results["total_s"] = ctx["budget"].elapsed()
        results["environment"] = ctx.get("env_info")
        results["benchmark"] = ctx.get("bench")
        md = outdir / "bench.md"
        results["bench_markdown"] = md.read_text() if md.exists() else None
        write_outputs(outdir, results)

    for md in ("bench.md", "bench.json", "gpu_tests.xml"):  # never report a previous run's files
        (outdir / md).unlink(missing_ok=True)
    for i, stage in enumerate(stages):
        env_stage = stages[0]
        if i > 0 and env_stage.status == "FAIL" and not args.dry_run:
            stage.status = "SKIPPED"
            stage.reason = f"the environment stage failed: {env_stage.reason}"
            continue
        stage.timeout_s = ctx["budget"].timeout_for(stages, i)
        if stage.timeout_s is None:
            stage.status = "SKIPPED"
            stage.reason = f"no time left in the {args.budget:.0f} s budget (NOTE [time budget])"
            continue
        print(f"== gpu_check [{ctx['budget'].elapsed():5.0f} s] {stage.name}: {stage.title} "
              f"(timeout {stage.timeout_s:.0f} s)", flush=True)  # fmt: skip
        t0 = time.monotonic()
        try:
            RUNNERS[stage.name](stage, ctx)
        except Exception as exc:  # a bug in this script: record it, go on with the next stage
            stage.status = "FAIL"
            stage.reason = f"gpu_check itself failed in this stage: {type(exc).__name__}: {exc}"
        stage.seconds = time.monotonic() - t0  # the whole stage, probes and fallbacks included
        print(f"   {stage.status} in {stage.seconds:.1f} s: {stage.reason}", flush=True)
        save()
    save()
    print(f"== gpu_check {results['overall']}{' (dry run)' if args.dry_run else ''} in "
          f"{results['total_s']:.0f} s: {outdir / 'report.md'}", flush=True)  # fmt: skip
    return 0 if results["overall"] == "PASS" else 1


if __name__ == "__main__":
    sys.exit(main())
