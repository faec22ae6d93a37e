"""Every kernel specialisation the Triton backend can launch, for ahead-of-time checks.

The launchers pass tensors for pointers (never alignment-specialised,
``multi_tensor.kernel``) and annotated fp64/fp32 scalars, so
a specialisation is fixed by its constexprs alone; this module enumerates
them so tests can ``triton.compile`` each one for a GPU target without a GPU
(tests/test_triton_aot.py), with the launches' own options.
"""

from __future__ import annotations

from collections.abc import Iterator

import triton.language as tl

from fastopt.triton_kernels import multi_tensor as mt
from fastopt.triton_kernels.adamw import _adamw_kernel
from fastopt.triton_kernels.ademamix import _ademamix_kernel
from fastopt.triton_kernels.elementwise import GRAD_TRANSFORM_TYPES
from fastopt.triton_kernels.lion import _lion_kernel
from fastopt.triton_kernels.norm import _sumsq_kernel

STORAGE_DTYPES = (tl.float32, tl.bfloat16, tl.float16)  # params, grads; moments add uint8
LOW_PRECISION = (tl.bfloat16, tl.float16)

# Pointer and tuple arguments, by the name every kernel gives them; scalar
# arguments carry their type as an annotation (``lr: tl.float64``).
ARGUMENT_TYPES = {
    "chunks_ptr": "*i64",
    "rows_ptr": "*i64",
    "partials_ptr": "*fp32",
    "lr_ptr": "*fp32",
    "skip_ptr": "*fp32",
    "transform": GRAD_TRANSFORM_TYPES,
}

# The fp32 fmas each kernel writes on purpose, per element (lerps, the second
# moment, AdEMAMix's step; NOTE [one formula per quantity]): with implicit
# contraction off these are the only fma.rn.f32 in its PTX.
EXPLICIT_FMAS = {"sumsq": 0, "adamw": 2, "lion": 2, "ademamix": 4}


def signature(kernel) -> dict[str, str]:
    """The ``triton.compile`` signature of a kernel: constexprs, annotated scalars, pointers."""
    sig = {}
    for param in kernel.params:
        if param.is_constexpr:
            assert param.name.isupper(), f"{kernel.__name__}: constexpr {param.name} not UPPER_CASE"
            sig[param.name] = "constexpr"
        elif param.annotation:
            sig[param.name] = param.annotation
        else:
            assert param.name in ARGUMENT_TYPES, f"{kernel.__name__}: no type for {param.name}"
            sig[param.name] = ARGUMENT_TYPES[param.name]
    return sig


def _grad_dtypes(p):
    # Gradients have the params' dtype, or fp32 for bf16/fp16 params.
    return (p,) if p == tl.float32 else (p, tl.float32)


def _master_and_moments(p):
    # (MASTER, S_DTYPE) pairs: masters (fp32) for 16-bit params, remainders for bf16;
    # the moments in the policy's dtype (fp32 with a master, else the param's) or
    # state_dtype's fp32 / bf16 / 8-bit (uint8, NOTE [int8 moments]).
    masters = (0, 1, 2) if p == tl.bfloat16 else (0, 1) if p in LOW_PRECISION else (0,)
    for master in masters:
        for s in dict.fromkeys((tl.float32 if master else p, tl.float32, tl.bfloat16, tl.uint8)):
            yield master, s


def specialisations() -> Iterator[tuple[str, object, dict[str, object]]]:
    """(label, kernel, constexprs) for every launchable specialisation."""
    for aligned in (True, False):
        for g in STORAGE_DTYPES:
            yield (
                f"sumsq g={g} aligned={aligned}",
                _sumsq_kernel,
                {"G_DTYPE": g, "ALIGNED": aligned},
            )
        for p in STORAGE_DTYPES:
            for g in _grad_dtypes(p):
                for master, s in _master_and_moments(p):
                    common = {"P_DTYPE": p, "G_DTYPE": g, "S_DTYPE": s, "MASTER": master,
                              "ALIGNED": aligned}  # fmt: skip
                    for amsgrad in (False, True) if s != tl.uint8 else (False,):
                        yield (
                            f"adamw p={p} g={g} master={master} s={s} amsgrad={amsgrad} aligned={aligned}",
                            _adamw_kernel,
                            {**common, "AMSGRAD": amsgrad},
                        )
                    yield (
                        f"lion p={p} g={g} master={master} s={s} aligned={aligned}",
                        _lion_kernel,
                        common,
                    )
                    yield (
                        f"ademamix p={p} g={g} master={master} s={s} aligned={aligned}",
                        _ademamix_kernel,
                        common,
                    )


def compile_one(kernel, constexprs, arch: int):
    """``triton.compile`` one specialisation for ``sm_<arch>`` (no GPU needed)."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource, compile

    src = ASTSource(kernel, signature(kernel), constexprs=constexprs)
    return compile(src, target=GPUTarget("cuda", arch, 32), options=dict(mt.LAUNCH_OPTIONS))


def check_all(arch: int) -> list[dict]:
    """Compile every specialisation for ``sm_<arch>`` and describe each result.

    Run in a process without TRITON_INTERPRET (the compiler is bypassed under
    the interpreter). ptxas's ``-v`` report is captured through Triton's
    TRITON_DUMP_PTXAS_LOG knob, which the caller sets.
    """
    import contextlib
    import io
    import re

    results = []
    for label, kernel, constexprs in specialisations():
        log = io.StringIO()
        with contextlib.redirect_stdout(log):
            compiled = compile_one(kernel, constexprs, arch)
        ptx = compiled.asm["ptx"]
        spills = [
            int(a) + int(b)
            for a, b in re.findall(
                r"(\d+) bytes spill stores, (\d+) bytes spill loads", log.getvalue()
            )
        ]
        registers = [int(r) for r in re.findall(r"Used (\d+) registers", log.getvalue())]
        results.append(
            {
                "label": label,
                "aligned": constexprs["ALIGNED"],
                "cubin_bytes": len(compiled.asm["cubin"]),
                "v4_loads": len(re.findall(r"ld\.global(?:\.\w+)*\.v4\.", ptx)),
                "v2_loads": len(re.findall(r"ld\.global(?:\.\w+)*\.v2\.", ptx)),
                "v4_stores": len(re.findall(r"st\.global(?:\.\w+)*\.v4\.", ptx)),
                "fma_f32": len(re.findall(r"\bfma\.rn\.f32\b", ptx)),
                "local_memory": bool(re.search(r"\.local\b|ld\.local|st\.local", ptx)),
                "spill_bytes": spills,
                "registers": registers,
            }
        )
    return results


def main(arch: int) -> None:
    """Print one JSON line per specialisation (the subprocess side of the AOT test)."""
    import json

    for row in check_all(arch):
        print(json.dumps(row), flush=True)
