"""The CPU kernels' own properties: op registration, rounding, NaN, errors, memory, SIMD.

Whether each kernel computes what the reference computes is the shared case
table's job (tests/test_kernels.py, every backend through fastopt.functional);
this file checks what only the compiled CPU ops have: the torch.library
registration of every op (opcheck), the storage conversions (round to nearest
even, every 16-bit pattern), NaN and infinity handling, argument errors that
name the list and index and leave everything unwritten, the one-policy rules
(maximize is a sign, fp32 gradients of 16-bit params), the deterministic sum of
squares, a step's peak memory, and that the built kernels are vectorized.
"""

from __future__ import annotations

import math
import platform
import re
import shutil
import subprocess

import pytest
import torch

from fastopt.backends import compiled

# The cpu backend is part of every install (the build needs only a C++ compiler):
# a missing one is a failure here, not a reason to skip.
assert compiled.unavailable("cpu") is None, compiled.unavailable("cpu")
OPS = compiled.functions()
DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def _name(dtype: torch.dtype) -> str:
    return str(dtype).split(".")[-1]


# ---- argument builders -----------------------------------------------------------


def make_lists(op, sizes, dtype, *, master=False, amsgrad=False, grad_dtype=None, seed=0):
    """Random lists of an update op's tensors (moments fp32 under master weights)."""
    gen = torch.Generator().manual_seed(seed)
    state = torch.float32 if master else dtype

    def rand(n, dt, scale=1.0, square=False):
        x = torch.randn(n, generator=gen) * scale
        return (x.square() if square else x).to(dt)

    params = [rand(n, dtype) for n in sizes]
    d = {
        "params": params,
        "grads": [rand(n, grad_dtype or dtype) for n in sizes],
        "exp_avgs": [rand(n, state, 0.1) for n in sizes],
    }
    if op == "adamw":
        d["exp_avg_sqs"] = [rand(n, state, 0.1, square=True) for n in sizes]
        d["max_exp_avg_sqs"] = [rand(n, state, 0.2, square=True) for n in sizes] if amsgrad else []
    if op == "ademamix":
        d["exp_avgs_slow"] = [rand(n, state, 0.1) for n in sizes]
        d["exp_avg_sqs"] = [rand(n, state, 0.1, square=True) for n in sizes]
    d["master_params"] = [p.float() for p in params] if master else []
    if op != "lion":
        d["state_steps"] = [torch.tensor(float(1 + i % 3)) for i in range(len(sizes))]
    return d


ORDER = {
    "adamw": ("params", "grads", "exp_avgs", "exp_avg_sqs", "max_exp_avg_sqs", "master_params",
              "state_steps"),
    "lion": ("params", "grads", "exp_avgs", "master_params"),
    "ademamix": ("params", "grads", "exp_avgs", "exp_avgs_slow", "exp_avg_sqs", "master_params",
                 "state_steps"),
}  # fmt: skip


def scalars(op, *, amsgrad=False, **overrides):
    """Keyword arguments of an update op (everything after ``*`` in its schema)."""
    kw = dict(lr=1e-2, lr_tensor=None, maximize=False, grad_mul=None, max_grad_value=None,
              clip_coef=None, skip=None)  # fmt: skip
    if op == "adamw":
        kw.update(beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.1, amsgrad=amsgrad)
    elif op == "lion":
        kw.update(beta1=0.9, beta2=0.99, weight_decay=0.1)
    else:
        kw.update(beta1=0.9, beta2=0.999, beta3=0.9999, alpha=5.0, t_alpha=100.0,
                  t_beta3=100.0, eps=1e-8, weight_decay=0.1)  # fmt: skip
    kw.update(overrides)
    return kw


def call(op, lists, **kw):
    getattr(OPS, f"{op}_")(*(lists[k] for k in ORDER[op]), **kw)


def clone(lists):
    return {k: [t.clone() for t in v] for k, v in lists.items()}


def assert_bitwise_equal(a, b, what=""):
    for key in a:
        for i, (x, y) in enumerate(zip(a[key], b[key], strict=True)):
            assert x.dtype == y.dtype, (what, key, i)
            assert torch.equal(
                x.contiguous().view(-1).view(torch.uint8), y.contiguous().view(-1).view(torch.uint8)
            ), f"{what} {key}[{i}] differs"


UPDATE_OPS = ("adamw", "lion", "ademamix")


# ---- registration: torch.library.opcheck for every op ------------------------------------


@pytest.mark.parametrize("op", UPDATE_OPS)
@pytest.mark.parametrize(
    "dtype,grad_dtype,master",
    [
        (torch.float32, None, False),
        (torch.bfloat16, None, True),
        (torch.float16, torch.float32, False),
        (torch.bfloat16, torch.float32, True),
    ],
    ids=["fp32", "bf16-master", "fp16-fp32grad", "bf16-fp32grad-master"],
)
def test_opcheck_update_ops(op, dtype, grad_dtype, master):
    lists = make_lists(op, [7, 130], dtype, master=master, amsgrad=op == "adamw",
                       grad_dtype=grad_dtype, seed=13)  # fmt: skip
    kw = scalars(op, amsgrad=op == "adamw", lr_tensor=torch.tensor(1e-3), maximize=True,
                 grad_mul=torch.tensor(0.5), max_grad_value=0.8, clip_coef=torch.tensor(0.9),
                 skip=torch.tensor(0.0))  # fmt: skip
    args = tuple(lists[k] for k in ORDER[op])
    torch.library.opcheck(getattr(torch.ops.fastopt, f"{op}_").default, args, kw)


def test_opcheck_grad_sumsq():
    grads = [torch.randn(7), torch.randn(1000).bfloat16(), torch.randn(33).double()]
    op = torch.ops.fastopt.grad_sumsq.default
    torch.library.opcheck(op, (grads,))
    torch.library.opcheck(op, (grads,), {"grad_mul": torch.tensor(0.5), "max_grad_value": 0.1})


def test_opcheck_steps_add():
    steps = [torch.tensor(float(i), dtype=torch.float32) for i in range(5)]
    torch.library.opcheck(torch.ops.fastopt.steps_add_.default, (steps, 1.0))


# ---- storage conversions ------------------------------------------------------------------


def halfway_points(dtype: torch.dtype, n: int, seed: int) -> torch.Tensor:
    """fp32 values exactly halfway between two neighbouring `dtype` numbers."""
    gen = torch.Generator().manual_seed(seed)
    low = (torch.randn(n, generator=gen) * 100).to(dtype)
    bits = low.view(torch.int16)
    high = (bits + 1).view(dtype)  # the next number away from zero
    mid = (low.float() + high.float()) / 2  # exact in fp32
    keep = high.float().isfinite() & (low.float() != high.float())
    return mid[keep]


def lion_identity_(params, grads, exp_avgs, master_params):
    """A Lion step with lr = 0 and wd = 0: the weight stays as it is, so the
    param written is the weight (master or param) loaded and stored again."""
    OPS.lion_(params, grads, exp_avgs, master_params,
              **scalars("lion", lr=0.0, weight_decay=0.0))  # fmt: skip


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
    lion_identity_(params, [torch.ones(n, dtype=dtype)], [torch.zeros(n)], [masters.clone()])
    expected = masters.to(dtype)  # torch's own conversion: round to nearest even
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
    lion_identity_(params, [torch.ones(n, dtype=dtype)], [torch.zeros(n, dtype=dtype)], [])
    nan = values.isnan()
    assert bool(params[0][nan].isnan().all())
    assert torch.equal(params[0][~nan].view(torch.int16), values[~nan].view(torch.int16))
    # And the fp32 value of each pattern, through the sum of squares.
    finite = values[values.isfinite()]
    got = torch.stack([OPS.grad_sumsq([finite[i : i + 1]]) for i in range(0, finite.numel(), 97)])
    want = finite[::97].double().square().float()
    assert torch.equal(got, want)


# ---- one policy per flag --------------------------------------------------------------------


@pytest.mark.parametrize("op", UPDATE_OPS)
@pytest.mark.parametrize("dtype", DTYPES, ids=_name)
def test_maximize_is_a_sign_on_the_gradient(op, dtype):
    """NOTE [gradient transform]: maximize with g is bit for bit the step with -g,
    with value clipping and both multipliers in play."""
    lists = make_lists(op, [5, 1000, 33000], dtype, master=dtype != torch.float32, seed=1)
    neg = clone(lists)
    for g in neg["grads"]:
        g.neg_()
    kw = dict(grad_mul=torch.tensor(0.75), max_grad_value=0.9, clip_coef=torch.tensor(0.5))
    call(op, lists, **scalars(op, maximize=True, **kw))
    call(op, neg, **scalars(op, maximize=False, **kw))
    del lists["grads"], neg["grads"]
    assert_bitwise_equal(lists, neg, op)


@pytest.mark.parametrize("op", UPDATE_OPS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("master", [False, True])
def test_fp32_grads_of_16bit_params(op, dtype, master):
    """Tensor.grad_dtype: fp32 grads of bf16/fp16 params are read as they are. On
    values the 16-bit dtype holds exactly, the step equals the 16-bit-grad step."""
    lists = make_lists(op, [3, 4099, 70001], dtype, master=master, seed=2)
    mixed = clone(lists)
    mixed["grads"] = [g.float() for g in lists["grads"]]
    call(op, lists, **scalars(op, grad_mul=torch.tensor(0.5)))
    call(op, mixed, **scalars(op, grad_mul=torch.tensor(0.5)))
    del lists["grads"], mixed["grads"]
    assert_bitwise_equal(lists, mixed, op)


@pytest.mark.parametrize("op", UPDATE_OPS)
def test_value_clipping_off_and_unreachable_bound_agree(op):
    """max_grad_value=None is the runtime clamp at +inf: a bound above every |g| is the same step."""
    lists = make_lists(op, [100, 5000], torch.float32, seed=3)
    bounded = clone(lists)
    call(op, lists, **scalars(op))
    call(op, bounded, **scalars(op, max_grad_value=1e30))
    assert_bitwise_equal(lists, bounded, op)


# ---- skip, NaN and infinities -----------------------------------------------------------------


@pytest.mark.parametrize("op", UPDATE_OPS)
@pytest.mark.parametrize("dtype", DTYPES, ids=_name)
def test_skip_leaves_everything_bitwise_unchanged(op, dtype):
    master = dtype != torch.float32
    lists = make_lists(op, [5, 70000, 1025], dtype, master=master, amsgrad=True, seed=3)
    before = clone(lists)
    call(op, lists, **scalars(op, amsgrad=True, grad_mul=torch.tensor(0.5), skip=torch.tensor(1.0)))
    assert_bitwise_equal(lists, before, op)


def test_skip_zero_steps_normally():
    lists = make_lists("adamw", [1000], torch.float32, seed=4)
    before = lists["params"][0].clone()
    call("adamw", lists, **scalars("adamw", skip=torch.tensor(0.0)))
    assert not torch.equal(lists["params"][0], before)


@pytest.mark.parametrize("op", UPDATE_OPS)
@pytest.mark.parametrize("clamp", [None, 0.5], ids=["no-clamp", "clamp"])
def test_nan_grad_propagates_without_touching_others(op, clamp):
    """A NaN gradient element makes its own parameter NaN (the clamp passes NaN,
    like torch.clamp) and no other; an infinite one is clamped when clipping is on."""
    lists = make_lists(op, [4096], torch.float32, seed=5)
    g = lists["grads"][0]
    g[17] = float("nan")
    g[1000] = float("inf")
    call(op, lists, **scalars(op, max_grad_value=clamp))
    p = lists["params"][0]
    assert p[17].isnan() and lists["exp_avgs"][0][17].isnan()
    others = torch.ones_like(p, dtype=torch.bool)
    others[17] = False
    if clamp is None:
        others[1000] = False  # adamw/ademamix: inf/inf is NaN; lion: sign(inf) is finite
    else:
        assert lists["exp_avgs"][0][1000].isfinite()
    assert bool(p[others].isfinite().all())


def test_grad_sumsq_clamp_handles_non_finite():
    assert OPS.grad_sumsq([torch.tensor([1.0, float("inf")])]).isinf()
    assert OPS.grad_sumsq([torch.tensor([1.0]), torch.tensor([float("nan")])]).isnan()
    # The clamp bounds infinities and passes NaN; grad_mul multiplies before it.
    x = torch.tensor([float("inf"), -3.0, 0.25])
    assert OPS.grad_sumsq([x], max_grad_value=1.0).item() == 1.0 + 1.0 + 0.0625
    assert OPS.grad_sumsq([x], grad_mul=torch.tensor(2.0), max_grad_value=1.0).item() == 2.25
    assert OPS.grad_sumsq([torch.tensor([float("nan")])], max_grad_value=1.0).isnan()


# ---- sum of squares in double, deterministic ---------------------------------------------------


def test_grad_sumsq_accumulates_in_double():
    gen = torch.Generator().manual_seed(11)
    grads = [torch.randn(n, generator=gen) * s for n, s in
             [(0, 1.0), (1, 3.0), (1025, 1e-3), (65543, 10.0), ((1 << 20) + 7, 1.0)]]  # fmt: skip
    grads += [torch.randn(5000, generator=gen).bfloat16(), torch.randn(777, generator=gen).half(),
              torch.randn(300, generator=gen).double()]  # fmt: skip
    want = sum(g.double().square().sum() for g in grads)
    got = OPS.grad_sumsq(grads)
    assert got.dtype == torch.float32 and got.dim() == 0
    # One rounding of the double sum to float: within half an fp32 ulp.
    torch.testing.assert_close(got.double(), want, rtol=2**-24, atol=0)


def test_grad_sumsq_large_is_exact_and_thread_independent():
    # 3*10^7 ones: a float32 running sum stalls at 2^24; double accumulation is exact.
    n = 30_000_000
    grads = [torch.ones(n // 3), torch.ones(n // 3), torch.ones(n // 3)]
    assert OPS.grad_sumsq(grads).item() == float(n)
    gen = torch.Generator().manual_seed(12)
    grads = [torch.randn(3_000_001, generator=gen), torch.randn(12345, generator=gen)]
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = OPS.grad_sumsq(grads, grad_mul=torch.tensor(0.3), max_grad_value=1.5)
        torch.set_num_threads(2)
        two = OPS.grad_sumsq(grads, grad_mul=torch.tensor(0.3), max_grad_value=1.5)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(one, two)  # NOTE [multi-tensor chunking]: chunk order, not thread order


# ---- argument errors: named, and nothing written ------------------------------------------------


def _bad(lists, key, i, fn):
    lists = clone(lists)
    lists[key][i] = fn(lists[key][i])
    return lists


# (op, how to break the call, expected message): each breaks the LAST tensor
# of a list, so a kernel that wrote before checking would have written the
# first ones.
ERRORS = [
    ("adamw", lambda d: {**d, "exp_avgs": d["exp_avgs"][:1]}, {},
     r"fastopt::adamw_: exp_avgs has 1 tensors but params has 2"),
    ("adamw", lambda d: _bad(d, "grads", 1, lambda t: t.double()), {},
     r"grads\[1\] has dtype Double, expected Float"),
    ("adamw", lambda d: _bad(d, "exp_avg_sqs", 1, lambda t: t[:9].clone()), {},
     r"exp_avg_sqs\[1\] has 9 elements but params\[1\] has 20"),
    ("adamw", lambda d: _bad(d, "params", 1, lambda t: torch.randn(40)[::2]), {},
     r"params\[1\] is not contiguous"),
    ("adamw", lambda d: {**d, "master_params": [p.clone() for p in d["params"]]}, {},
     r"master_params given for float32 params"),
    ("adamw", lambda d: _bad(d, "state_steps", 1, lambda t: t.double()), {},
     r"state_steps\[1\] must be a float32 tensor of one element"),
    ("adamw", lambda d: d, {"amsgrad": True},
     r"max_exp_avg_sqs has 0 tensors but params has 2"),
    ("adamw", lambda d: d, {"grad_mul": torch.tensor(0.5, dtype=torch.float64)},
     r"grad_mul must be a float32 tensor of one element"),
    ("adamw", lambda d: d, {"max_grad_value": -1.0}, r"max_grad_value must be non-negative"),
    ("lion", lambda d: _bad(d, "exp_avgs", 1, lambda t: t.half()), {},
     r"fastopt::lion_: exp_avgs\[1\] has dtype Half, expected Float"),
    ("lion", lambda d: d, {"skip": torch.zeros(2)}, r"skip must be a float32 tensor of one element"),
    ("ademamix", lambda d: _bad(d, "exp_avgs_slow", 1, lambda t: t[:3].clone()), {},
     r"fastopt::ademamix_: exp_avgs_slow\[1\] has 3 elements"),
    ("ademamix", lambda d: d, {"t_alpha": 0.0}, r"t_alpha must be positive or None"),
    ("ademamix", lambda d: {**d, "state_steps": d["state_steps"][:1]}, {},
     r"state_steps has 1 tensors but params has 2"),
]  # fmt: skip


@pytest.mark.parametrize("op,breaker,kw,message", ERRORS, ids=lambda x: None)
def test_argument_errors_name_the_problem_and_write_nothing(op, breaker, kw, message):
    lists = breaker(make_lists(op, [10, 20], torch.float32, seed=15))
    before = clone(lists)
    with pytest.raises(RuntimeError, match=message):
        call(op, lists, **scalars(op, **kw))
    assert_bitwise_equal(lists, before, op)


def test_16bit_errors_name_the_problem():
    lists = make_lists("adamw", [10, 20], torch.bfloat16, seed=16)
    lists["grads"] = [lists["grads"][0].half(), lists["grads"][1].half()]
    with pytest.raises(
        RuntimeError,
        match=r"grads\[0\] has dtype Half; grads must have the "
        r"params' dtype \(BFloat16\) or, for bfloat16/float16 params, float32",
    ):
        call("adamw", lists, **scalars("adamw"))
    lists = make_lists("lion", [10, 20], torch.bfloat16, seed=16)
    lists["grads"][1] = lists["grads"][1].float()  # one grad dtype per call
    with pytest.raises(RuntimeError, match=r"grads\[1\] has dtype Float, expected BFloat16"):
        call("lion", lists, **scalars("lion"))


@pytest.mark.parametrize("op", UPDATE_OPS)
def test_float64_never_reaches_the_kernels(op):
    """fastopt.backends.resolve sends float64 to the reference; called directly,
    the op says so instead of computing it in fp32."""
    lists = make_lists(op, [100], torch.float64, seed=16)
    before = clone(lists)
    with pytest.raises(
        RuntimeError,
        match=r"params\[0\] has dtype Double; the compiled kernels "
        r"take float32, bfloat16 and float16 params \(float64 runs on the "
        r"reference backend\)",
    ):
        call(op, lists, **scalars(op))
    assert_bitwise_equal(lists, before, op)


def test_empty_lists_do_nothing():
    # With no tensor at all the dispatcher has no device to pick (the Python
    # layer never makes such a call); with a cpu scalar it reaches the cpu op.
    for op in UPDATE_OPS:
        call(op, {k: [] for k in ORDER[op]}, **scalars(op, lr_tensor=torch.tensor(1.0)))
    assert OPS.grad_sumsq([], grad_mul=torch.tensor(2.0)).item() == 0.0


def test_steps_add_increments_each_counter():
    steps = [torch.tensor(float(i), dtype=torch.float32) for i in range(300)]
    torch.ops.fastopt.steps_add_(steps, 1.0)
    assert [float(s) for s in steps] == [float(i + 1) for i in range(300)]
    with pytest.raises(RuntimeError, match=r"steps\[1\] must be a float32 CPU scalar"):
        torch.ops.fastopt.steps_add_(
            [torch.tensor(0.0), torch.tensor(0.0, dtype=torch.float64)], 1.0
        )


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
    lists = {
        "params": [torch.randn(s) for s in sizes],
        "grads": [torch.randn(s) for s in sizes],
        "exp_avgs": [torch.zeros(s) for s in sizes],
        "exp_avg_sqs": [torch.zeros(s) for s in sizes],
        "max_exp_avg_sqs": [],
        "master_params": [],
        "state_steps": [torch.tensor(1.0) for _ in sizes],
    }
    call("adamw", lists, **scalars("adamw"))  # first touch and one-time initialisation
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # resets VmHWM to the current resident size
    except OSError as exc:
        pytest.skip(f"cannot reset the peak-RSS counter here: {exc}")
    base = _vm_hwm_kib()
    for step in (2.0, 3.0):
        lists["state_steps"] = [torch.tensor(step) for _ in sizes]
        call("adamw", lists, **scalars("adamw", grad_mul=torch.tensor(0.5), max_grad_value=1.0,
                                       clip_coef=torch.tensor(0.5)))  # fmt: skip
        OPS.grad_sumsq(lists["grads"], grad_mul=torch.tensor(0.5), max_grad_value=1.0)
    growth_mib = (_vm_hwm_kib() - base) / 1024
    model_mib = n * 4 / 2**20
    assert growth_mib < 8, (
        f"peak RSS grew {growth_mib:.1f} MiB during a step of a {model_mib:.0f} MiB model"
    )
    assert math.isfinite(lists["params"][0][0].item())


# ---- the built kernels are vectorized ------------------------------------------------------------


def _kernel_disassembly():
    """{demangled kernel clone name: its instructions} from the built fastopt._C."""
    objdump = shutil.which("objdump")
    if objdump is None or platform.machine() != "x86_64":
        pytest.skip("needs objdump on x86-64")
    import fastopt._C

    text = subprocess.run([objdump, "-d", "-C", "--no-show-raw-insn", fastopt._C.__file__],
                          capture_output=True, text=True, check=True).stdout  # fmt: skip
    out = {}
    for block in re.split(r"\n(?=[0-9a-f]+ <)", text):
        head, _, body = block.partition("\n")
        m = re.match(
            r"[0-9a-f]+ <((?:void )?fastopt::cpu::\w+_kernel.*\[clone \.arch_x86_64_v[34]\])>:",
            head,
        )
        if m:
            out[m.group(1)] = body
    return out


def test_cpu_kernel_clones_vectorize_without_calls():
    """NOTE [CPU SIMD through function multiversioning]: the x86-64-v4 clone of the
    fp32 AdamW loop (value clipping's clamp included) runs in zmm registers, and no
    v3/v4 clone of any kernel calls a function (fmaf, a conversion) inside its loops."""
    clones = _kernel_disassembly()
    names = " ".join(clones)
    for kernel in ("adamw_kernel", "lion_kernel", "ademamix_kernel", "grad_sumsq_kernel"):
        assert f"{kernel}" in names, kernel
    # Instantiations per update kernel (ops_cpu.cpp's pick_kernel): fp32 params with
    # fp32 or bf16 moments (2); bf16 params x 2 grad dtypes x 2 moment dtypes x
    # {none, fp32 master, remainder} (12); fp16 params x 2 grads x 3 moment dtypes x
    # {none, fp32 master} (12); 8-bit moments (NOTE [int8 moments]) for each
    # (params, grads, master): 1 + 6 + 4. AdamW twice that (amsgrad); one grad_sumsq.
    per_kernel = 2 + 12 + 12 + 11
    assert len(clones) == 2 * (2 * per_kernel + per_kernel + per_kernel + 1), sorted(clones)
    fp32 = [b for n, b in clones.items()
            if n.startswith("void fastopt::cpu::adamw_kernel<float, float, float, "
                            "(fastopt::Master)0, false>")
            and n.endswith("v4]")]  # fmt: skip
    assert len(fp32) == 1
    assert re.search(r"\bv\w+ps\b.*%zmm", fp32[0]), "fp32 AdamW is not vectorized in zmm"
    assert re.search(r"vfmadd\w+ps.*%zmm", fp32[0]), "the lerp's fma is not a vector fma"
    calls = {n: re.findall(r"\bcall\s+\S+\s+<([^>]+)>", b) for n, b in clones.items()}
    assert not {n: c for n, c in calls.items() if c}, "kernel clones calling functions"
