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


def test_extension_registers_every_op_schema():
    from fastopt import _build_info

    assert isinstance(_build_info.WITH_CUDA, bool) and _build_info.CUDA_REASON
    for name in ("adamw_", "lion_", "grad_sumsq"):
        op = getattr(torch.ops.fastopt, name)
        schema = str(op.default._schema)
        assert schema.startswith(f"fastopt::{name}("), schema
        assert torch._C._dispatch_has_kernel_for_dispatch_key(f"fastopt::{name}", "CPU"), name
    # in-place ops say which arguments they mutate
    assert "Tensor(a!)[] params" in str(torch.ops.fastopt.adamw_.default._schema)


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
        shutil.copytree(ROOT / name, src / name, ignore=shutil.ignore_patterns("*.so", "__pycache__"))
    env = dict(os.environ, CUDA_HOME=str(tmp_path / "no-toolkit-here"), FASTOPT_BUILD_CUDA="auto")
    env.pop("CUDA_PATH", None)
    build = subprocess.run(
        [sys.executable, "setup.py", "build_ext", "--inplace"],
        cwd=src, env=env, capture_output=True, text=True, timeout=900,
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
    out = subprocess.run([sys.executable, "-c", probe], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=300)
    assert out.returncode != 0
    assert "FASTOPT_BUILD_CUDA=1 but" in out.stderr and "no nvcc found" in out.stderr
