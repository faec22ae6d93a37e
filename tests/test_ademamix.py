"""AdEMAMix against the paper's algorithm, written out here in float64.

Pagliardini, Ablin, Grangier, "The AdEMAMix Optimizer: Better, Faster, Older"
(arXiv 2409.03137), Algorithm 1 with the warm-up schedulers of its section 3.
``paper_step`` below is an independent transcription (it does not use
fastopt's reference backend): every test runs an optimizer in lock-step with
it for 50 steps: before each step the float64 algorithm takes the optimizer's
own state (weights or masters, m1, m2, v, t), both take the step on the same
gradients, and the optimizer's new state must be the exact result within the
forward-error bound of NOTE [paper tolerance]. Lock-step, not free-running,
because a bf16 weight that does not move by less than half an ulp is correct
and still drifts from an exact trajectory.
"""

from __future__ import annotations

import copy
import io
import math

import pytest
import torch

import fastopt

F32, BF16, F16, F64 = torch.float32, torch.bfloat16, torch.float16, torch.float64
STEPS = 50
SHAPES = [(8, 9), (1025,), (3,)]
HYPER = dict(lr=1e-2, betas=(0.9, 0.999, 0.9999), alpha=5.0, eps=1e-8, weight_decay=0.1)

# ---- the paper, in float64 -------------------------------------------------------------------


def alpha_schedule(t: float, alpha: float, t_alpha: int | None) -> float:
    """alpha(t) = min(t * alpha / T_alpha, alpha): linear warm-up of the mixing weight."""
    return alpha if t_alpha is None else min(t * alpha / t_alpha, alpha)


def beta3_schedule(t: float, beta1: float, beta3: float, t_beta3: int | None) -> float:
    """beta3(t) = min(exp(ln b1 ln b3 / ((1 - t/T) ln b3 + (t/T) ln b1)), b3): the slow EMA's
    half-life grows linearly from beta1's (t = 0) to beta3's (t = T_beta3), then stays."""
    if t_beta3 is None:
        return beta3
    f = t / t_beta3
    lb1, lb3 = math.log(beta1), math.log(beta3)
    return min(math.exp(lb1 * lb3 / ((1 - f) * lb3 + f * lb1)), beta3)


def paper_step(w, g, m1, m2, v, t, *, lr, betas, alpha, t_alpha, t_beta3, eps, weight_decay):
    """One step of Algorithm 1 on float64 tensors; t is the new step count (>= 1).

    Returns the new (w, m1, m2, v) and, for each, the sum of the magnitudes of
    the terms it is made of (the scale of NOTE [paper tolerance])."""
    b1, b2, b3 = betas
    a_t, b3_t = alpha_schedule(t, alpha, t_alpha), beta3_schedule(t, b1, b3, t_beta3)
    m1_new = b1 * m1 + (1 - b1) * g
    m2_new = b3_t * m2 + (1 - b3_t) * g
    v_new = b2 * v + (1 - b2) * g * g
    m1_hat = m1_new / (1 - b1**t)
    v_hat = v_new / (1 - b2**t)
    denom = v_hat.sqrt() + eps
    w_new = w - lr * ((m1_hat + a_t * m2_new) / denom + weight_decay * w)
    s_m1 = b1 * m1.abs() + (1 - b1) * g.abs()
    s_m2 = b3_t * m2.abs() + (1 - b3_t) * g.abs()
    s_v = b2 * v.abs() + (1 - b2) * g * g
    s_w = w.abs() + lr * ((s_m1 / (1 - b1**t) + a_t * s_m2) / denom + weight_decay * w.abs())
    return (w_new, m1_new, m2_new, v_new), (s_w, s_m1, s_m2, s_v)


def paper_clip(grads64, *, grad_mul=1.0, max_grad_value=None, max_grad_norm=None, maximize=False):
    """SPEC §3's order: unscale, clamp by value, the global norm of the clamped
    gradients, times min(1, max_norm / (N + 1e-6)); then the sign for maximize."""
    gs = [g * grad_mul for g in grads64]
    if max_grad_value is not None:
        gs = [g.clamp(-max_grad_value, max_grad_value) for g in gs]
    if max_grad_norm is not None:
        norm = math.sqrt(sum(float(g.square().sum()) for g in gs))
        coef = min(1.0, max_grad_norm / (norm + 1e-6))
        gs = [g * coef for g in gs]
    return [-g if maximize else g for g in gs]


# ---- NOTE [paper tolerance] ------------------------------------------------------------------
#
# The optimizer computes each new value in fp32 from the same inputs as the
# float64 step, then stores it. A value computed as an expression of K fp32
# roundings has a forward error of at most about K*u32 times the sum of the
# magnitudes of its terms (Higham, "Accuracy and Stability of Numerical
# Algorithms", §3), whatever cancellation happens; its store adds at most
# u_storage * |value| (half an ulp; half the smallest subnormal below the
# normal range). K counts the longest chain, the weight's: the gradient
# transform (unscale, clip coefficient from an fp32 norm: 3), the moment (2),
# the bias corrections and schedules rounded to fp32 (2), sqrt, two divisions,
# + eps, the mix, the decay term, the product with lr and the final add (8):
# K = 16. A moment's error reaches the weight through the update's gain, which
# is why the weight's scale sums the update evaluated on the moments' scales.
K_ROUNDINGS = 16
U32 = 2.0**-24
UNIT_ROUNDOFF = {F32: 2.0**-24, BF16: 2.0**-8, F16: 2.0**-11}


def assert_paper_close(got: torch.Tensor, exact: torch.Tensor, terms: torch.Tensor, what: str):
    info = torch.finfo(got.dtype)
    g = got.detach().double()
    tol = (K_ROUNDINGS * U32 * terms + UNIT_ROUNDOFF[got.dtype] * exact.abs()
           + info.smallest_normal * info.eps / 2)  # fmt: skip
    ok = ((g - exact).abs() <= tol) | (g.isnan() & exact.isnan())
    if not bool(ok.all()):
        i = int(((g - exact).abs() / tol).nan_to_num(float("inf")).argmax())
        raise AssertionError(
            f"{what}: {int((~ok).sum())} of {g.numel()} elements off the paper's algorithm; "
            f"worst at {i}: got {g.view(-1)[i].item()!r}, exact {exact.view(-1)[i].item()!r}, "
            f"tolerance {tol.view(-1)[i].item():.3g} (terms {terms.view(-1)[i].item():.3g})"
        )


def assert_param_is_rne_of_master(p: torch.Tensor, master: torch.Tensor, what: str):
    want = master.to(p.dtype)
    nan = want.isnan()
    assert torch.equal(p.detach()[~nan].view(torch.int16), want[~nan].view(torch.int16)), (
        f"{what}: param != RNE(master)"
    )


# ---- the cases -------------------------------------------------------------------------------

# name -> (param dtype, master weights)
MODES = {
    "fp32": (F32, False),
    "bf16": (BF16, False),
    "fp16": (F16, False),
    "bf16-master": (BF16, True),
    "fp16-master": (F16, True),
}
# Both warm-ups are active in every variant: ending inside the 50 steps (so the
# caps min(., alpha) and min(., beta3) are reached and held), or beyond them.
VARIANTS = {
    "warmups-end-inside": dict(t_alpha=20, t_beta3=30, max_grad_norm=1.0, max_grad_value=0.5),
    "warmups-beyond-50": dict(t_alpha=80, t_beta3=120, max_grad_value=0.5, maximize=True),
    "no-warmup": dict(t_alpha=None, t_beta3=None, max_grad_norm=1.0),
}


def _lockstep_cases():
    out = []
    for mode in MODES:
        for variant in VARIANTS:
            if variant == "no-warmup" and mode not in ("fp32", "bf16-master"):
                continue
            out.append(pytest.param(mode, variant, id=f"{mode}-{variant}"))
    return out


def _grads(step: int, shapes, dtype, scale=0.3):
    gen = torch.Generator().manual_seed(100 + step)
    return [(torch.randn(s, generator=gen) * scale).to(dtype) for s in shapes]


def _params(dtype, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(s, generator=gen).to(dtype).requires_grad_() for s in SHAPES]


def _state64(opt, p):
    """The optimizer's state of p as float64 (zeros before the first step)."""
    st = opt.state[p]
    if not st:
        z = torch.zeros(p.shape, dtype=F64)
        return p.detach().double(), z, z.clone(), z.clone(), 0.0
    w = st["master_param"] if "master_param" in st else p.detach()
    return (w.double(), st["exp_avg"].double(), st["exp_avg_slow"].double(),
            st["exp_avg_sq"].double(), float(st["step"]))  # fmt: skip


@pytest.mark.parametrize("mode,variant", _lockstep_cases())
def test_optimizer_lockstep_with_the_paper(backend, mode, variant):
    dtype, master = MODES[mode]
    v = VARIANTS[variant]
    params = _params(dtype)
    opt = fastopt.AdEMAMix(params, **HYPER, t_alpha=v["t_alpha"], t_beta3=v["t_beta3"],
                           maximize=v.get("maximize", False),
                           max_grad_norm=v.get("max_grad_norm"),
                           max_grad_value=v.get("max_grad_value"),
                           master_weights=master, backend=backend)  # fmt: skip
    for t in range(1, STEPS + 1):
        grads = _grads(t, SHAPES, dtype)
        for p, g in zip(params, grads):
            p.grad = g.clone()
        inputs = [_state64(opt, p) for p in params]
        assert all(s[4] == t - 1 for s in inputs)
        g64 = paper_clip([g.double() for g in grads], max_grad_value=v.get("max_grad_value"),
                         max_grad_norm=v.get("max_grad_norm"),
                         maximize=v.get("maximize", False))  # fmt: skip
        opt.step()
        for i, p in enumerate(params):
            w, m1, m2, vv, _ = inputs[i]
            exact, terms = paper_step(w, g64[i], m1, m2, vv, float(t), **HYPER,
                                      t_alpha=v["t_alpha"], t_beta3=v["t_beta3"])  # fmt: skip
            st = opt.state[p]
            assert st["step"].dtype == F32 and st["step"].dim() == 0 and float(st["step"]) == t
            got_w = st["master_param"] if master else p.detach()
            where = f"{backend} {mode} {variant} step {t} param {i}"
            for name, got, e, s in zip(("weight", "exp_avg", "exp_avg_slow", "exp_avg_sq"),
                                       (got_w, st["exp_avg"], st["exp_avg_slow"],
                                        st["exp_avg_sq"]), exact, terms):  # fmt: skip
                assert_paper_close(got, e, s, f"{where} {name}")
            if master:
                assert_param_is_rne_of_master(p, st["master_param"], where)
            assert torch.equal(p.grad, grads[i]), ".grad was rewritten"


FUNCTIONAL_MODES = ("fp32", "bf16", "bf16-master")


@pytest.mark.parametrize("mode", FUNCTIONAL_MODES)
def test_functional_lockstep_with_the_paper(backend, mode):
    """fastopt.functional.ademamix over lists, each tensor at its own step (so the
    tensors are in different phases of both warm-ups), with the whole gradient
    transform (grad_mul, max_grad_value, clip_coef) and maximize."""
    dtype, master = MODES[mode]
    s_dtype = F32 if master else dtype
    gen = torch.Generator().manual_seed(3)
    sizes = [1, 7, 300, 1025]
    offsets = [0, 9, 17, 40]  # steps already taken by each tensor
    ws = [torch.randn(n, generator=gen) for n in sizes]
    masters = [w.clone() for w in ws] if master else []
    params = [w.to(dtype) for w in ws]
    m1s = [(torch.randn(n, generator=gen) * 0.1).to(s_dtype) for n in sizes]
    m2s = [(torch.randn(n, generator=gen) * 0.1).to(s_dtype) for n in sizes]
    vs = [(torch.rand(n, generator=gen) * 0.01 + 1e-3).to(s_dtype) for n in sizes]
    steps = [torch.tensor(float(o)) for o in offsets]
    hp = dict(HYPER, t_alpha=15, t_beta3=45)
    grad_mul, c, coef = torch.tensor(1 / 48), 0.4, torch.tensor(0.8)
    for k in range(1, STEPS + 1):
        grads = [(torch.randn(n, generator=gen) * 16).to(dtype) for n in sizes]
        for s in steps:
            s.add_(1)
        inputs = [((masters[i] if master else params[i]).double(), m1s[i].double(),
                   m2s[i].double(), vs[i].double()) for i in range(len(sizes))]  # fmt: skip
        g64 = paper_clip([g.double() for g in grads], grad_mul=float(grad_mul),
                         max_grad_value=c, maximize=True)  # fmt: skip
        g64 = [g * float(coef) for g in g64]
        fastopt.functional.ademamix(
            params, grads, m1s, m2s, vs, masters, steps, lr=hp["lr"], beta1=0.9, beta2=0.999,
            beta3=0.9999, alpha=5.0, t_alpha=15, t_beta3=45, eps=1e-8, weight_decay=0.1,
            maximize=True, grad_mul=grad_mul, max_grad_value=c, clip_coef=coef, backend=backend,
        )  # fmt: skip
        for i in range(len(sizes)):
            t = float(steps[i])
            exact, terms = paper_step(*inputs[i][:1], g64[i], *inputs[i][1:], t, **hp)
            got = ((masters[i] if master else params[i]), m1s[i], m2s[i], vs[i])
            for name, a, e, s in zip(("weight", "m1", "m2", "v"), got, exact, terms):
                assert_paper_close(a, e, s, f"{backend} {mode} call {k} tensor {i} (t={t}) {name}")
            if master:
                assert_param_is_rne_of_master(params[i], masters[i], f"call {k} tensor {i}")


def test_paper_schedules_as_the_paper_defines_them():
    """The test's own transcription: the endpoints and shape the paper states."""
    b1, b3 = 0.9, 0.9999
    assert beta3_schedule(0, b1, b3, 100) == pytest.approx(b1, rel=1e-15)
    assert beta3_schedule(100, b1, b3, 100) == pytest.approx(b3, rel=1e-15)
    assert beta3_schedule(250, b1, b3, 100) == b3
    # the half-life 1/(1 - beta3(t)) ~ -1/ln(beta3(t)) is linear in t in between
    half = [-1 / math.log(beta3_schedule(t, b1, b3, 100)) for t in (0, 25, 50, 75, 100)]
    steps = [b - a for a, b in zip(half, half[1:])]
    assert max(steps) - min(steps) < 1e-9 * max(steps)
    assert alpha_schedule(10, 5.0, 40) == 1.25 and alpha_schedule(80, 5.0, 40) == 5.0
    assert beta3_schedule(7, b1, b3, None) == b3 and alpha_schedule(7, 5.0, None) == 5.0


# ---- state dict ----------------------------------------------------------------------------


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.detach().contiguous().reshape(-1).view(torch.uint8)


@pytest.mark.parametrize("mode", ["fp32", "bf16-master", "fp16"])
def test_state_dict_round_trip_continues_bitwise(backend, mode):
    dtype, master = MODES[mode]
    kw = dict(HYPER, t_alpha=8, t_beta3=12, max_grad_norm=2.0, max_grad_value=0.5,
              master_weights=master, backend=backend)  # fmt: skip
    params = _params(dtype, seed=5)
    opt = fastopt.AdEMAMix(params, **kw)

    def run(opt, params, first, last):
        for t in range(first, last + 1):
            for p, g in zip(params, _grads(t, SHAPES, dtype)):
                p.grad = g
            opt.step()

    run(opt, params, 1, 6)
    buf = io.BytesIO()
    torch.save(copy.deepcopy(opt.state_dict()), buf)
    mid = [p.detach().clone() for p in params]
    run(opt, params, 7, 14)

    resumed = [m.clone().requires_grad_() for m in mid]
    fresh = fastopt.AdEMAMix(resumed, **kw)
    buf.seek(0)
    fresh.load_state_dict(torch.load(buf, weights_only=True))
    run(fresh, resumed, 7, 14)
    keys = {"step", "exp_avg", "exp_avg_slow", "exp_avg_sq"} | ({"master_param"} if master else set())
    for i, (a, b) in enumerate(zip(params, resumed)):
        assert torch.equal(_bits(a), _bits(b)), f"param {i} differs after resuming"
        assert set(opt.state[a]) == set(fresh.state[b]) == keys
        for k in keys:
            assert opt.state[a][k].dtype == fresh.state[b][k].dtype, k
            assert torch.equal(_bits(opt.state[a][k]), _bits(fresh.state[b][k])), (i, k)
        assert float(fresh.state[b]["step"]) == 14.0
        moment_dtype = F32 if master else dtype
        assert fresh.state[b]["exp_avg_slow"].dtype == moment_dtype
    saved = opt.state_dict()
    assert set(saved) == {"state", "param_groups"}
    g = saved["param_groups"][0]
    assert (g["betas"], g["alpha"], g["t_alpha"], g["t_beta3"]) == ((0.9, 0.999, 0.9999), 5.0, 8, 12)


# ---- validation ----------------------------------------------------------------------------

BAD = {
    "two betas": dict(betas=(0.9, 0.999)),
    "four betas": dict(betas=(0.9, 0.999, 0.9999, 0.5)),
    "beta1 < 0": dict(betas=(-0.1, 0.999, 0.9999)),
    "beta2 = 1": dict(betas=(0.9, 1.0, 0.9999)),
    "beta3 = 1": dict(betas=(0.9, 0.999, 1.0)),
    "beta3 > 1": dict(betas=(0.9, 0.999, 1.5)),
    "alpha < 0": dict(alpha=-1.0),
    "alpha nan": dict(alpha=math.nan),
    "t_alpha = 0": dict(t_alpha=0),
    "t_alpha < 0": dict(t_alpha=-5),
    "t_alpha inf": dict(t_alpha=math.inf),
    "t_alpha bool": dict(t_alpha=True),
    "t_alpha str": dict(t_alpha="100"),
    "t_beta3 = 0": dict(t_beta3=0),
    "t_beta3 < 0": dict(t_beta3=-1),
    "t_beta3 nan": dict(t_beta3=math.nan),
    "t_beta3 with beta1 = 0": dict(betas=(0.0, 0.999, 0.9999), t_beta3=100),  # needs ln(beta1)
    "lr < 0": dict(lr=-1e-3),
    "eps < 0": dict(eps=-1e-8),
    "weight_decay < 0": dict(weight_decay=-0.1),
    "max_grad_value = 0": dict(max_grad_value=0.0),
    "max_grad_value < 0": dict(max_grad_value=-1.0),
    "max_grad_norm < 0": dict(max_grad_norm=-1.0),
}


@pytest.mark.parametrize("name", list(BAD))
def test_bad_hyperparameters_raise_value_error(name):
    with pytest.raises(ValueError):
        fastopt.AdEMAMix([torch.zeros(3, requires_grad=True)], **BAD[name])


@pytest.mark.parametrize(
    "kw",
    [dict(), dict(alpha=0.0), dict(t_alpha=1, t_beta3=1), dict(t_alpha=10_000, t_beta3=None),
     dict(betas=(0.0, 0.0, 0.0)), dict(max_grad_value=1e-3, max_grad_norm=1.0)],
    ids=["defaults", "alpha0", "warmups1", "t_alpha_only", "zero_betas", "clipping"],
)  # fmt: skip
def test_good_hyperparameters_construct_and_step(kw):
    p = torch.randn(5, requires_grad=True)
    opt = fastopt.AdEMAMix([p], **kw)
    p.grad = torch.randn(5)
    opt.step()
    assert p.isfinite().all()
    d = opt.defaults
    assert (d.get("alpha", 5.0), d["t_alpha"], d["t_beta3"]) == (
        kw.get("alpha", 5.0), kw.get("t_alpha"), kw.get("t_beta3"))  # fmt: skip


def test_class_defaults_are_the_issue_s():
    import inspect

    sig = inspect.signature(fastopt.AdEMAMix)
    want = dict(lr=1e-3, betas=(0.9, 0.999, 0.9999), alpha=5.0, t_alpha=None, t_beta3=None,
                eps=1e-8, weight_decay=1e-2, maximize=False, max_grad_norm=None,
                max_grad_value=None, master_weights=False, backend="auto")  # fmt: skip
    for name, value in want.items():
        assert sig.parameters[name].default == value, name
    for name in ("maximize", "max_grad_norm", "max_grad_value", "master_weights", "backend"):
        assert sig.parameters[name].kind is inspect.Parameter.KEYWORD_ONLY, name
