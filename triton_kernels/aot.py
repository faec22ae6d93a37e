"""Every kernel specialisation the Triton backend can launch, for ahead-of-time checks.

The launchers pass tensors for pointers (never alignment-specialised, see the
``do_not_specialize_on_alignment`` lists) and Python floats for scalars
(``fp32``), so a specialisation is fixed by its constexprs alone; this module
enumerates them so tests can ``triton.compile`` each one for a GPU target
without a GPU (tests/test_triton_aot.py).
"""

from __future__ import annotations

from collections.abc import Iterator

import triton.language as tl

from fastopt.triton_kernels import multi_tensor as mt
from fastopt.triton_kernels.adamw import _adamw_kernel
from fastopt.triton_kernels.lion import _lion_kernel
from fastopt.triton_kernels.norm import _sumsq_kernel

STORAGE_DTYPES = (tl.float32, tl.bfloat16, tl.float16)
LOW_PRECISION = (tl.bfloat16, tl.float16)

_COMMON = {"ROW_WIDTH": mt.ROW_WIDTH, "BLOCK": mt.BLOCK, "CHUNK": mt.CHUNK}


def _signature(kernel, runtime: dict[str, str]) -> dict[str, str]:
    # Runtime arguments are listed explicitly; everything else must be an
    # UPPER_CASE constexpr, so a forgotten runtime argument fails here.
    assert set(runtime) <= set(kernel.arg_names), set(runtime) - set(kernel.arg_names)
    missing = [n for n in kernel.arg_names if n not in runtime and not n.isupper()]
    assert not missing, f"{kernel.__name__}: no signature type for {missing}"
    return {name: runtime.get(name, "constexpr") for name in kernel.arg_names}


_ADAMW_ARGS = {
    "chunks_ptr": "*i64", "rows_ptr": "*i64", "lr_hi": "fp32", "lr_lo": "fp32", "lr_ptr": "*fp64",
    "wd_hi": "fp32", "wd_lo": "fp32", "beta1_hi": "fp32", "beta1_lo": "fp32",
    "beta2_hi": "fp32", "beta2_lo": "fp32", "one_minus_beta1": "fp32", "beta2": "fp32",
    "one_minus_beta2": "fp32", "eps": "fp32", "grad_sign": "fp32",
    "grad_mul_ptr": "*fp32", "found_inf_ptr": "*fp32",
}  # fmt: skip
_LION_ARGS = {
    "chunks_ptr": "*i64", "rows_ptr": "*i64", "lr_hi": "fp32", "lr_lo": "fp32", "lr_ptr": "*fp64",
    "wd_hi": "fp32", "wd_lo": "fp32", "one_minus_beta1": "fp32", "one_minus_beta2": "fp32",
    "grad_sign": "fp32", "grad_mul_ptr": "*fp32", "found_inf_ptr": "*fp32",
}  # fmt: skip
_SUMSQ_ARGS = {"chunks_ptr": "*i64", "rows_ptr": "*i64", "partials_ptr": "*fp32"}


def specialisations() -> Iterator[tuple[str, object, dict[str, str], dict[str, object]]]:
    """(label, kernel, signature, constexprs) for every launchable specialisation."""
    for aligned in (True, False):
        for g in STORAGE_DTYPES:
            yield (
                f"sumsq g={g} aligned={aligned}",
                _sumsq_kernel,
                _signature(_sumsq_kernel, _SUMSQ_ARGS),
                {"G_DTYPE": g, "ALIGNED": aligned, **_COMMON},
            )
        for p in STORAGE_DTYPES:
            for g in STORAGE_DTYPES:
                for master in (False, True) if p in LOW_PRECISION else (False,):
                    for amsgrad in (False, True):
                        yield (
                            f"adamw p={p} g={g} master={master} amsgrad={amsgrad} aligned={aligned}",
                            _adamw_kernel,
                            _signature(_adamw_kernel, _ADAMW_ARGS),
                            {"P_DTYPE": p, "G_DTYPE": g, "AMSGRAD": amsgrad, "MASTER": master,
                             "ALIGNED": aligned, **_COMMON},
                        )  # fmt: skip
                    yield (
                        f"lion p={p} g={g} master={master} aligned={aligned}",
                        _lion_kernel,
                        _signature(_lion_kernel, _LION_ARGS),
                        {
                            "P_DTYPE": p,
                            "G_DTYPE": g,
                            "MASTER": master,
                            "ALIGNED": aligned,
                            **_COMMON,
                        },
                    )


def compile_one(kernel, signature, constexprs, arch: int):
    """``triton.compile`` one specialisation for ``sm_<arch>`` (no GPU needed)."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource, compile

    src = ASTSource(kernel, signature, constexprs=constexprs)
    return compile(src, target=GPUTarget("cuda", arch, 32), options={"num_warps": mt.NUM_WARPS})


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
    for label, kernel, signature, constexprs in specialisations():
        log = io.StringIO()
        with contextlib.redirect_stdout(log):
            compiled = compile_one(kernel, signature, constexprs, arch)
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
