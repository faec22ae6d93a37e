"""Build of the fastopt C++/CUDA extension (fastopt._C).

The CPU kernels are always built. The CUDA kernels are built when
FASTOPT_BUILD_CUDA is 1, or when it is unset/"auto" and both a CUDA build of
torch and a CUDA toolkit (nvcc under CUDA_HOME) are present. FASTOPT_BUILD_CUDA=0
opts out. What was decided is printed and recorded in fastopt/_build_info.py.
"""

import glob
import os
import sys

from setuptools import setup

ROOT = os.path.dirname(os.path.abspath(__file__))


# NOTE [CUDA build time]: the kernel files (csrc/cuda/*.cu) include no ATen
# headers -- only c10's BFloat16/Half and the shared math -- and the op entries
# that need ATen are plain C++ (csrc/cuda/ops_cuda.cpp), so each nvcc pass stays
# short; maximize is a sign folded into grad_mul, not a template parameter,
# which halves the kernel count. torch adds the C++ standard (C++20).
# --fmad=false: only the fmas update_math.h writes out fuse (NOTE [one formula
# per quantity]). tests/test_cuda_build.py compiles the kernels with these same
# flags.
CXX_FLAGS = ["-O3", "-fno-math-errno", "-fno-trapping-math", "-ffp-contract=off", "-fopenmp"]
NVCC_FLAGS = ["-O3", "--expt-relaxed-constexpr", "-lineinfo", "--fmad=false"]


def _rel(pattern):
    return sorted(os.path.relpath(p, ROOT) for p in glob.glob(os.path.join(ROOT, pattern)))


def _cuda_home(cpp_extension):
    # torch guesses the toolkit root from `which nvcc`; a wrapper script such as
    # /usr/local/bin/nvcc makes that guess /usr/local, which has no CUDA headers.
    # Fall back to /usr/local/cuda then (_cuda_decision points torch's build there).
    # A root the user names in CUDA_HOME/CUDA_PATH is taken as given.
    home = cpp_extension.CUDA_HOME
    if os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH"):
        return home
    if home is not None and os.path.exists(os.path.join(home, "include", "cuda_runtime.h")):
        return home
    fallback = "/usr/local/cuda"
    if os.path.exists(os.path.join(fallback, "include", "cuda_runtime.h")):
        return fallback
    return home


def _cuda_decision():
    import torch
    from torch.utils import cpp_extension

    wanted = os.environ.get("FASTOPT_BUILD_CUDA", "auto").strip().lower()
    if wanted in ("0", "false", "no", "off"):
        return False, "FASTOPT_BUILD_CUDA=0"
    reasons = []
    if torch.version.cuda is None:
        reasons.append("the installed torch is not a CUDA build")
    home = _cuda_home(cpp_extension)
    if home is not None and home != cpp_extension.CUDA_HOME:
        cpp_extension.CUDA_HOME = home
        os.environ["CUDA_HOME"] = home
    if home is None or not os.path.exists(os.path.join(home, "bin", "nvcc")):
        reasons.append("no nvcc found (set CUDA_HOME to the toolkit root)")
    if not _rel("csrc/cuda/*.cu"):
        reasons.append("no CUDA sources in csrc/cuda")
    if reasons:
        if wanted in ("1", "true", "yes", "on"):
            sys.exit("fastopt: FASTOPT_BUILD_CUDA=1 but " + "; ".join(reasons))
        return False, "; ".join(reasons)
    return True, f"nvcc in {home}, torch CUDA {torch.version.cuda}"


def _nvidia_wheel_includes():
    # torch's CUDA headers include cuBLAS/cuSPARSE headers that a pip-installed
    # CUDA torch ships in the nvidia-* wheels rather than in the toolkit.
    dirs = []
    for base in sys.path:
        for pattern in ("nvidia/*/include", "nvidia/cu*/include"):
            dirs.extend(glob.glob(os.path.join(base, pattern)))
    return sorted({d for d in dirs if os.path.isdir(d)})


def _extensions():
    from torch.utils import cpp_extension

    with_cuda, why = _cuda_decision()
    print(f"fastopt: CUDA kernels {'built' if with_cuda else 'skipped'} ({why})", flush=True)
    with open(os.path.join(ROOT, "fastopt", "_build_info.py"), "w") as f:
        f.write("# Written by setup.py at build time.\n")
        f.write(f"WITH_CUDA = {with_cuda!r}\nCUDA_REASON = {why!r}\n")

    sources = _rel("csrc/*.cpp") + _rel("csrc/cpu/*.cpp")
    include_dirs = [os.path.join(ROOT, "csrc", "include"), os.path.join(ROOT, "csrc")]
    # torch adds the C++ standard it needs (C++20). -fopenmp: at::parallel_for is
    # an inline OpenMP region, a single thread without it. -fno-trapping-math:
    # lets GCC vectorize the bf16/fp16 CPU loops; -ffp-contract=off: no fma but
    # the ones update_math.h writes (NOTE [CPU SIMD through function
    # multiversioning] in csrc/cpu/kernels.h).
    cxx_flags = CXX_FLAGS
    link_flags = ["-fopenmp"]
    if not with_cuda:
        return [
            cpp_extension.CppExtension(
                "fastopt._C",
                sources,
                include_dirs=include_dirs,
                extra_compile_args={"cxx": cxx_flags},
                extra_link_args=link_flags,
            )
        ]
    os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "8.0;9.0+PTX")
    sources += _rel("csrc/cuda/*.cu") + _rel("csrc/cuda/*.cpp")
    # The toolkit's headers ahead of the nvidia-* wheels': the nvidia-cuda-runtime
    # wheel ships its own cuda_runtime.h (without crt/), which must not shadow
    # the toolkit's. The wheels are still needed for cuBLAS/cuSPARSE headers
    # that ATen/cuda headers include.
    include_dirs += [os.path.join(cpp_extension.CUDA_HOME, "include")] + _nvidia_wheel_includes()
    return [
        cpp_extension.CUDAExtension(
            "fastopt._C",
            sources,
            include_dirs=include_dirs,
            extra_compile_args={"cxx": cxx_flags, "nvcc": NVCC_FLAGS},
            extra_link_args=link_flags,
        )
    ]


def main():
    from torch.utils.cpp_extension import BuildExtension

    setup(
        ext_modules=_extensions(),
        cmdclass={"build_ext": BuildExtension.with_options(use_ninja=True)},
    )


if __name__ == "__main__":
    main()
