"""The build: op registration through torch.library, and a build with no CUDA compiler."""

import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

import fastopt

ROOT = Path(__file__).resolve().parents[1]


# op -> (its tensor-list arguments, in order; its keyword-only arguments)
TRANSFORM = ["grad_mul", "max_grad_value", "clip_coef", "skip"]
SCHEMAS = {
    "adamw_": (
        ["params", "grads", "exp_avgs", "exp_avg_sqs", "max_exp_avg_sqs", "master_params",
         "state_steps"],
        ["lr", "lr_tensor", "beta1", "beta2", "eps", "weight_decay", "amsgrad", "maximize",
         *TRANSFORM],
    ),
    "lion_": (
        ["params", "grads", "exp_avgs", "master_params"],
        ["lr", "lr_tensor", "beta1", "beta2", "weight_decay", "maximize", *TRANSFORM],
    ),
    "ademamix_": (
        ["params", "grads", "exp_avgs", "exp_avgs_slow", "exp_avg_sqs", "master_params",
         "state_steps"],
        ["lr", "lr_tensor", "beta1", "beta2", "beta3", "alpha", "t_alpha", "t_beta3", "eps",
         "weight_decay", "maximize", *TRANSFORM],
    ),
    "grad_sumsq": (["grads"], ["grad_mul", "max_grad_value"]),
    "steps_add_": (["steps", "value"], []),
}  # fmt: skip


@pytest.mark.parametrize("name", sorted(SCHEMAS))
def test_extension_registers_every_op_schema(name):
    """csrc/ops.cpp declares each op once; the CPU kernels implement all of them
    (and the CUDA kernels all but steps_add_, tests/test_cuda_build.py)."""
    from fastopt import _build_info

    assert isinstance(_build_info.WITH_CUDA, bool) and _build_info.CUDA_REASON
    schema = getattr(torch.ops.fastopt, name).default._schema
    assert schema.name == f"fastopt::{name}"
    positional, keyword = SCHEMAS[name]
    args = schema.arguments
    assert [a.name for a in args if not a.kwarg_only] == positional, str(schema)
    assert [a.name for a in args if a.kwarg_only] == keyword, str(schema)
    assert torch._C._dispatch_has_kernel_for_dispatch_key(f"fastopt::{name}", "CPU"), name
    # In-place ops say which lists they mutate: params and the states, never grads.
    for a in args:
        mutated = a.alias_info is not None and a.alias_info.is_write
        expected = name.endswith("_") and a.name in (
            "params", "exp_avgs", "exp_avgs_slow", "exp_avg_sqs", "max_exp_avg_sqs",
            "master_params", "steps",
        )  # fmt: skip
        assert mutated == expected, (name, a.name)


def test_available_backends_lists_what_runs():
    names = fastopt.available_backends()
    assert names[0] == "reference" and "cpu" in names
    if not torch.cuda.is_available():
        assert "cuda" not in names


@pytest.mark.slow
def test_build_without_a_cuda_compiler_succeeds_and_says_so(tmp_path):
    """Build the extension from a copy of the sources with CUDA_HOME pointing nowhere.

    The build must succeed, print that it skipped the CUDA kernels and why, and
    the resulting library must register CPU kernels and no CUDA kernels.
    """
    src = tmp_path / "src"
    src.mkdir()
    for name in ("setup.py", "pyproject.toml", "README.md"):
        if (ROOT / name).exists():
            shutil.copy(ROOT / name, src / name)
    for name in ("csrc", "fastopt", "triton_kernels"):
        shutil.copytree(
            ROOT / name, src / name, ignore=shutil.ignore_patterns("*.so", "__pycache__")
        )
    env = dict(os.environ, CUDA_HOME=str(tmp_path / "no-toolkit-here"), FASTOPT_BUILD_CUDA="auto")
    env.pop("CUDA_PATH", None)
    build = subprocess.run(
        [sys.executable, "setup.py", "build_ext", "--inplace"],
        cwd=src,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert build.returncode == 0, build.stdout[-3000:] + build.stderr[-3000:]
    assert "fastopt: CUDA kernels skipped (no nvcc found" in build.stdout
    info = (src / "fastopt" / "_build_info.py").read_text()
    assert "WITH_CUDA = False" in info
    (lib,) = (src / "fastopt").glob("_C*.so")
    probe = textwrap.dedent(f"""
        import importlib.util, torch
        spec = importlib.util.spec_from_file_location("fastopt._C", {str(lib)!r})
        spec.loader.exec_module(importlib.util.module_from_spec(spec))
        has = torch._C._dispatch_has_kernel_for_dispatch_key
        print(has("fastopt::adamw_", "CPU"), has("fastopt::adamw_", "CUDA"))
    """)
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["True", "False"]


def test_forcing_cuda_without_toolkit_fails_clearly(tmp_path):
    env = dict(os.environ, CUDA_HOME=str(tmp_path / "nowhere"), FASTOPT_BUILD_CUDA="1")
    probe = "import setup; setup._cuda_decision()"
    out = subprocess.run(
        [sys.executable, "-c", probe],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode != 0
    assert "FASTOPT_BUILD_CUDA=1 but" in out.stderr and "no nvcc found" in out.stderr
