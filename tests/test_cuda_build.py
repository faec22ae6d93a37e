"""The CUDA kernels as far as a machine without a GPU can check them.

This machine and CI have the CUDA toolkit and a CUDA build of torch but no GPU,
so the CUDA kernels are compiled, linked and registered here but never run
(what they compute is checked on a GPU by the shared case table,
tests/test_kernels.py, in its rows marked ``gpu``). What is checked instead:

* the extension built with CUDA kernels imports and registers a CUDA kernel for
  every op, and the cuda backend reports exactly why it cannot run;
* the compiler's own resource report for every kernel instantiation (AdamW,
  Lion, AdEMAMix, each with fp32 gradients of bf16/fp16 params too, and the sum
  of squares), for sm_80 and sm_90: no register spills, no stack, no local
  memory; the SASS of the fp32 AdamW kernel uses 128-bit global loads (NOTE
  [128-bit access]) and no fused multiply-add but the lerp's explicit one
  (NOTE [one formula per quantity]);
* the multi-tensor packing and the block -> chunk search of
  csrc/cuda/multi_tensor_apply.cuh, compiled for the host with g++.
"""

from __future__ import annotations

import concurrent.futures
import glob
import importlib.util
import os
import random
import re
import shutil
import subprocess

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CUDA_SRC = os.path.join(ROOT, "csrc", "cuda")
OPS = ("adamw_", "lion_", "ademamix_", "grad_sumsq")


def _build_info():
    try:
        from fastopt import _build_info
    except ImportError:
        pytest.fail("fastopt/_build_info.py is missing: build the extension first (setup.py)")
    return _build_info


def _require_cuda_build():
    info = _build_info()
    if not info.WITH_CUDA:
        pytest.skip(f"extension built without CUDA kernels: {info.CUDA_REASON}")


def _load_setup():
    """setup.py as a module, so the tests compile with the build's own flags."""
    spec = importlib.util.spec_from_file_location("_fastopt_setup", os.path.join(ROOT, "setup.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _cuda_home():
    from torch.utils import cpp_extension

    return _load_setup()._cuda_home(cpp_extension)


def _tool(name):
    """A CUDA binary tool: the toolkit's, else PATH's, else the copy triton ships."""
    home = _cuda_home()
    candidates = [os.path.join(home, "bin", name)] if home else []
    found = shutil.which(name)
    if found:
        candidates.append(found)
    try:
        import triton

        candidates.append(
            os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", name)
        )
    except ImportError:
        pass
    for c in candidates:
        if os.path.isfile(c) and os.access(c, os.X_OK):
            return c
    return None


# ---- (1) registration --------------------------------------------------------


def test_cuda_kernels_registered():
    """Every op has a CUDA kernel in the built extension.

    The kernels cannot run here (no GPU): this checks that nvcc's objects were
    linked into fastopt._C and that importing it registers them for the CUDA
    dispatch key, next to the schemas of csrc/ops.cpp.
    """
    _require_cuda_build()
    import fastopt._C  # noqa: F401

    for op in OPS:
        assert torch._C._dispatch_has_kernel_for_dispatch_key(f"fastopt::{op}", "CUDA"), op
    from fastopt.backends import compiled

    expected = None if torch.cuda.is_available() else "no CUDA device"
    assert compiled.unavailable("cuda") == expected
    assert compiled.supports(torch.device("cuda")) and compiled.supports(torch.device("cpu"))


def test_cuda_backend_reports_build_without_cuda(monkeypatch):
    """A build without CUDA kernels names the build-time reason."""
    from fastopt.backends import compiled

    info = _build_info()
    monkeypatch.setattr(info, "WITH_CUDA", False)
    monkeypatch.setattr(info, "CUDA_REASON", "no nvcc found (set CUDA_HOME to the toolkit root)")
    assert compiled.unavailable("cuda") == (
        "built without CUDA kernels: no nvcc found (set CUDA_HOME to the toolkit root)"
    )


# ---- (2) compiler resource report and SASS -------------------------------------

# kernel name stem -> instantiations per architecture (dispatch_update in
# csrc/cuda/update.cuh), over (params, grads, moments, master): fp32 params
# with fp32 or bf16 moments (2); bf16 params x (bf16 | fp32 grads) x (fp32 |
# bf16 moments) x (none | fp32 master | remainder) (12); fp16 params x (fp16 |
# fp32 grads) x (fp32 | bf16 | fp16 moments) x (none | fp32 master) (12): 26
# storage variants; AdamW has each with and without amsgrad. 8-bit moments
# (NOTE [int8 moments on the GPU]) add one per (params, grads, master): 1 + 6
# + 4 = 11, AdamW's without amsgrad only. The sum of squares has one kernel
# per grad dtype (fp32, bf16, fp16, fp64) and the final sum.
EXPECTED_KERNELS = {
    "adamw_kernel": 52 + 11,
    "lion_kernel": 26 + 11,
    "ademamix_kernel": 26 + 11,
    "grad_sumsq_kernel": 4,
    "grad_sumsq_finish_kernel": 1,
}
ARCHS = ("sm_80", "sm_90")


def _nvcc_command(src, arch, out):
    setup = _load_setup()
    from torch.utils import cpp_extension

    includes = [os.path.join(ROOT, "csrc", "include"), os.path.join(ROOT, "csrc")]
    includes += cpp_extension.include_paths(device_type="cuda")
    includes += setup._nvidia_wheel_includes()
    cmd = [os.path.join(_cuda_home(), "bin", "nvcc"), "-cubin", f"-arch={arch}", "-o", out, src]
    cmd += [f"-I{d}" for d in includes]
    # The flags cpp_extension adds for every CUDA source, then the build's own.
    cmd += cpp_extension.COMMON_NVCC_FLAGS + setup.NVCC_FLAGS + ["-Xptxas", "-v"]
    if not any(f.startswith("-std=") for f in cmd):
        cmd.append("-std=c++20")  # as cpp_extension does for a build without one
    return cmd


def _ptxas_report(text):
    """{(kernel, arch): {"registers", "stack", "spill_stores", "spill_loads"}} from -Xptxas -v."""
    out = {}
    current = None
    for line in text.splitlines():
        m = re.search(r"Compiling entry function '(\S+)' for '(sm_\d+)'", line)
        if m:
            current = (m.group(1), m.group(2))
            out[current] = {}
            continue
        if current is None:
            continue
        m = re.search(
            r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads", line
        )
        if m and "stack" not in out[current]:
            out[current].update(
                stack=int(m.group(1)), spill_stores=int(m.group(2)), spill_loads=int(m.group(3))
            )
        m = re.search(r"Used (\d+) registers", line)
        if m:
            out[current]["registers"] = int(m.group(1))
            current = None
    return out


def _stem(mangled):
    for stem in sorted(EXPECTED_KERNELS, key=len, reverse=True):
        if f"{len(stem)}{stem}" in mangled:
            return stem
    return None


@pytest.fixture(scope="module")
def cubins(tmp_path_factory):
    """Every csrc/cuda/*.cu compiled to a cubin for sm_80 and sm_90, with ptxas's report."""
    info = _build_info()
    home = _cuda_home()
    if not info.WITH_CUDA and (
        home is None or not os.path.exists(os.path.join(home, "bin", "nvcc"))
    ):
        pytest.skip(f"no CUDA toolkit here ({info.CUDA_REASON})")
    tmp = tmp_path_factory.mktemp("cubins")
    jobs = []
    for src in sorted(glob.glob(os.path.join(CUDA_SRC, "*.cu"))):
        for arch in ARCHS:
            out = os.path.join(tmp, f"{os.path.basename(src)[:-3]}.{arch}.cubin")
            jobs.append((src, arch, out, _nvcc_command(src, arch, out)))
    assert jobs, "no CUDA sources in csrc/cuda"

    def compile_one(job):
        src, arch, out, cmd = job
        proc = subprocess.run(cmd, capture_output=True, text=True)
        assert proc.returncode == 0, f"nvcc failed on {src} ({arch}):\n{proc.stderr}"
        return out, proc.stdout + proc.stderr

    with concurrent.futures.ThreadPoolExecutor(max_workers=os.cpu_count() or 2) as pool:
        results = list(pool.map(compile_one, jobs))
    report = {}
    for _, text in results:
        report.update(_ptxas_report(text))
    return {"files": [r[0] for r in results], "report": report}


def test_every_kernel_compiles_without_spills(cubins):
    report = cubins["report"]
    for arch in ARCHS:
        counts = {}
        for (name, a), _ in report.items():
            if a == arch and _stem(name):
                counts[_stem(name)] = counts.get(_stem(name), 0) + 1
        assert counts == EXPECTED_KERNELS, (arch, counts)
    lines = []
    for (name, arch), r in sorted(report.items()):
        assert {"registers", "stack", "spill_stores", "spill_loads"} <= set(r), (name, arch, r)
        lines.append(
            f"{arch} regs={r['registers']:3d} stack={r['stack']} spill st/ld="
            f"{r['spill_stores']}/{r['spill_loads']} {name}"
        )
    print("\n".join(lines))
    bad = {k: r for k, r in report.items() if r["spill_stores"] or r["spill_loads"] or r["stack"]}
    assert not bad, f"kernels with spills or a stack frame: {bad}"


def test_cubin_resource_usage_has_no_local_memory(cubins):
    """The cubin's own record agrees: no LOCAL (spill) memory in any kernel."""
    cuobjdump = _tool("cuobjdump")
    assert cuobjdump, "cuobjdump not found (CUDA toolkit or triton's bundled copy)"
    seen = 0
    for path in cubins["files"]:
        text = subprocess.run(
            [cuobjdump, "--dump-resource-usage", path], capture_output=True, text=True, check=True
        ).stdout
        for fn, local in re.findall(
            r"Function (\S+):\s*\n\s*REG:\d+ STACK:\d+ SHARED:\d+ LOCAL:(\d+)", text
        ):
            seen += 1
            assert int(local) == 0, (path, fn)
    assert seen == len(ARCHS) * sum(EXPECTED_KERNELS.values())


def _sass_sections(cubins, stem, arch):
    cuobjdump = _tool("cuobjdump")
    assert cuobjdump, "cuobjdump not found (CUDA toolkit or triton's bundled copy)"
    (cubin,) = [f for f in cubins["files"] if os.path.basename(f) == f"{stem}.{arch}.cubin"]
    sass = subprocess.run(
        [cuobjdump, "-sass", cubin], capture_output=True, text=True, check=True
    ).stdout
    # One section per kernel, headed "Function : <mangled name>".
    return re.split(r"\n\s*Function : ", sass)


@pytest.mark.parametrize("arch", ARCHS)
def test_fp32_adamw_sass_uses_128bit_loads(cubins, arch):
    sections = _sass_sections(cubins, "adamw", arch)
    # adamw_kernel<float, float, float, Master::kNone, AMSGRAD=false>
    fp32 = [s for s in sections if re.match(r"\S*12adamw_kernelIfffLNS_6MasterE0ELb0E", s)]
    assert len(fp32) == 1, [s.split("\n", 1)[0] for s in sections]
    loads = re.findall(r"LDG\.E\S*", fp32[0])
    stores = re.findall(r"STG\.E\S*", fp32[0])
    # Every list moves in 16-byte words on the vector path: p, g, m, v are read
    # (g may take the read-only path, LDG.E.128.CONSTANT) and p, m, v written.
    assert sum(x.startswith("LDG.E.128") for x in loads) >= 4, sorted(loads)
    assert sum(x.startswith("STG.E.128") for x in stores) >= 3, sorted(stores)


@pytest.mark.parametrize("arch", ARCHS)
def test_mixed_grad_kernels_read_fp32_grads_in_16_byte_words(cubins, arch):
    """bf16 params with fp32 grads: 8 elements per thread, so the grads take two
    128-bit loads per iteration next to the bf16 params' one (NOTE [128-bit access])."""
    # <bf16, float, bf16 moments (a substitution, S<n>_), Master::kNone>
    bf16 = r"IN3c108BFloat16EfS\d*_LNS_6MasterE0E"
    for stem, name in (("adamw", f"12adamw_kernel{bf16}Lb0E"),
                       ("ademamix", f"15ademamix_kernel{bf16}"),
                       ("lion", f"11lion_kernel{bf16}")):  # fmt: skip
        (sec,) = [s for s in _sass_sections(cubins, stem, arch) if re.match(rf"\S*{name}", s)]
        loads = re.findall(r"LDG\.E\S*", sec)
        assert sum(x.startswith("LDG.E.128") for x in loads) >= 3, (stem, sorted(loads))


def test_kernels_fit_the_4kb_parameter_budget(cubins, tmp_path):
    """NOTE [kernel parameter budget]: the fallback for older toolkits/drivers builds."""
    jobs = []
    for src in sorted(glob.glob(os.path.join(CUDA_SRC, "*.cu"))):
        out = str(tmp_path / (os.path.basename(src) + ".cubin"))
        jobs.append(_nvcc_command(src, "sm_80", out) + ["-DFASTOPT_MTA_PARAM_BYTES=4096"])
    with concurrent.futures.ThreadPoolExecutor(max_workers=os.cpu_count() or 2) as pool:
        procs = list(pool.map(lambda c: subprocess.run(c, capture_output=True, text=True), jobs))
    for cmd, proc in zip(jobs, procs):
        assert proc.returncode == 0, (cmd[5], proc.stderr)
        report = _ptxas_report(proc.stdout + proc.stderr)
        assert report and all(r["spill_stores"] == 0 for r in report.values())


def test_built_extension_carries_sm80_sm90_sass_and_ptx():
    """The linked fastopt._C holds what the tests above compiled: SASS of every
    kernel for sm_80 and sm_90 (no local memory), and compute_90 PTX for newer GPUs."""
    _require_cuda_build()
    import fastopt._C

    cuobjdump = _tool("cuobjdump")
    assert cuobjdump, "cuobjdump not found (CUDA toolkit or triton's bundled copy)"
    so = fastopt._C.__file__
    listing = subprocess.run(
        [cuobjdump, "-lelf", "-lptx", so], capture_output=True, text=True, check=True
    ).stdout
    for src in ("adamw", "lion", "ademamix", "grad_sumsq"):
        for arch in ARCHS:
            assert f"{src}.{arch}.cubin" in listing, (src, arch, listing)
        assert f"{src}.sm_90.ptx" in listing, (src, listing)
    usage = subprocess.run(
        [cuobjdump, "--dump-resource-usage", so], capture_output=True, text=True, check=True
    ).stdout
    per_arch = {}
    for block in re.split(r"\narch = ", usage)[1:]:
        arch = block.split()[0]
        kernels = re.findall(
            r"Function (\S+):\s*\n\s*REG:\d+ STACK:(\d+) SHARED:\d+ LOCAL:(\d+)", block
        )
        for name, stack, local in kernels:
            assert int(stack) == 0 and int(local) == 0, (arch, name)
            if _stem(name):
                per_arch.setdefault(arch, []).append(_stem(name))
    for arch in ARCHS:
        counts = {stem: per_arch.get(arch, []).count(stem) for stem in EXPECTED_KERNELS}
        assert counts == EXPECTED_KERNELS, (arch, counts)


def test_built_kernels_fuse_only_the_explicit_fmas():
    """NOTE [one formula per quantity]: nvcc --fmad=false marks every fp32/fp64
    multiply and add of the kernels' PTX round-to-nearest (.rn), which ptxas
    may not contract into an fma, so the only fused multiply-adds left are the
    fmaf calls update_math.h writes: in fp32 AdamW, lerp's two (both of
    torch.lerp's branches) and addcmul's one, for 4 vector lanes + 1 scalar."""
    _require_cuda_build()
    import fastopt._C

    cuobjdump = _tool("cuobjdump")
    assert cuobjdump, "cuobjdump not found (CUDA toolkit or triton's bundled copy)"
    ptx = subprocess.run(
        [cuobjdump, "-ptx", fastopt._C.__file__], capture_output=True, text=True, check=True
    ).stdout
    entries = {}
    for sec in re.split(r"\n(?=(?:\.visible |\.weak )?\.entry )", ptx):
        m = re.match(r"(?:\.visible |\.weak )?\.entry (\S+)\(", sec)
        if m and _stem(m.group(1)):
            entries[m.group(1)] = sec
    assert len(entries) == sum(EXPECTED_KERNELS.values()), sorted(entries)
    for name, sec in entries.items():
        loose = re.findall(r"\b(?:mul|add|sub)\.f(?:32|64)\b", sec)
        assert not loose, (name, loose[:5])
    (fp32,) = [sec for name, sec in entries.items() if "12adamw_kernelIfffLNS_6MasterE0ELb0E" in name]
    assert len(re.findall(r"\bfma\.rn\.f32\b", fp32)) == 3 * (4 + 1)


# ---- (3) multi-tensor packing, on the host --------------------------------------

_PACK_DRIVER = r"""
#include <cstdio>
#include <cstdlib>
#include <vector>
#include "cuda/multi_tensor_apply.cuh"
using namespace fastopt::cuda;
constexpr int kDepth = 6;  // AdamW with master weights and steps
int main(int argc, char** argv) {
  std::vector<long long> numel;
  for (int i = 1; i < argc; ++i) numel.push_back(std::atoll(argv[i]));
  std::printf("capacity %d\n", TensorTable<kDepth>::kMaxTensors);
  int launch_no = 0;
  const long long total = pack_and_launch<kDepth>(
      static_cast<int64_t>(numel.size()),
      // A fake address per (list, tensor): the slot's entries are decoded below.
      [](int k, int64_t i) { return reinterpret_cast<void*>((i + 1) * 16 + k); },
      [&](int64_t i) { return static_cast<int64_t>(numel[i]); },
      [&](const TensorTable<kDepth>& t, int64_t blocks, int64_t first) {
        std::printf("launch %d tensors %d blocks %lld first %lld\n", launch_no, t.ntensors,
                    (long long)blocks, (long long)first);
        for (int s = 0; s < t.ntensors; ++s)
          for (int k = 0; k < kDepth; ++k)
            if (reinterpret_cast<intptr_t>(t.ptrs[k][s]) !=
                reinterpret_cast<intptr_t>(t.ptrs[0][s]) + k) return;
        for (int64_t b = 0; b < blocks; ++b) {
          const ChunkRef c = locate_chunk_at(t, static_cast<int>(b));
          const long long tensor = reinterpret_cast<intptr_t>(t.ptrs[0][c.tensor]) / 16 - 1;
          std::printf("chunk %d %lld %lld %d\n", launch_no, tensor, (long long)c.begin, c.len);
        }
        ++launch_no;
      });
  std::printf("total %lld\n", total);
}
"""


@pytest.fixture(scope="module")
def pack_driver(tmp_path_factory):
    cxx = shutil.which("g++") or shutil.which("c++")
    if cxx is None:
        pytest.skip("no host C++ compiler")
    tmp = tmp_path_factory.mktemp("pack")
    src = tmp / "pack.cpp"
    src.write_text(_PACK_DRIVER)
    exe = tmp / "pack"
    # The 4 KB parameter budget of older toolkits, so that a few hundred
    # tensors overflow a table and the multi-launch path is exercised.
    subprocess.run(
        [
            cxx,
            "-std=c++17",
            "-O1",
            "-DFASTOPT_MTA_PARAM_BYTES=4096",
            f"-I{ROOT}/csrc",
            str(src),
            "-o",
            str(exe),
        ],
        check=True,
    )
    return str(exe)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_chunk_table_covers_every_element_once(pack_driver, seed):
    rng = random.Random(seed)
    chunk = 65536
    numel = [
        rng.choice([0, 1, 7, chunk - 1, chunk, chunk + 3, rng.randrange(1, 5 * chunk)])
        for _ in range(300)
    ]
    # One tensor past 2^32 elements: offsets must be 64-bit (addresses are fake,
    # nothing is allocated).
    numel[150] = (1 << 32) + 12345
    proc = subprocess.run(
        [pack_driver, *map(str, numel)], capture_output=True, text=True, check=True
    )
    lines = proc.stdout.splitlines()
    capacity = int(lines[0].split()[1])
    launches = [tuple(map(int, ln.split()[3::2])) for ln in lines if ln.startswith("launch")]
    chunks = [tuple(map(int, ln.split()[1:])) for ln in lines if ln.startswith("chunk")]
    total = int(lines[-1].split()[1])

    assert len(launches) > 1  # 300 tensors overflow the 4 KB table
    assert all(1 <= n <= capacity for n, _, _ in launches)
    # Launches number their blocks consecutively (grad_sumsq's partial slots).
    first = 0
    for _, blocks, first_block in launches:
        assert first_block == first
        first += blocks
    assert total == first == len(chunks)
    assert total == sum(-(-n // chunk) for n in numel)

    # Every element of every tensor exactly once, in order, never split across
    # launches; empty tensors never appear.
    seen = {}
    launch_of = {}
    for launch_no, tensor, begin, length in chunks:
        assert launch_of.setdefault(tensor, launch_no) == launch_no
        assert begin == seen.get(tensor, 0) and begin % chunk == 0
        assert 0 < length <= chunk
        seen[tensor] = begin + length
    assert seen == {i: n for i, n in enumerate(numel) if n}
    assert max(b for _, t, b, _ in chunks if t == 150) >= 1 << 32
    assert list(launch_of) == sorted(launch_of)
