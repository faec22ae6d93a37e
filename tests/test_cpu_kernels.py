"""The cpu backend's kernels against the reference backend, op registration, rounding, memory.

Every case runs the cpu backend and the reference backend in lock-step: both
start each step from the same state, the outputs (params and every state
tensor) are compared, and then the cpu side is reset to the reference's state
so that a rounding difference in one step is not amplified by the next.
"""

from __future__ import annotations

import math

import pytest
import torch

from fastopt.backends import cpu, reference

# The cpu backend is part of every install (the build needs only a C++ compiler):
# a missing one is a failure here, not a reason to skip.
assert cpu.available() is None, f"cpu backend not built: {cpu.available()}"

BETA1, BETA2, EPS = 0.9, 0.999, 1e-8
LION_BETAS = (0.9, 0.99)
SIZES = (0, 1, 3, 1025, 65543, (1 << 20) + 7)
DTYPES = (torch.float32, torch.bfloat16, torch.float16)
STEPS = 3

# Each mode is a variant of the op's arguments.
ADAMW_MODES = {
    "plain": {},
    "wd0": {"weight_decay": 0.0},
    "amsgrad": {"amsgrad": True},
    "maximize": {"maximize": True},
    "grad_scale": {"grad_scale": 0.25},
    "found_inf_zero": {"found_inf": 0.0},
    "per_tensor_steps": {"per_tensor_steps": True},
    "master": {"master": True},
    "master_amsgrad_maximize": {"master": True, "amsgrad": True, "maximize": True},
    "lr_tensor": {"lr_tensor": True},
}
LION_MODES = {
    "plain": {},
    "wd0": {"weight_decay": 0.0},
    "maximize": {"maximize": True},
    "grad_scale": {"grad_scale": 4.0},
    "master": {"master": True},
    "master_maximize_scale": {"master": True, "maximize": True, "grad_scale": 0.5},
}


# ---- helpers ---------------------------------------------------------------------


def ulp(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Spacing of `dtype` numbers at |x| (in float32), floored at the smallest subnormal."""
    info = torch.finfo(dtype)
    _, exponent = torch.frexp(x.float().abs())
    spacing = torch.ldexp(torch.full_like(x, info.eps, dtype=torch.float32), exponent - 1)
    return torch.maximum(spacing, torch.full_like(spacing, info.smallest_normal * info.eps))


def assert_matches(actual: torch.Tensor, expected: torch.Tensor, what: str, mask=None) -> None:
    """fp32: torch's default assert_close tolerance. bf16/fp16: within 1 ulp of the storage dtype.

    The 16-bit outputs are not bitwise equal to the reference's because both
    sides compute in fp32 with different operation orders (the reference uses
    torch's lerp / addcmul, which on this CPU contract into fused
    multiply-adds; the kernel uses update_math.h's expressions), so the fp32
    values before the single rounding differ in the last fp32 bits and can
    round to neighbouring 16-bit numbers: at most 1 ulp. The extra absolute
    1e-6 covers results that cancel to near zero (e.g. b1*m + (1-b1)*g with
    opposite signs), where a few fp32 ulps of the O(1) operands exceed the
    tiny ulp of the result.
    """
    assert actual.dtype == expected.dtype, what
    if mask is not None:
        actual, expected = actual[mask], expected[mask]
    if actual.dtype == torch.float32:
        torch.testing.assert_close(actual, expected, equal_nan=True, msg=lambda m: f"{what}: {m}")
        return
    a, e = actual.float(), expected.float()
    both_nan = a.isnan() & e.isnan()
    same_inf = torch.isinf(a) & (a == e)
    tol = torch.maximum(ulp(a, actual.dtype), ulp(e, actual.dtype)) + 1e-6
    ok = both_nan | same_inf | ((a - e).abs() <= tol)
    if not bool(ok.all()):
        bad = (~ok).nonzero()[:5].flatten()
        raise AssertionError(
            f"{what}: {int((~ok).sum())} elements beyond 1 ulp; e.g. at {bad.tolist()}: "
            f"cpu {a[bad].tolist()} vs reference {e[bad].tolist()}"
        )


def make_state(sizes, dtype, *, master, amsgrad, seed, lion=False):
    """Random params/grads/states; fp32 states under master weights, else the params' dtype."""
    gen = torch.Generator().manual_seed(seed)

    def randn(n, dt):
        return torch.randn(n, generator=gen).to(dt)

    state_dtype = torch.float32 if master else dtype
    s = {"params": [], "grads": [], "exp_avgs": [], "exp_avg_sqs": [], "max_exp_avg_sqs": [],
         "master_params": []}  # fmt: skip
    for n in sizes:
        w = torch.randn(n, generator=gen)
        s["params"].append(w.to(dtype))
        if master:
            s["master_params"].append(w.clone())
        s["grads"].append(randn(n, dtype))
        m = torch.randn(n, generator=gen) * 0.1
        s["exp_avgs"].append(m.to(state_dtype))
        if not lion:
            # A state Adam could reach: sqrt(v) >= |m|, so an update is at most ~lr.
            v = m.square() + (torch.randn(n, generator=gen) * 0.1).square()
            s["exp_avg_sqs"].append(v.to(state_dtype))
            if amsgrad:
                s["max_exp_avg_sqs"].append((v * torch.rand(n, generator=gen) * 2).to(state_dtype))
    return s


def clone_state(s):
    return {k: [t.clone() for t in v] for k, v in s.items()}


def copy_state_(dst, src):
    for k in src:
        for d, t in zip(dst[k], src[k], strict=True):
            d.copy_(t)


def compare_states(got, want, label, param_mask=None):
    for key in want:
        for i, (a, e) in enumerate(zip(got[key], want[key], strict=True)):
            masked = key in ("params", "master_params")
            mask = param_mask[i] if (param_mask is not None and masked) else None
            assert_matches(a, e, f"{label} {key}[{i}]", mask)


def adamw_call(backend, s, steps, mode, lr=1e-2):
    grad_scale = mode.get("grad_scale")
    found_inf = mode.get("found_inf")
    lr_arg = torch.tensor(lr) if mode.get("lr_tensor") else lr
    backend.adamw_(
        s["params"], s["grads"], s["exp_avgs"], s["exp_avg_sqs"], s["max_exp_avg_sqs"],
        s["master_params"], steps, lr=lr_arg, beta1=BETA1, beta2=BETA2, eps=EPS,
        weight_decay=mode.get("weight_decay", 0.1), amsgrad=mode.get("amsgrad", False),
        maximize=mode.get("maximize", False),
        grad_scale=None if grad_scale is None else torch.tensor(grad_scale),
        found_inf=None if found_inf is None else torch.tensor(found_inf),
    )  # fmt: skip


def lion_call(backend, s, mode, lr=1e-2):
    grad_scale = mode.get("grad_scale")
    found_inf = mode.get("found_inf")
    backend.lion_(
        s["params"], s["grads"], s["exp_avgs"], s["master_params"], lr=lr,
        beta1=LION_BETAS[0], beta2=LION_BETAS[1], weight_decay=mode.get("weight_decay", 0.1),
        maximize=mode.get("maximize", False),
        grad_scale=None if grad_scale is None else torch.tensor(grad_scale),
        found_inf=None if found_inf is None else torch.tensor(found_inf),
    )  # fmt: skip


def new_grads_(s, seed):
    gen = torch.Generator().manual_seed(seed)
    for g in s["grads"]:
        g.copy_(torch.randn(g.shape, generator=gen))


MANY_SMALL = [
    int(n) for n in torch.randint(0, 700, (300,), generator=torch.Generator().manual_seed(7))
]


# ---- parity with the reference -----------------------------------------------------


def _cases(modes):
    """dtype x mode, without master weights for float32 params (they ignore the flag)."""
    return [
        pytest.param(dtype, name, id=f"{name}-{str(dtype).split('.')[-1]}")
        for dtype in DTYPES
        for name, mode in modes.items()
        if not (mode.get("master") and dtype == torch.float32)
    ]


@pytest.mark.parametrize("dtype,mode_name", _cases(ADAMW_MODES))
@pytest.mark.parametrize("sizes", [SIZES, MANY_SMALL], ids=["sizes", "many_small"])
def test_adamw_matches_reference(dtype, mode_name, sizes):
    mode = ADAMW_MODES[mode_name]
    master = mode.get("master", False)
    amsgrad = mode.get("amsgrad", False)
    want = make_state(sizes, dtype, master=master, amsgrad=amsgrad, seed=1)
    got = clone_state(want)
    for step in range(1, STEPS + 1):
        if mode.get("per_tensor_steps"):
            steps = [torch.tensor(float(step + 7 * (i % 5))) for i in range(len(sizes))]
        else:
            steps = [torch.tensor(float(step)) for _ in sizes]
        new_grads_(want, seed=100 + step)
        copy_state_(got, want)
        adamw_call(cpu, got, steps, mode)
        adamw_call(reference, want, steps, mode)
        compare_states(got, want, f"adamw {mode_name} step {step}")


def lion_unambiguous(s, mode):
    """Per tensor, the elements whose Lion update direction sign(b1*m + (1-b1)*g) is certain.

    Where c is within rounding error of zero, its sign depends on the order of
    fp32 operations, and a flip moves the parameter by 2*lr; those elements
    are left out of the parameter comparison (their moments still compare).
    """
    masks = []
    scale = mode.get("grad_scale", 1.0) * (-1.0 if mode.get("maximize") else 1.0)
    for m, g in zip(s["exp_avgs"], s["grads"], strict=True):
        m64, g64 = m.double(), g.double() * scale
        c = LION_BETAS[0] * m64 + (1 - LION_BETAS[0]) * g64
        masks.append(c.abs() > 1e-5 * (m64.abs() + g64.abs()))
    return masks


@pytest.mark.parametrize("dtype,mode_name", _cases(LION_MODES))
@pytest.mark.parametrize("sizes", [SIZES, MANY_SMALL], ids=["sizes", "many_small"])
def test_lion_matches_reference(dtype, mode_name, sizes):
    mode = LION_MODES[mode_name]
    master = mode.get("master", False)
    want = make_state(sizes, dtype, master=master, amsgrad=False, seed=2, lion=True)
    got = clone_state(want)
    for step in range(1, STEPS + 1):
        new_grads_(want, seed=200 + step)
        copy_state_(got, want)
        masks = lion_unambiguous(want, mode)
        # Nearly every element must be compared, or the test proves nothing.
        assert sum(int(m.sum()) for m in masks) >= 0.999 * sum(sizes)
        lion_call(cpu, got, mode)
        lion_call(reference, want, mode)
        compare_states(got, want, f"lion {mode_name} step {step}", param_mask=masks)


@pytest.mark.parametrize("op", ["adamw", "lion"])
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).split(".")[-1])
def test_found_inf_skips_bitwise(op, dtype):
    master = dtype != torch.float32
    s = make_state([5, 70000, 1025], dtype, master=master, amsgrad=op == "adamw", seed=3,
                   lion=op == "lion")  # fmt: skip
    before = clone_state(s)
    mode = {"found_inf": 1.0, "grad_scale": 0.5, "amsgrad": op == "adamw"}
    if op == "adamw":
        adamw_call(cpu, s, [torch.tensor(4.0)] * 3, mode)
    else:
        lion_call(cpu, s, mode)
    for key in before:
        for a, b in zip(s[key], before[key], strict=True):
            assert torch.equal(a.view(torch.uint8), b.view(torch.uint8)), key


def test_found_inf_zero_and_missing_step_normally():
    s = make_state([1000], torch.float32, master=False, amsgrad=False, seed=4)
    before = s["params"][0].clone()
    adamw_call(cpu, s, [torch.tensor(1.0)], {"found_inf": 0.0})
    assert not torch.equal(s["params"][0], before)


def test_adamw_nan_grad_propagates_without_touching_others():
    s = make_state([4096], torch.float32, master=False, amsgrad=False, seed=5)
    s["grads"][0][17] = float("nan")
    s["grads"][0][1000] = float("inf")
    adamw_call(cpu, s, [torch.tensor(1.0)], {})
    p = s["params"][0]
    assert p[17].isnan() and s["exp_avgs"][0][17].isnan() and s["exp_avg_sqs"][0][17].isnan()
    assert p[1000].isnan()  # inf/inf in m / (sqrt(v)+eps)
    finite = torch.ones_like(p, dtype=torch.bool)
    finite[[17, 1000]] = False
    assert bool(p[finite].isfinite().all())


# ---- rounding -------------------------------------------------------------------------


def halfway_points(dtype: torch.dtype, n: int, seed: int) -> torch.Tensor:
    """fp32 values exactly halfway between two neighbouring `dtype` numbers."""
    gen = torch.Generator().manual_seed(seed)
    low = (torch.randn(n, generator=gen) * 100).to(dtype)
    bits = low.view(torch.int16)
    high = (bits + 1).view(dtype)  # the next number away from zero
    mid = (low.float() + high.float()) / 2  # exact in fp32
    keep = high.float().isfinite() & (low.float() != high.float())
    return mid[keep]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_master_rounds_to_nearest_even(dtype):
    specials = torch.tensor(
        [0.0, -0.0, float("inf"), float("-inf"), float("nan"), 1e-30, -1e-30, 3e-8, 6e-8, 65504.0,
         65519.0, 65520.0, 70000.0, -70000.0, 3.4e38, 1e-45, 5.96e-8, 2.98e-8, 1.0 + 2**-8,
         1.0 + 2**-11, 2.0**-14, 2.0**-15 + 2.0**-25, 2.0**-24, 2.0**-25, 2.0**-25 * 3],
        dtype=torch.float32,
    )  # fmt: skip
    gen = torch.Generator().manual_seed(9)
    masters = torch.cat([
        halfway_points(dtype, 20000, seed=8), specials,
        torch.randn(20000, generator=gen) * torch.logspace(-30, 30, 20000).float(),
        torch.randn(4000, generator=gen) * 2**-20,  # fp16 subnormal range
    ])  # fmt: skip
    n = masters.numel()
    params = [torch.zeros(n, dtype=dtype)]
    # lr = 0 and wd = 0: the update leaves the master as it is, so the param
    # written back is exactly the master rounded to the storage dtype.
    cpu.lion_(params, [torch.ones(n, dtype=dtype)], [torch.zeros(n)], [masters.clone()],
              lr=0.0, beta1=0.9, beta2=0.99, weight_decay=0.0, maximize=False,
              grad_scale=None, found_inf=None)  # fmt: skip
    expected = masters.to(dtype)
    got = params[0]
    nan = expected.isnan()
    assert bool(got[nan].isnan().all())
    assert torch.equal(got[~nan].view(torch.int16), expected[~nan].view(torch.int16))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_every_16bit_value_loads_and_stores_exactly(dtype):
    # All 65536 bit patterns as params, updated with lr = 0: load (16 -> 32 bit)
    # then store (32 -> 16 bit) must give every non-NaN value back bit for bit.
    values = torch.arange(-(2**15), 2**15, dtype=torch.int32).to(torch.int16).view(dtype)
    params = [values.clone()]
    n = values.numel()
    cpu.lion_(params, [torch.ones(n, dtype=dtype)], [torch.zeros(n, dtype=dtype)], [],
              lr=0.0, beta1=0.9, beta2=0.99, weight_decay=0.0, maximize=False,
              grad_scale=None, found_inf=None)  # fmt: skip
    nan = values.isnan()
    assert bool(params[0][nan].isnan().all())
    assert torch.equal(params[0][~nan].view(torch.int16), values[~nan].view(torch.int16))
    # And the fp32 value of each pattern, through the sum of squares.
    finite = values[values.isfinite()]
    got = torch.stack([cpu.grad_sumsq([finite[i : i + 1]]) for i in range(0, finite.numel(), 97)])
    want = finite[::97].double().square().float()
    assert torch.equal(got, want)


# ---- sum of squares ---------------------------------------------------------------------


def test_grad_sumsq_matches_float64():
    gen = torch.Generator().manual_seed(11)
    grads = [torch.randn(n, generator=gen) * s for n, s in
             [(0, 1.0), (1, 3.0), (1025, 1e-3), (65543, 10.0), ((1 << 20) + 7, 1.0)]]  # fmt: skip
    grads += [torch.randn(5000, generator=gen).bfloat16(), torch.randn(777, generator=gen).half(),
              torch.randn(300, generator=gen).double()]  # fmt: skip
    want = sum(g.double().square().sum() for g in grads)
    got = cpu.grad_sumsq(grads)
    assert got.dtype == torch.float32 and got.dim() == 0
    torch.testing.assert_close(got.double(), want, rtol=2**-24, atol=0)


def test_grad_sumsq_large_is_exact_and_thread_independent():
    # 3*10^7 ones: a float32 running sum stalls at 2^24; double accumulation is exact.
    n = 30_000_000
    grads = [torch.ones(n // 3), torch.ones(n // 3), torch.ones(n // 3)]
    assert cpu.grad_sumsq(grads).item() == float(n)
    gen = torch.Generator().manual_seed(12)
    grads = [torch.randn(3_000_001, generator=gen), torch.randn(12345, generator=gen)]
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = cpu.grad_sumsq(grads)
        torch.set_num_threads(2)
        two = cpu.grad_sumsq(grads)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(one, two)
    torch.testing.assert_close(one.double(), sum(g.double().square().sum() for g in grads),
                               rtol=2**-24, atol=0)  # fmt: skip


def test_grad_sumsq_non_finite():
    assert cpu.grad_sumsq([torch.tensor([1.0, float("inf")])]).isinf()
    assert cpu.grad_sumsq([torch.tensor([1.0]), torch.tensor([float("nan")])]).isnan()


# ---- registration and argument checks ----------------------------------------------------


def _opcheck_adamw_args(master: bool, amsgrad: bool):
    dtype = torch.bfloat16 if master else torch.float32
    s = make_state([7, 130], dtype, master=master, amsgrad=amsgrad, seed=13)
    return (
        s["params"], s["grads"], s["exp_avgs"], s["exp_avg_sqs"], s["max_exp_avg_sqs"],
        s["master_params"], [torch.tensor(2.0), torch.tensor(3.0)], 1e-3, torch.tensor(1e-3),
        BETA1, BETA2, EPS, 0.1, amsgrad, False, torch.tensor(0.5), torch.tensor(0.0),
    )  # fmt: skip


@pytest.mark.parametrize("master,amsgrad", [(False, False), (False, True), (True, False)])
def test_opcheck_adamw(master, amsgrad):
    torch.library.opcheck(torch.ops.fastopt.adamw_.default, _opcheck_adamw_args(master, amsgrad))


@pytest.mark.parametrize("master", [False, True])
def test_opcheck_lion(master):
    dtype = torch.float16 if master else torch.float32
    s = make_state([7, 130], dtype, master=master, amsgrad=False, seed=14, lion=True)
    args = (s["params"], s["grads"], s["exp_avgs"], s["master_params"], 1e-3, None,
            0.9, 0.99, 0.1, True, None, None)  # fmt: skip
    torch.library.opcheck(torch.ops.fastopt.lion_.default, args)


def test_opcheck_grad_sumsq():
    grads = [torch.randn(7), torch.randn(1000).bfloat16()]
    torch.library.opcheck(torch.ops.fastopt.grad_sumsq.default, (grads,))


def test_argument_errors_name_the_problem():
    s = make_state([10, 20], torch.float32, master=False, amsgrad=False, seed=15)
    steps = [torch.tensor(1.0)] * 2
    with pytest.raises(RuntimeError, match="exp_avgs has 1 tensors"):
        s2 = clone_state(s)
        s2["exp_avgs"] = s2["exp_avgs"][:1]
        adamw_call(cpu, s2, steps, {})
    with pytest.raises(RuntimeError, match=r"grads\[1\] has dtype"):
        s2 = clone_state(s)
        s2["grads"][1] = s2["grads"][1].double()
        adamw_call(cpu, s2, steps, {})
    with pytest.raises(RuntimeError, match=r"exp_avg_sqs\[0\] has 9 elements"):
        s2 = clone_state(s)
        s2["exp_avg_sqs"][0] = s2["exp_avg_sqs"][0][:9].clone()
        adamw_call(cpu, s2, steps, {})
    with pytest.raises(RuntimeError, match=r"params\[0\] is not contiguous"):
        s2 = clone_state(s)
        s2["params"][0] = torch.randn(20)[::2]
        adamw_call(cpu, s2, steps, {})
    with pytest.raises(RuntimeError, match="master_params given for float32 params"):
        s2 = clone_state(s)
        s2["master_params"] = [p.clone() for p in s2["params"]]
        adamw_call(cpu, s2, steps, {})


def test_float64_params_fall_back_to_reference():
    s = make_state([100], torch.float64, master=False, amsgrad=False, seed=16)
    want = clone_state(s)
    adamw_call(cpu, s, [torch.tensor(1.0)], {})
    adamw_call(reference, want, [torch.tensor(1.0)], {})
    assert torch.equal(s["params"][0], want["params"][0])


# ---- memory ----------------------------------------------------------------------------------


def _vm_hwm_kib() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    raise RuntimeError("no VmHWM in /proc/self/status")


@pytest.mark.slow
def test_step_allocates_nothing_proportional_to_the_model():
    n = 64 * 1024 * 1024  # 256 MiB per fp32 tensor
    sizes = [n // 64] * 64
    s = make_state([0], torch.float32, master=False, amsgrad=False, seed=17)
    s = {k: [] for k in s}
    for size in sizes:
        s["params"].append(torch.randn(size))
        s["grads"].append(torch.randn(size))
        s["exp_avgs"].append(torch.zeros(size))
        s["exp_avg_sqs"].append(torch.zeros(size))
    steps = [torch.tensor(1.0)] * len(sizes)
    adamw_call(cpu, s, steps, {})  # first touch and one-time initialisation
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # resets VmHWM to the current resident size
    except OSError as exc:
        pytest.skip(f"cannot reset the peak-RSS counter here: {exc}")
    base = _vm_hwm_kib()
    for step in (2.0, 3.0):
        adamw_call(cpu, s, [torch.tensor(step)] * len(sizes), {"grad_scale": 0.5})
        cpu.grad_sumsq(s["grads"])
    growth_mib = (_vm_hwm_kib() - base) / 1024
    model_mib = n * 4 / 2**20
    assert growth_mib < 8, (
        f"peak RSS grew {growth_mib:.1f} MiB during a step of a {model_mib:.0f} MiB model"
    )
    assert math.isfinite(s["params"][0][0].item())


def test_opcheck_steps_add():
    steps = [torch.tensor(float(i), dtype=torch.float32) for i in range(5)]
    torch.library.opcheck(torch.ops.fastopt.steps_add_.default, (steps, 1.0))


def test_steps_add_increments_each_counter():
    steps = [torch.tensor(float(i), dtype=torch.float32) for i in range(300)]
    torch.ops.fastopt.steps_add_(steps, 1.0)
    assert [float(s) for s in steps] == [float(i + 1) for i in range(300)]
    with pytest.raises(RuntimeError, match=r"steps\[1\] must be a float32 CPU scalar"):
        torch.ops.fastopt.steps_add_([torch.tensor(0.0), torch.tensor(0.0, dtype=torch.float64)], 1.0)
