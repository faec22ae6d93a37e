"""The Triton kernels' shared pieces, on CPU tensors under TRITON_INTERPRET=1.

The kernels against the reference, case by case, are in the one case table of
every backend (tests/test_kernels.py). Here: the pieces that table relies on
without seeing them, each checked bit for bit against the torch operation it
stands for (NOTE [one formula per quantity] in update_math.h), and the
interpreter adaptations that make interpreted runs mean something (NOTE
[interpreter cost of jit calls]).
"""

import pytest
import torch
import triton
import triton.language as tl
from triton.runtime.interpreter import InterpretedFunction

from fastopt.backends import reference as ref_backend
from fastopt.backends import triton as triton_backend

pytestmark = pytest.mark.skipif(
    not triton_backend.supports(torch.device("cpu")), reason="needs TRITON_INTERPRET=1"
)

K = triton_backend.functions() if triton_backend.unavailable() is None else None
em = K.elementwise if K is not None else None
mt = K.multi_tensor if K is not None else None

N = 4096


@triton.jit
def _lerp_kernel(a_ptr, b_ptr, out_ptr, w, N: tl.constexpr):
    offs = tl.arange(0, N)
    w32 = tl.full([], w, tl.float32)
    tl.store(out_ptr + offs, em.lerp(tl.load(a_ptr + offs), tl.load(b_ptr + offs), w32))


@triton.jit
def _second_moment_kernel(v_ptr, g_ptr, out_ptr, beta2: tl.float64, N: tl.constexpr):
    offs = tl.arange(0, N)
    b2 = em.f64(beta2)
    out = em.second_moment(
        tl.load(v_ptr + offs), tl.load(g_ptr + offs), b2.to(tl.float32), (1.0 - b2).to(tl.float32)
    )
    tl.store(out_ptr + offs, out)


@triton.jit
def _transform_kernel(g_ptr, out_ptr, transform, N: tl.constexpr):
    offs = tl.arange(0, N)
    g = em.load(g_ptr, offs, offs < N)
    em.store(out_ptr, offs, em.transform_grad(g, em.grad_scalars(transform)), offs < N)


@triton.jit
def _f64_kernel(out_ptr, x: tl.float64):
    tl.store(out_ptr, em.f64(x))


def randn(n, seed, scale=1.0):
    return torch.randn(n, generator=torch.Generator().manual_seed(seed)) * scale


def test_helpers_are_plain_functions_under_the_interpreter():
    """NOTE [interpreter cost of jit calls]: a helper call costs a Python call, not a
    re-patch of triton.language, so the kernels can share them per block."""
    helpers = [em.lerp, em.transform_grad, em.load, em.store, K.rounding.narrow,
               mt.for_each_block, mt.update_prologue]  # fmt: skip
    for fn in helpers:
        assert callable(fn) and not isinstance(fn, InterpretedFunction), fn
    # The kernels themselves stay interpreted launches.
    assert isinstance(K.adamw._adamw_kernel, InterpretedFunction)


@pytest.mark.parametrize("weight", [0.1, 0.001, 0.5, 0.9, 1 - 0.9999])
def test_lerp_is_torch_lerp(weight):
    """Both of torch's formulas (weight below / from 0.5), fused as torch's CPU kernel."""
    a, b = randn(N, 0), randn(N, 1, 3.0)
    out = torch.empty(N)
    _lerp_kernel[(1,)](a, b, out, weight, N=N)
    assert torch.equal(out, a.lerp(b, weight))


@pytest.mark.parametrize("beta2", [0.999, 0.95])
def test_second_moment_is_torch_mul_addcmul(beta2):
    v, g = randn(N, 2).abs() * 1e-2, randn(N, 3)
    out = torch.empty(N)
    _second_moment_kernel[(1,)](v, g, out, beta2, N=N)
    assert torch.equal(out, v.clone().mul_(beta2).addcmul_(g, g, value=1 - beta2))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(
    "kw",
    [
        dict(),
        dict(grad_mul=1 / 1024, clip_coef=0.25),
        dict(grad_mul=0.5, max_grad_value=0.75, clip_coef=0.5),
        dict(grad_mul=0.5, max_grad_value=0.75, maximize=True),
        dict(max_grad_value=0.0),
    ],
)
def test_gradient_transform_is_the_reference_transform(dtype, kw):
    """NOTE [gradient transform]: unscale, clamp (NaN stays NaN, ±inf clamp), clip; maximize
    as the sign folded into grad_mul equals negating afterwards."""
    g = randn(N, 4, 2.0)
    g[:4] = torch.tensor([float("nan"), float("inf"), -float("inf"), -0.0])
    g = g.to(dtype)
    out = torch.empty(N, dtype=dtype)
    grad_mul = None if "grad_mul" not in kw else torch.tensor(kw["grad_mul"])
    clip_coef = None if "clip_coef" not in kw else torch.tensor(kw["clip_coef"])
    max_grad_value, maximize = kw.get("max_grad_value"), kw.get("maximize", False)
    transform = mt.grad_transform(g.device, grad_mul, max_grad_value, clip_coef, maximize)
    _transform_kernel[(1,)](g, out, transform, N=N)
    want = ref_backend._transform(g, grad_mul, max_grad_value, clip_coef, maximize).to(dtype)
    same = (out.view(torch.int16 if dtype != torch.float32 else torch.int32) ==
            want.view(torch.int16 if dtype != torch.float32 else torch.int32))  # fmt: skip
    assert bool((same | (out.isnan() & want.isnan())).all())
    assert bool(out[0].isnan())


@pytest.mark.parametrize("x", [0.1, 1e-3, 1 - 1e-9, 3e-300, 1e300, -(2.0**-60) / 3])
def test_fp64_arguments_arrive_exactly(x):
    """Hyperparameters are fp64 kernel arguments (NOTE [one precision policy]): the
    kernel sees the Python double itself, not its fp32 rounding (the interpreter would
    otherwise make an fp32 constant of it)."""
    out = torch.zeros((), dtype=torch.float64)
    _f64_kernel[(1,)](out, x)
    assert float(out) == x


def test_row_constants_match_the_kernels_tables():
    """The exported row layout: six array slots fit (AdamW and AdEMAMix use all six)."""
    assert mt.ROW_ARRAYS.value + mt.FIRST_STATE.value + 3 == mt.ROW_WIDTH.value
    assert K.adamw.MAX_EXP_AVG_SQ.value == K.ademamix.EXP_AVG_SQ.value == 5
    # storage dtypes; uint8 is the 8-bit moments' (NOTE [int8 moments])
    assert set(mt.TL_DTYPE) == {torch.float32, torch.bfloat16, torch.float16, torch.uint8}
