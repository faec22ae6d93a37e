"""The Triton backend against the reference backend, on CPU tensors under TRITON_INTERPRET=1.

Tolerances (STYLE §12):
* fp32 storage, or fp32 master/moments: torch's default fp32 tolerance. The
  kernel's fp32 arithmetic follows the reference's order of operations; it
  differs only by FMA contraction and by the learning rate entering the fp64
  coefficient math as an fp32 value (a relative 6e-8 change of the step size).
* bf16/fp16 storage: at most 1 ulp of the storage dtype per step (checked in
  lock-step, both backends starting each step from the same state). Both
  backends compute in fp32 and round once to nearest even; fp32 results a few
  fp32 ulps apart can land on neighbouring storage values only when they
  straddle a rounding boundary, so more than 1 ulp would be a real error.
  Where the fp32 result is itself a cancellation (a moment crossing zero) its
  own absolute error is that of the operands, ~1e-7 of the tensor's scale, and
  many storage ulps of the tiny result; differences below 2^-22 times the
  tensor's largest magnitude are accepted there.
* A parameter written from a master weight must be *exactly* the master
  rounded to nearest even (torch's ``.to(dtype)``), bit for bit.
"""

import math

import pytest
import torch

from fastopt.backends import reference as ref_backend
from fastopt.backends import triton as triton_backend

pytestmark = pytest.mark.skipif(
    triton_backend.available() is not None or not triton_backend.supports(torch.device("cpu")),
    reason=f"triton interpreter not available: {triton_backend.available()}",
)

SMALL_SIZES = [0, 1, 3, 1025, 65543]
LOW = (torch.bfloat16, torch.float16)


def ordered_bits(x: torch.Tensor) -> torch.Tensor:
    """Storage bits mapped to integers that are consecutive for adjacent bf16/fp16 values."""
    i = x.view(torch.int16).to(torch.int32)
    return torch.where(i < 0, -(i & 0x7FFF), i)


def assert_within_ulp(actual, expected, ulps=1, what=""):
    assert actual.dtype == expected.dtype
    if actual.dtype == torch.float32:
        torch.testing.assert_close(actual, expected, msg=lambda m: f"{what}: {m}")
        return
    both_nan = actual.isnan() & expected.isnan()
    diff = (ordered_bits(actual) - ordered_bits(expected)).abs()
    scale = expected.float().abs().max() if expected.numel() else 0.0
    cancellation = (actual.float() - expected.float()).abs() <= scale * 2.0**-22
    bad = (diff > ulps) & ~both_nan & ~cancellation
    assert not bad.any(), (
        f"{what}: {int(bad.sum())} elements differ by more than {ulps} ulp; "
        f"e.g. {actual[bad][:4].tolist()} vs {expected[bad][:4].tolist()}"
    )


class AdamWCase:
    """One group of tensors and the state both backends update."""

    def __init__(self, sizes, dtype, *, master=False, amsgrad=False, grad_dtype=None, seed=0):
        gen = torch.Generator().manual_seed(seed)
        grad_dtype = grad_dtype or dtype
        state_dtype = torch.float32 if master else dtype

        def randn(n, dt, scale=1.0):
            return (torch.randn(n, generator=gen) * scale).to(dt)

        self.params = [randn(n, dtype) for n in sizes]
        self.grads = [randn(n, grad_dtype) for n in sizes]
        self.exp_avgs = [randn(n, state_dtype, 0.1) for n in sizes]
        self.exp_avg_sqs = [(torch.rand(n, generator=gen) * 1e-2).to(state_dtype) for n in sizes]
        self.max_exp_avg_sqs = (
            [
                (v.float() * torch.rand(n, generator=gen) * 2).to(state_dtype)
                for v, n in zip(self.exp_avg_sqs, sizes, strict=False)
            ]
            if amsgrad
            else []
        )
        self.master_params = (
            [
                p.float() + randn(n, torch.float32, 1e-3)
                for p, n in zip(self.params, sizes, strict=False)
            ]
            if master
            else []
        )
        if master:  # the parameter is always the rounded master
            self.params = [w.to(dtype) for w in self.master_params]
        # Per-tensor step counts differ (params whose grad was None some steps).
        self.steps = [torch.tensor(float(1 + i % 4)) for i in range(len(sizes))]

    def lists(self):
        return [self.params, self.grads, self.exp_avgs, self.exp_avg_sqs,
                self.max_exp_avg_sqs, self.master_params, self.steps]  # fmt: skip

    def clone(self):
        other = object.__new__(AdamWCase)
        for name in (
            "params",
            "grads",
            "exp_avgs",
            "exp_avg_sqs",
            "max_exp_avg_sqs",
            "master_params",
            "steps",
        ):
            setattr(other, name, [t.clone() for t in getattr(self, name)])
        return other

    def new_grads(self, seed):
        gen = torch.Generator().manual_seed(1000 + seed)
        for g in self.grads:
            g.copy_(torch.randn(g.shape, generator=gen))
        for s in self.steps:
            s.add_(1)


def adamw_kw(**over):
    kw = dict(lr=1e-3, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.1, amsgrad=False,
              maximize=False, grad_scale=None, found_inf=None)  # fmt: skip
    kw.update(over)
    return kw


def compare_adamw(got: AdamWCase, want: AdamWCase, lockstep_low: bool):
    names = ("params", "exp_avgs", "exp_avg_sqs", "max_exp_avg_sqs", "master_params")
    for name in names:
        for i, (a, b) in enumerate(zip(getattr(got, name), getattr(want, name), strict=False)):
            assert_within_ulp(a, b, what=f"{name}[{i}]")
    for w, p in zip(got.master_params, got.params, strict=False):
        assert torch.equal(p.view(torch.int16), w.to(p.dtype).view(torch.int16)), (
            "param != RNE(master)"
        )


def run_adamw(case: AdamWCase, n_steps: int, **kw):
    """n_steps of both backends; low-precision states are re-synchronised each step."""
    mine = case.clone()
    theirs = case.clone()
    low_state = mine.exp_avgs and mine.exp_avgs[0].dtype in LOW
    for step in range(n_steps):
        if step:
            mine.new_grads(step)
            theirs.new_grads(step)
        triton_backend.adamw_(*mine.lists(), **kw)
        ref_backend.adamw_(*theirs.lists(), **kw)
        compare_adamw(mine, theirs, lockstep_low=low_state)
        if low_state:  # lock-step: both continue from the reference's state
            mine = theirs.clone()


@pytest.mark.parametrize("amsgrad", [False, True])
@pytest.mark.parametrize("maximize", [False, True])
@pytest.mark.parametrize("weight_decay", [0.0, 0.1])
def test_adamw_fp32(amsgrad, maximize, weight_decay):
    case = AdamWCase(SMALL_SIZES, torch.float32, amsgrad=amsgrad)
    run_adamw(case, 3, **adamw_kw(amsgrad=amsgrad, maximize=maximize, weight_decay=weight_decay))


@pytest.mark.parametrize("dtype", LOW)
@pytest.mark.parametrize("master", [False, True])
@pytest.mark.parametrize("amsgrad", [False, True])
def test_adamw_low_precision(dtype, master, amsgrad):
    case = AdamWCase(SMALL_SIZES, dtype, master=master, amsgrad=amsgrad, seed=1)
    run_adamw(case, 2, **adamw_kw(amsgrad=amsgrad))


def test_adamw_grad_dtype_differs_from_param():
    """bf16 params with fp32 grads and fp16 grads in one call (one launch per grad dtype)."""
    case = AdamWCase(SMALL_SIZES, torch.bfloat16, master=True)
    case.grads = [g.float() if i % 2 else g.half() for i, g in enumerate(case.grads)]
    run_adamw(case, 2, **adamw_kw())


def test_adamw_grad_scale_and_tensor_lr():
    case = AdamWCase(SMALL_SIZES, torch.float32, amsgrad=True, seed=2)
    kw = adamw_kw(
        lr=torch.tensor(3e-3),
        grad_scale=torch.tensor(1 / 1024),
        found_inf=torch.tensor(0.0),
        amsgrad=True,
    )
    run_adamw(case, 2, **kw)


def test_adamw_large_tensor_fp32_amsgrad():
    case = AdamWCase([2**20 + 7, 5], torch.float32, amsgrad=True, seed=3)
    run_adamw(case, 2, **adamw_kw(amsgrad=True, grad_scale=torch.tensor(0.5)))


def test_adamw_large_tensor_bf16_master():
    case = AdamWCase([2**20 + 7], torch.bfloat16, master=True, seed=4)
    run_adamw(case, 1, **adamw_kw())


def test_adamw_2000_small_tensors():
    sizes = [1 + (i * 37) % 300 for i in range(2000)]
    case = AdamWCase(sizes, torch.float32, amsgrad=False, seed=5)
    run_adamw(case, 1, **adamw_kw())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_adamw_found_inf_writes_nothing(dtype):
    case = AdamWCase(SMALL_SIZES, dtype, master=dtype != torch.float32, amsgrad=True, seed=6)
    before = case.clone()
    triton_backend.adamw_(
        *case.lists(),
        **adamw_kw(amsgrad=True, found_inf=torch.tensor(1.0), grad_scale=torch.tensor(2.0)),
    )
    for name in ("params", "exp_avgs", "exp_avg_sqs", "max_exp_avg_sqs", "master_params", "steps"):
        for a, b in zip(getattr(case, name), getattr(before, name), strict=False):
            assert torch.equal(a.reshape(-1).view(torch.uint8), b.reshape(-1).view(torch.uint8)), (
                name
            )


# ---- Lion ---------------------------------------------------------------------


def lion_kw(**over):
    kw = dict(
        lr=1e-4,
        beta1=0.9,
        beta2=0.99,
        weight_decay=0.1,
        maximize=False,
        grad_scale=None,
        found_inf=None,
    )
    kw.update(over)
    return kw


def run_lion(case: AdamWCase, n_steps: int, **kw):
    """Lock-step Lion. sign(c) is ill-posed where c is within rounding of zero:
    there the two backends may legitimately move the weight in opposite
    directions, so such elements are excluded from the parameter comparison
    (and required to be rare, so the exclusion cannot hide a real error)."""
    mine, theirs = case.clone(), case.clone()
    for step in range(n_steps):
        if step:
            mine.new_grads(step)
            theirs.new_grads(step)
        scale = 1.0 if kw["grad_scale"] is None else float(kw["grad_scale"])
        ambiguous = []
        for m, g in zip(theirs.exp_avgs, theirs.grads, strict=False):
            m64, g64 = m.double(), g.double() * scale
            c = m64 + (1 - kw["beta1"]) * (g64 - m64)
            ambiguous.append(c.abs() <= 1e-6 * (m64.abs() + g64.abs()))
        lists = lambda c: (c.params, c.grads, c.exp_avgs, c.master_params)  # noqa: E731
        triton_backend.lion_(*lists(mine), **kw)
        ref_backend.lion_(*lists(theirs), **kw)
        total = sum(a.numel() for a in ambiguous)
        assert sum(int(a.sum()) for a in ambiguous) <= max(2, 1e-4 * total)
        for name in ("params", "master_params"):
            for i, (a, b) in enumerate(
                zip(getattr(mine, name), getattr(theirs, name), strict=False)
            ):
                keep = ~ambiguous[i]
                assert_within_ulp(a[keep], b[keep], what=f"lion {name}[{i}]")
        for i, (a, b) in enumerate(zip(mine.exp_avgs, theirs.exp_avgs, strict=False)):
            assert_within_ulp(a, b, what=f"lion exp_avgs[{i}]")
        for w, p in zip(mine.master_params, mine.params, strict=False):
            assert torch.equal(p.view(torch.int16), w.to(p.dtype).view(torch.int16)), (
                "param != RNE(master)"
            )
        mine = theirs.clone()


@pytest.mark.parametrize("maximize", [False, True])
@pytest.mark.parametrize("weight_decay", [0.0, 0.1])
def test_lion_fp32(maximize, weight_decay):
    run_lion(
        AdamWCase(SMALL_SIZES, torch.float32, seed=7),
        3,
        **lion_kw(maximize=maximize, weight_decay=weight_decay),
    )


@pytest.mark.parametrize("dtype", LOW)
@pytest.mark.parametrize("master", [False, True])
def test_lion_low_precision(dtype, master):
    case = AdamWCase(SMALL_SIZES, dtype, master=master, seed=8)
    run_lion(case, 2, **lion_kw(grad_scale=torch.tensor(0.25), lr=torch.tensor(3e-4)))


def test_lion_large_and_many():
    sizes = [2**20 + 7] + [1 + (i * 13) % 100 for i in range(200)]
    run_lion(AdamWCase(sizes, torch.float32, seed=9), 1, **lion_kw())


def test_lion_found_inf_writes_nothing():
    case = AdamWCase(SMALL_SIZES, torch.float16, master=True, seed=10)
    before = case.clone()
    triton_backend.lion_(
        case.params,
        case.grads,
        case.exp_avgs,
        case.master_params,
        **lion_kw(found_inf=torch.tensor(1.0)),
    )
    for name in ("params", "exp_avgs", "master_params"):
        for a, b in zip(getattr(case, name), getattr(before, name), strict=False):
            assert torch.equal(a.reshape(-1).view(torch.uint8), b.reshape(-1).view(torch.uint8)), (
                name
            )


# ---- grad_sumsq -----------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_grad_sumsq(dtype):
    gen = torch.Generator().manual_seed(11)
    grads = [torch.randn(n, generator=gen).to(dtype) for n in SMALL_SIZES + [2**20 + 7]]
    got = triton_backend.grad_sumsq(grads)
    want = ref_backend.grad_sumsq(grads)
    assert got.dtype == torch.float32 and got.dim() == 0
    # Chunk partials are fp32 sums of <= 8192 squares (relative error well under 1e-6).
    torch.testing.assert_close(got, want)


def test_grad_sumsq_mixed_dtypes_many_tensors_and_empty():
    gen = torch.Generator().manual_seed(12)
    grads = [
        torch.randn(1 + i % 50, generator=gen).to(
            [torch.float32, torch.bfloat16, torch.float16][i % 3]
        )
        for i in range(300)
    ]
    torch.testing.assert_close(triton_backend.grad_sumsq(grads), ref_backend.grad_sumsq(grads))
    assert float(triton_backend.grad_sumsq([])) == 0.0
    assert float(triton_backend.grad_sumsq([torch.empty(0)])) == 0.0


def test_grad_sumsq_non_finite():
    g = torch.randn(3000)
    g[1234] = math.inf
    assert triton_backend.grad_sumsq([torch.randn(7), g]).isinf()
    g[1234] = math.nan
    assert triton_backend.grad_sumsq([g]).isnan()


def test_adamw_beta1_zero_and_tensor_lr_float64():
    """beta1 = 0 (bias correction 1) and a float64 lr tensor, read exactly by the kernel."""
    case = AdamWCase([3, 1025], torch.float32, seed=13)
    run_adamw(case, 2, **adamw_kw(beta1=0.0, lr=torch.tensor(2e-3, dtype=torch.float64)))
