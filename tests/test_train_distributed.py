"""The training loop under torchrun: ``--parallel ddp|fsdp|zero`` on 2 gloo ranks (CPU).

Every launch is a real ``torchrun`` subprocess (``python -m torch.distributed.run``)
on a free port. The runs are shared through module fixtures, so the file costs
six 2-rank launches, one 1-rank launch and one plain process.

The optimizer runs on ``--backend reference`` here: which compiled backends a
machine has must not decide whether two launches can agree bit for bit (in a
shared checkout the C++ extension can appear between two of them), and the
backends' agreement with each other is tested elsewhere (test_parity_torch,
test_cpu_kernels). What is tested here is the loop's distribution.
"""

import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

import fastopt.train as T
from fastopt.train import loop

pytestmark = pytest.mark.skipif(
    not (dist.is_available() and dist.is_gloo_available()),
    reason="torch built without distributed / gloo",
)

ROOT = Path(__file__).resolve().parents[1]
STEPS, STOP = 8, 5
BACKEND = "reference"  # see the module docstring
# Train loss, val loss and grad norm of a sharded run against the single process on the
# same global batch. Each rank's loss is the mean over its half of the batch and the
# gradients are averaged over the ranks (DDP all-reduce, FSDP reduce-scatter), so the
# fp32 sums are rounded in a different order than the one process's mean over the whole
# batch: a few ulps per step. Measured over 8 steps: at most 9.5e-7 (train loss),
# 2.4e-7 (val loss), 1.2e-7 (grad norm), i.e. 2 ulps of a loss of about 5; 2e-5 leaves
# 20x room and is still far below what one wrong step (another lr, an unclipped or
# double-counted norm, a rank training on the wrong rows) moves: 1e-3 and more.
TOL = 2e-5


def tiny(corpus_file, out, *extra):
    return [
        "--data", str(corpus_file), "--out", str(out),
        "--d-model", "32", "--n-layers", "2", "--n-heads", "2",
        "--seq-len", "32", "--batch-size", "4",
        "--steps", str(STEPS), "--eval-every", "4", "--eval-batches", "2",
        "--backend", BACKEND, "--no-progress", "--no-plot",
        *extra,
    ]  # fmt: skip


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def clean_env() -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    env["OMP_NUM_THREADS"] = "1"  # what torchrun would set, without its warning
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    return env


def torchrun(nproc: int, argv: list[str]) -> subprocess.CompletedProcess:
    cmd = [
        sys.executable, "-m", "torch.distributed.run",
        "--nnodes", "1", "--nproc_per_node", str(nproc),
        "--master-addr", "127.0.0.1", "--master-port", str(free_port()),
        "-m", "fastopt.train", *argv,
    ]  # fmt: skip
    proc = subprocess.run(
        cmd, cwd=ROOT, env=clean_env(), capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, f"torchrun {' '.join(argv)} failed:\n{proc.stderr[-4000:]}"
    return proc


def records(out) -> list[dict]:
    return T.read_metrics(Path(out) / T.METRICS)


def steps(out) -> dict[int, dict]:
    return {r["step"]: r for r in records(out) if "loss" in r}


def vals(out) -> dict[int, float]:
    return {r["step"]: r["val_loss"] for r in records(out) if "val_loss" in r}


@pytest.fixture(scope="module")
def corpus_file(tmp_path_factory):
    # 48 KiB of real Python source, as in test_train.py
    src = Path(loop.__file__).read_bytes() + Path(torch.__file__).read_bytes() * 4
    f = tmp_path_factory.mktemp("data") / "corpus.txt"
    f.write_bytes(src[: 48 * 1024])
    return f


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    return tmp_path_factory.mktemp("dist")


@pytest.fixture(scope="module")
def single(corpus_file, work):
    out = work / "single"
    T.train(T.parse_args(tiny(corpus_file, out)))
    return out


@pytest.fixture(scope="module")
def full_runs(corpus_file, work):
    """An uninterrupted 2-rank run of each mode: out folder and stdout."""
    runs = {}
    for mode in ("ddp", "fsdp", "zero"):
        out = work / mode
        runs[mode] = (out, torchrun(2, tiny(corpus_file, out, "--parallel", mode)).stdout)
    return runs


@pytest.fixture(scope="module")
def fsdp_stopped(corpus_file, work):
    """A 2-rank fsdp run stopped after STOP steps: its folder (checkpoint at step STOP)."""
    out = work / "fsdp_stopped"
    torchrun(2, tiny(corpus_file, out, "--parallel", "fsdp", "--stop-after", str(STOP)))
    return out


# ---- (1) each mode against one process -------------------------------------------------------


@pytest.mark.parametrize("mode", ["ddp", "fsdp", "zero"])
def test_parallel_matches_single_process(single, full_runs, mode):
    out, stdout = full_runs[mode]
    one, par = steps(single), steps(out)
    assert sorted(par) == sorted(one) == list(range(1, STEPS + 1))  # rank 0 alone logs
    for s in one:
        assert abs(par[s]["loss"] - one[s]["loss"]) <= TOL, (s, par[s]["loss"], one[s]["loss"])
        assert abs(par[s]["grad_norm"] - one[s]["grad_norm"]) <= TOL * one[s]["grad_norm"]
        assert par[s]["lr"] == one[s]["lr"]  # the schedule followed the applied steps
        assert par[s]["tokens"] == one[s]["tokens"]  # tokens of the global batch
    assert sorted(vals(out)) == sorted(vals(single)) == [4, STEPS]
    assert abs(vals(out)[STEPS] - vals(single)[STEPS]) <= TOL
    assert stdout.count("finished:") == 1  # one voice: rank 0
    assert f"--parallel {mode} over 2 ranks (2 sequences each)" in stdout
    ckpt = out / "ckpt.dcp"
    assert (ckpt / ".metadata").is_file() and (ckpt / "loop.pt").is_file()
    assert not (out / "ckpt.pt").exists()
    assert not (out / "ckpt.dcp.tmp").exists() and not (out / "ckpt.dcp.old").exists()


def test_torch_adamw_under_fsdp_matches_single_process(corpus_file, work):
    """The side-by-side baseline under FSDP2: torch's AdamW on DTensors with
    clip_grad_norm_ (whose norm is a DTensor), checkpointed through DCP."""
    argv = ("--optimizer", "torch-adamw")
    T.train(T.parse_args(tiny(corpus_file, work / "torch_single", *argv)))
    torchrun(2, tiny(corpus_file, work / "torch_fsdp", "--parallel", "fsdp", *argv))
    one, par = steps(work / "torch_single"), steps(work / "torch_fsdp")
    assert sorted(par) == sorted(one)
    for s in one:  # TOL: as above
        assert abs(par[s]["loss"] - one[s]["loss"]) <= TOL, (s, par[s]["loss"], one[s]["loss"])
        assert abs(par[s]["grad_norm"] - one[s]["grad_norm"]) <= TOL * one[s]["grad_norm"]
    assert abs(vals(work / "torch_fsdp")[STEPS] - vals(work / "torch_single")[STEPS]) <= TOL


# ---- (2) fsdp stop + resume is exact -----------------------------------------------------------


def test_fsdp_stop_resume_is_exact(corpus_file, work, full_runs, fsdp_stopped):
    out = work / "fsdp_resumed"
    shutil.copytree(fsdp_stopped, out)
    assert max(steps(out)) == STOP
    torchrun(2, tiny(corpus_file, out, "--parallel", "fsdp", "--resume"))
    whole = full_runs["fsdp"][0]
    timing = ("step_time", "opt_time")

    def strip(rs):
        return [{k: v for k, v in r.items() if k not in timing} for r in rs]

    # every logged number (losses, grad norms, lr, val losses) bit for bit
    assert strip(records(out)) == strip(records(whole))


# ---- (3) a 2-rank fsdp checkpoint continues on 1 rank -----------------------------------------


def test_fsdp_checkpoint_resumes_on_one_rank(corpus_file, work, full_runs, fsdp_stopped):
    out = work / "fsdp_one_rank"
    shutil.copytree(fsdp_stopped, out)
    stdout = torchrun(1, tiny(corpus_file, out, "--parallel", "fsdp", "--resume")).stdout
    assert "over 1 ranks (4 sequences each)" in stdout
    got, want = steps(out), steps(full_runs["fsdp"][0])
    assert sorted(got) == list(range(1, STEPS + 1))
    # it continued from step STOP's weights, moments and schedule (resharded 2 -> 1): the
    # same trajectory as the uninterrupted 2-rank run to fp32 rounding (TOL: the same
    # argument as above, one process now summing what two ranks summed), not a new run
    # (whose first loss is 5.54, 0.4 above step 6's)
    for s in range(STOP + 1, STEPS + 1):
        assert abs(got[s]["loss"] - want[s]["loss"]) <= TOL, (s, got[s], want[s])
        assert got[s]["lr"] == want[s]["lr"]
    assert abs(vals(out)[STEPS] - vals(full_runs["fsdp"][0])[STEPS]) <= TOL


# ---- (4) bad launches --------------------------------------------------------------------------


def test_parallel_without_torchrun_is_one_line_error(corpus_file, tmp_path):
    cmd = [sys.executable, "-m", "fastopt.train", *tiny(corpus_file, tmp_path, "--parallel", "ddp")]
    proc = subprocess.run(
        cmd, cwd=ROOT, env=clean_env(), capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("fastopt-train: error: --parallel ddp must be launched by torchrun")
    assert not (tmp_path / T.METRICS).exists()


@pytest.mark.parametrize(
    ("env", "argv", "message"),
    [
        (
            {"RANK": "0", "WORLD_SIZE": "3"},
            ["--parallel", "fsdp"],
            "does not divide by the 3 ranks",
        ),
        ({"RANK": "0", "WORLD_SIZE": "2"}, [], "but --parallel none"),
        (
            {"RANK": "0", "WORLD_SIZE": "2"},
            ["--parallel", "zero", "--lawa-every", "2", "--precision", "bf16"],
            "--lawa-every with --parallel zero and bf16 master weights",
        ),
    ],
)
def test_launch_errors(corpus_file, tmp_path, monkeypatch, env, argv, message):
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    with pytest.raises(T.ConfigError, match=message):
        T.parse_args(tiny(corpus_file, tmp_path, *argv))
