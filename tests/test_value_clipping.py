"""Value clipping (``max_grad_value``) is ``clip_grad_value_`` inside the update (SPEC §3).

Order: unscale, clamp each element to [-c, c], the global norm of the clamped
gradients, the norm coefficient: what a torch script gets from
``scaler.unscale_``, ``clip_grad_value_``, ``clip_grad_norm_``, ``step``.
``.grad`` is never rewritten. Tolerances are torch's fp32 defaults.
"""

from __future__ import annotations

import math

import pytest
import torch
from conftest import assert_state_equal, clone_params, set_grads

import fastopt

SHAPES = [(31,), (8, 9), (1025,), (1,)]
OPTIMIZERS = {
    "AdamW": (fastopt.AdamW, dict(lr=1e-2), ("step", "exp_avg", "exp_avg_sq")),
    "Lion": (fastopt.Lion, dict(lr=1e-3, weight_decay=0.1), ("exp_avg",)),
    "AdEMAMix": (fastopt.AdEMAMix, dict(lr=1e-2, t_alpha=5, t_beta3=7),
                 ("step", "exp_avg", "exp_avg_slow", "exp_avg_sq")),
}  # fmt: skip


def _base(seed=0):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(s, generator=gen) for s in SHAPES], gen


def _bits(t):
    return t.detach().contiguous().reshape(-1).view(torch.uint8)


def _clamped(grads, c):
    out = [g.clone() for g in grads]
    holders = [torch.zeros_like(g, requires_grad=True) for g in out]
    for h, g in zip(holders, out):
        h.grad = g
    torch.nn.utils.clip_grad_value_(holders, c, foreach=False)
    return [h.grad for h in holders]


def _snapshot(opt, params):
    return [p.detach().clone() for p in params], [
        {k: v.clone() for k, v in opt.state[p].items()} for p in params
    ]


def _assert_bitwise_unchanged(opt, params, snap):
    values, states = snap
    for i, p in enumerate(params):
        assert torch.equal(_bits(p), _bits(values[i])), f"param {i} changed"
        for k, v in states[i].items():
            assert torch.equal(_bits(opt.state[p][k]), _bits(v)), f"param {i} state {k} changed"


# ---- every optimizer: the clamp happens inside the update ---------------------------------------


@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_max_grad_value_is_clip_grad_value_inside_the_step(backend, name):
    """opt(max_grad_value=c) on raw grads == opt() on clip_grad_value_'d grads; .grad untouched."""
    cls, kw, keys = OPTIMIZERS[name]
    base, gen = _base()
    pa, pb = clone_params(base), clone_params(base)
    clipped = cls(pa, max_grad_value=0.3, backend=backend, **kw)
    plain = cls(pb, backend=backend, **kw)
    for _ in range(5):
        grads = [torch.randn(p.shape, generator=gen) for p in base]
        assert any(bool((g.abs() > 0.3).any()) for g in grads)  # the clamp has work to do
        set_grads(pa, grads)
        set_grads(pb, _clamped(grads, 0.3))
        clipped.step()
        plain.step()
        for p, g in zip(pa, grads):
            assert torch.equal(_bits(p.grad), _bits(g)), ".grad was rewritten"
        assert_state_equal(plain, pb, clipped, pa, keys)


@pytest.mark.parametrize("amsgrad", [False, True])
@pytest.mark.parametrize("c", [0.05, 0.5, 100.0])
def test_adamw_equals_clip_grad_value_then_torch_adamw(backend, c, amsgrad):
    base, gen = _base(1)
    pa, pb = clone_params(base), clone_params(base)
    ref = torch.optim.AdamW(pa, lr=1e-2, amsgrad=amsgrad, foreach=False)
    opt = fastopt.AdamW(pb, lr=1e-2, amsgrad=amsgrad, max_grad_value=c, backend=backend)
    keys = ("step", "exp_avg", "exp_avg_sq") + (("max_exp_avg_sq",) if amsgrad else ())
    for _ in range(6):
        grads = [torch.randn(p.shape, generator=gen) for p in base]
        set_grads(pa, grads)
        set_grads(pb, grads)
        torch.nn.utils.clip_grad_value_(pa, c, foreach=False)
        ref.step()
        opt.step()
        assert opt.last_grad_norm is None  # no norm pass without norm clipping or scaling
        assert_state_equal(ref, pa, opt, pb, keys)
        for p, g in zip(pb, grads):
            assert torch.equal(_bits(p.grad), _bits(g))


@pytest.mark.parametrize("max_norm", [0.5, 1e3])
def test_adamw_equals_clip_value_then_clip_norm_then_torch_adamw(backend, max_norm):
    base, gen = _base(2)
    pa, pb = clone_params(base), clone_params(base)
    ref = torch.optim.AdamW(pa, lr=1e-2, foreach=False)
    opt = fastopt.AdamW(pb, lr=1e-2, max_grad_value=0.2, max_grad_norm=max_norm,
                        backend=backend)  # fmt: skip
    for _ in range(6):
        grads = [torch.randn(p.shape, generator=gen) for p in base]
        set_grads(pa, grads)
        set_grads(pb, grads)
        torch.nn.utils.clip_grad_value_(pa, 0.2, foreach=False)
        norm = torch.nn.utils.clip_grad_norm_(pa, max_norm, foreach=False)
        ref.step()
        opt.step()
        # the norm of the clamped gradients (clip_grad_norm_'s return), unclipped
        torch.testing.assert_close(opt.last_grad_norm, norm)
        assert_state_equal(ref, pa, opt, pb, ("step", "exp_avg", "exp_avg_sq"))
    if max_norm < 1:  # both clips did something on the last step
        assert float(norm) > max_norm


# ---- loss scaling: unscale -> clamp -> norm -> coefficient ---------------------------------------


def _model(seed=0):
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.Tanh(), torch.nn.Linear(32, 4))


def _batches(n):
    gen = torch.Generator().manual_seed(1)
    return torch.randn(n, 8, 16, generator=gen), torch.randn(n, 8, 4, generator=gen)


C, MAX_NORM = 0.02, 0.05


@pytest.mark.parametrize("scaler_cls", [torch.amp.GradScaler, fastopt.GradScaler], ids=["torch-scaler", "fastopt-scaler"])
def test_scaled_adamw_equals_torch_unscale_clip_value_clip_norm(backend, scaler_cls):
    """scaler.step(fastopt.AdamW(max_grad_value=c, max_grad_norm=n)) == the torch script
    scaler.unscale_; clip_grad_value_; clip_grad_norm_; scaler.step(torch AdamW)."""
    steps = 6
    xs, ys = _batches(steps)
    ref_model, model = _model(), _model()
    ref = torch.optim.AdamW(ref_model.parameters(), lr=1e-2, foreach=False)
    ref_scaler = torch.amp.GradScaler("cpu", init_scale=2.0**12, growth_interval=2)
    opt = fastopt.AdamW(model.parameters(), lr=1e-2, max_grad_value=C, max_grad_norm=MAX_NORM,
                        backend=backend)  # fmt: skip
    scaler = scaler_cls("cpu", init_scale=2.0**12, growth_interval=2)
    clamped_any = False
    for k in range(steps):
        loss = torch.nn.functional.mse_loss(ref_model(xs[k]), ys[k])
        ref_scaler.scale(loss).backward()
        ref_scaler.unscale_(ref)
        clamped_any |= any(bool((p.grad.abs() > C).any()) for p in ref_model.parameters())
        torch.nn.utils.clip_grad_value_(ref_model.parameters(), C, foreach=False)
        norm = torch.nn.utils.clip_grad_norm_(ref_model.parameters(), MAX_NORM, foreach=False)
        ref_scaler.step(ref)
        ref_scaler.update()
        ref.zero_grad(set_to_none=True)

        loss = torch.nn.functional.mse_loss(model(xs[k]), ys[k])
        scaler.scale(loss).backward()
        scaled = [p.grad.clone() for p in model.parameters()]
        scaler.step(opt)
        scaler.update()
        for p, g in zip(model.parameters(), scaled):
            assert torch.equal(_bits(p.grad), _bits(g)), ".grad was rewritten"
        opt.zero_grad(set_to_none=True)
        torch.testing.assert_close(opt.last_grad_norm, norm)
        assert float(norm) > MAX_NORM  # the norm clip is active too
        assert scaler.get_scale() == ref_scaler.get_scale()
    assert clamped_any and scaler.get_scale() > 2.0**12  # clamps happened, no step skipped
    for a, b in zip(ref_model.parameters(), model.parameters()):
        torch.testing.assert_close(b, a)
    assert opt.skipped_steps == 0


@pytest.mark.parametrize("scaler_cls", [torch.amp.GradScaler, fastopt.GradScaler], ids=["torch-scaler", "fastopt-scaler"])
@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_scaled_step_order_for_every_optimizer(backend, name, scaler_cls):
    """Each class under a scaler equals the same class stepped on gradients that were
    unscaled, clamped and norm-clipped by hand, in SPEC §3's order."""
    cls, kw, keys = OPTIMIZERS[name]
    xs, ys = _batches(4)
    ma, mb = _model(3), _model(3)
    opt = cls(ma.parameters(), max_grad_value=C, max_grad_norm=MAX_NORM, backend=backend, **kw)
    by_hand = cls(mb.parameters(), backend=backend, **kw)
    scaler = scaler_cls("cpu", init_scale=2.0**10)
    for k in range(4):
        scale = scaler.get_scale()
        scaler.scale(torch.nn.functional.mse_loss(ma(xs[k]), ys[k])).backward()
        scaler.step(opt)
        scaler.update()
        opt.zero_grad(set_to_none=True)
        (torch.nn.functional.mse_loss(mb(xs[k]), ys[k]) * scale).backward()
        for p in mb.parameters():
            p.grad.div_(scale)  # a power of two: exact
        torch.nn.utils.clip_grad_value_(mb.parameters(), C, foreach=False)
        norm = torch.nn.utils.clip_grad_norm_(mb.parameters(), MAX_NORM, foreach=False)
        by_hand.step()
        by_hand.zero_grad(set_to_none=True)
        torch.testing.assert_close(opt.last_grad_norm, norm)
    assert_state_equal(by_hand, list(mb.parameters()), opt, list(ma.parameters()), keys)


# ---- non-finite gradients ----------------------------------------------------------------------


@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_nan_with_value_clipping_still_skips_the_step(backend, name):
    """clamp keeps a NaN a NaN, so the norm of the clamped gradients is NaN: skip."""
    cls, kw, _ = OPTIMIZERS[name]
    base, gen = _base(4)
    params = clone_params(base)
    opt = cls(params, max_grad_value=0.1, max_grad_norm=1.0, backend=backend, **kw)
    for _ in range(2):
        set_grads(params, [torch.randn(p.shape, generator=gen) for p in base])
        opt.step()
    grads = [torch.randn(p.shape, generator=gen) for p in base]
    grads[2][500] = math.nan
    set_grads(params, grads)
    snap = _snapshot(opt, params)
    opt.step()
    _assert_bitwise_unchanged(opt, params, snap)
    assert opt.skipped_steps == 1 and opt.applied_steps == 2
    assert opt.last_grad_norm.isnan()
    set_grads(params, [torch.randn(p.shape, generator=gen) for p in base])
    opt.step()  # and training goes on
    assert opt.applied_steps == 3


def test_inf_with_value_clipping_is_clamped_like_clip_grad_value(backend):
    """Without loss scaling an inf is a gradient like any other: clip_grad_value_ makes it
    c, the norm of the clamped gradients is finite, and the step is taken (as torch's)."""
    base, gen = _base(5)
    pa, pb = clone_params(base), clone_params(base)
    ref = torch.optim.AdamW(pa, lr=1e-2, foreach=False)
    opt = fastopt.AdamW(pb, lr=1e-2, max_grad_value=0.1, max_grad_norm=1.0, backend=backend)
    grads = [torch.randn(p.shape, generator=gen) for p in base]
    grads[2][7] = math.inf
    grads[0][3] = -math.inf
    set_grads(pa, grads)
    set_grads(pb, grads)
    torch.nn.utils.clip_grad_value_(pa, 0.1, foreach=False)
    norm = torch.nn.utils.clip_grad_norm_(pa, 1.0, foreach=False)
    ref.step()
    opt.step()
    assert opt.skipped_steps == 0
    torch.testing.assert_close(opt.last_grad_norm, norm)
    assert_state_equal(ref, pa, opt, pb, ("step", "exp_avg", "exp_avg_sq"))


@pytest.mark.parametrize("bad", [math.nan, math.inf], ids=["nan", "inf"])
@pytest.mark.parametrize("scaler_cls", [torch.amp.GradScaler, fastopt.GradScaler], ids=["torch-scaler", "fastopt-scaler"])
def test_scaler_overflow_with_value_clipping_skips_and_backs_off(backend, scaler_cls, bad):
    """An overflowed (inf) or NaN scaled gradient is what loss scaling exists to catch: the
    step is skipped and the scale halves, with value clipping on as off, as torch's
    scaler does for the script unscale_ -> clip_grad_value_ -> clip_grad_norm_ -> step."""
    model = _model(6)
    opt = fastopt.AdamW(model.parameters(), lr=1e-2, max_grad_value=0.1, max_grad_norm=1.0,
                        backend=backend)  # fmt: skip
    scaler = scaler_cls("cpu", init_scale=2.0**12)
    xs, ys = _batches(3)
    for k in range(2):
        scaler.scale(torch.nn.functional.mse_loss(model(xs[k]), ys[k])).backward()
        scaler.step(opt)
        scaler.update()
        opt.zero_grad()
    scaler.scale(torch.nn.functional.mse_loss(model(xs[2]), ys[2])).backward()
    model[0].weight.grad[1, 2] = bad
    params = list(model.parameters())
    snap = _snapshot(opt, params)
    before = scaler.get_scale()
    scaler.step(opt)
    scaler.update()
    _assert_bitwise_unchanged(opt, params, snap)
    assert scaler.get_scale() == before * 0.5
