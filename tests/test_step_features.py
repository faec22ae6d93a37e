"""What is built into the step: clipping, non-finite skip, loss scaling, master weights, Lion."""

import pytest
import torch
from conftest import assert_state_equal, clone_params, set_grads

import fastopt

SHAPES = [(31,), (8, 9), (1025,), (1,)]


def _params(shapes=SHAPES, dtype=torch.float32, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(s, generator=gen).to(dtype) for s in shapes], gen


def _snapshot(opt, params):
    return [p.detach().clone() for p in params], {
        i: {k: v.clone() for k, v in opt.state[p].items()} for i, p in enumerate(params)
    }


def _assert_bitwise_unchanged(opt, params, snap):
    values, states = snap
    for i, p in enumerate(params):
        assert _bits(p.detach()) == _bits(values[i]), f"param {i} changed"
        for k, v in states[i].items():
            assert _bits(opt.state[p][k]) == _bits(v), f"param {i} state {k} changed"


def _bits(t):
    # Compare raw bytes: NaN payloads and signed zeros count, unlike torch.equal.
    return t.detach().contiguous().reshape(-1).view(torch.uint8).tolist()


# ---- global-norm clipping ------------------------------------------------------------


@pytest.mark.parametrize("max_norm", [0.5, 1e3])
def test_clipping_matches_clip_grad_norm_then_adamw(backend, max_norm):
    base, gen = _params()
    pa, pb = clone_params(base), clone_params(base)
    ref = torch.optim.AdamW(pa, lr=1e-2, foreach=False)
    opt = fastopt.AdamW(pb, lr=1e-2, max_grad_norm=max_norm, backend=backend)
    for _ in range(6):
        grads = [torch.randn(p.shape, generator=gen) * 3 for p in base]
        set_grads(pa, grads)
        set_grads(pb, grads)
        expected_norm = torch.nn.utils.clip_grad_norm_(pa, max_norm, foreach=False)
        ref.step()
        opt.step()
        torch.testing.assert_close(opt.last_grad_norm, expected_norm)
        assert_state_equal(ref, pa, opt, pb, ("step", "exp_avg", "exp_avg_sq"))
        for p, g in zip(pb, grads):  # .grad is never rewritten
            assert torch.equal(p.grad, g)


def test_clipping_spans_all_groups(backend):
    base, gen = _params()
    pa, pb = clone_params(base), clone_params(base)
    ref = torch.optim.AdamW([{"params": pa[:2]}, {"params": pa[2:], "lr": 1e-3}], lr=1e-2)
    opt = fastopt.AdamW([{"params": pb[:2]}, {"params": pb[2:], "lr": 1e-3}], lr=1e-2,
                        max_grad_norm=0.1, backend=backend)
    grads = [torch.randn(p.shape, generator=gen) for p in base]
    set_grads(pa, grads)
    set_grads(pb, grads)
    torch.nn.utils.clip_grad_norm_(pa, 0.1)
    ref.step()
    opt.step()
    assert_state_equal(ref, pa, opt, pb, ("step", "exp_avg", "exp_avg_sq"))


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
@pytest.mark.parametrize("where", ["first", "middle", "last"])
@pytest.mark.parametrize("opt_cls", [fastopt.AdamW, fastopt.Lion])
def test_nonfinite_gradient_skips_whole_step(backend, bad, where, opt_cls):
    base, gen = _params()
    params = clone_params(base)
    opt = opt_cls(params, lr=1e-2, max_grad_norm=1.0, backend=backend)
    for _ in range(2):  # build up some state first
        set_grads(params, [torch.randn(p.shape, generator=gen) for p in base])
        opt.step()
    grads = [torch.randn(p.shape, generator=gen) for p in base]
    flat_index = {"first": (0, 0), "middle": (2, 512), "last": (len(base) - 1, -1)}[where]
    grads[flat_index[0]].view(-1)[flat_index[1]] = bad
    set_grads(params, grads)
    snap = _snapshot(opt, params)
    opt.step()
    _assert_bitwise_unchanged(opt, params, snap)
    assert opt.skipped_steps == 1 and opt.applied_steps == 2
    assert not torch.isfinite(opt.last_grad_norm)
    # and training continues normally afterwards
    set_grads(params, [torch.randn(p.shape, generator=gen) for p in base])
    opt.step()
    assert opt.applied_steps == 3
    assert float(opt.state[params[0]]["step"]) == 3.0


# ---- loss scaling through torch's GradScaler protocol --------------------------------


def _scaled_training(opt_factory, scaler_cls, steps, overflow_at=None, seed=0):
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.Tanh(), torch.nn.Linear(32, 4))
    opt = opt_factory(model.parameters())
    scaler = scaler_cls("cpu", init_scale=2.0**10, growth_interval=3) if scaler_cls else None
    data = torch.randn(steps, 8, 16, generator=torch.Generator().manual_seed(1))
    history = []
    for step in range(steps):
        loss = model(data[step]).square().mean()
        if scaler is None:
            loss.backward()
            opt.step()
        else:
            scaler.scale(loss).backward()
            if step == overflow_at:
                model[0].weight.grad[0, 0] = float("inf")
            scaler.step(opt)
            scaler.update()
        opt.zero_grad(set_to_none=True)
        history.append(scaler.get_scale() if scaler else None)
    return model, opt, scaler, history


@pytest.mark.parametrize("scaler_cls", [torch.amp.GradScaler, fastopt.GradScaler])
def test_grad_scaler_matches_unscaled_torch(backend, scaler_cls):
    ref_model, *_ = _scaled_training(lambda p: torch.optim.AdamW(p, lr=1e-2, foreach=False),
                                     None, 8)
    model, opt, scaler, scales = _scaled_training(
        lambda p: fastopt.AdamW(p, lr=1e-2, backend=backend), scaler_cls, 8)
    for a, b in zip(ref_model.parameters(), model.parameters()):
        # Scaling by a power of two is exact; only the kernels' rounding differs.
        torch.testing.assert_close(a, b)
    assert scales[-1] > 2.0**10  # the scale grew: no step was wrongly skipped
    assert opt.skipped_steps == 0


@pytest.mark.parametrize("scaler_cls", [torch.amp.GradScaler, fastopt.GradScaler])
def test_grad_scaler_backs_off_on_overflow_with_nothing_changed(backend, scaler_cls):
    torch.manual_seed(0)
    model = torch.nn.Linear(8, 8)
    opt = fastopt.AdamW(model.parameters(), lr=1e-2, backend=backend)
    scaler = scaler_cls("cpu", init_scale=2.0**12)
    for _ in range(2):
        scaler.scale(model(torch.randn(4, 8)).sum()).backward()
        scaler.step(opt)
        scaler.update()
        opt.zero_grad()
    scaler.scale(model(torch.randn(4, 8)).sum()).backward()
    model.bias.grad[3] = float("nan")
    params = list(model.parameters())
    snap = _snapshot(opt, params)
    scale_before = scaler.get_scale()
    scaler.step(opt)
    scaler.update()
    _assert_bitwise_unchanged(opt, params, snap)
    assert scaler.get_scale() == scale_before * 0.5
    # torch's scaler skips the step without calling it; fastopt's scaler lets the
    # optimizer's norm pass find the NaN, so the optimizer counts the skip itself.
    if scaler_cls is fastopt.GradScaler:
        assert opt.skipped_steps == 1


def test_fastopt_scaler_state_dict_is_torchs():
    a = fastopt.GradScaler("cpu", init_scale=128.0)
    b = torch.amp.GradScaler("cpu")
    b.load_state_dict(a.state_dict())
    assert b.get_scale() == 128.0 and set(a.state_dict()) == set(b.state_dict())


def test_fastopt_scaler_with_torch_optimizer_behaves_like_torch():
    results = []
    for scaler_cls in (torch.amp.GradScaler, fastopt.GradScaler):
        _, _, scaler, scales = _scaled_training(
            lambda p: torch.optim.AdamW(p, lr=1e-2), scaler_cls, 6, overflow_at=2)
        results.append(scales)
    assert results[0] == results[1]


def test_scaler_with_explicit_unscale_and_clipping(backend):
    """A script that calls scaler.unscale_ then its own clip keeps working."""
    torch.manual_seed(0)
    model = torch.nn.Linear(6, 3)
    opt = fastopt.AdamW(model.parameters(), lr=1e-2, backend=backend)
    scaler = fastopt.GradScaler("cpu", init_scale=256.0)
    ref_model = torch.nn.Linear(6, 3)
    ref_model.load_state_dict(model.state_dict())
    ref = torch.optim.AdamW(ref_model.parameters(), lr=1e-2, foreach=False)
    x = torch.randn(5, 6)
    scaler.scale(model(x).sum()).backward()
    scaler.unscale_(opt)
    torch.nn.utils.clip_grad_norm_(model.parameters(), 0.5)
    scaler.step(opt)
    scaler.update()
    ref_model(x).sum().backward()
    torch.nn.utils.clip_grad_norm_(ref_model.parameters(), 0.5)
    ref.step()
    for a, b in zip(ref_model.parameters(), model.parameters()):
        torch.testing.assert_close(a, b)


# ---- master weights ---------------------------------------------------------------------


def _rne(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Round fp32 to bf16/fp16 nearest-even, written out independently of torch's cast."""
    if dtype == torch.bfloat16:
        bits = x.view(torch.int32).to(torch.int64) & 0xFFFFFFFF
        rounded = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16
        return rounded.to(torch.int16).view(torch.bfloat16)
    # fp16: use float64 -> nearest-even through numpy, an independent implementation
    return torch.from_numpy(x.numpy().astype("float16")).view(torch.float16)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("opt_name", ["adamw", "lion"])
def test_master_weights_follow_fp32_math(backend, dtype, opt_name):
    base, gen = _params(dtype=torch.float32)
    base = [b.to(dtype).float() for b in base]  # start exactly representable
    p32 = clone_params(base)
    plow = [p.detach().to(dtype).requires_grad_(True) for p in base]
    if opt_name == "adamw":
        ref = torch.optim.AdamW(p32, lr=1e-3, weight_decay=0.1, foreach=False)
        opt = fastopt.AdamW(plow, lr=1e-3, weight_decay=0.1, master_weights=True, backend=backend)
        keys = ("step", "exp_avg", "exp_avg_sq")
    else:
        ref = fastopt.Lion(p32, lr=1e-3, weight_decay=0.1, backend="reference")
        opt = fastopt.Lion(plow, lr=1e-3, weight_decay=0.1, master_weights=True, backend=backend)
        keys = ("step", "exp_avg")
    for _ in range(5):
        grads = [torch.randn(p.shape, generator=gen).to(dtype) for p in base]
        set_grads(plow, grads)
        set_grads(p32, [g.float() for g in grads])
        ref.step()
        opt.step()
        for a, b in zip(p32, plow):
            st = opt.state[b]
            assert st["master_param"].dtype == torch.float32
            # the master follows fp32 math on an fp32 copy at fp32 tolerance
            torch.testing.assert_close(st["master_param"], a.detach())
            for k in keys:
                assert st[k].dtype == torch.float32
                torch.testing.assert_close(st[k], ref.state[a][k])
            # the low-precision param is the master rounded to nearest even, bit for bit
            assert torch.equal(b.detach().view(torch.int16), _rne(st["master_param"], dtype).view(torch.int16))


def test_small_updates_accumulate_in_master(backend):
    p = torch.ones(64, dtype=torch.bfloat16, requires_grad=True)
    opt = fastopt.AdamW([p], lr=1e-4, weight_decay=0.0, master_weights=True, backend=backend)
    plain = torch.ones(64, dtype=torch.bfloat16, requires_grad=True)
    plain_opt = fastopt.AdamW([plain], lr=1e-4, weight_decay=0.0, backend=backend)
    for _ in range(100):
        p.grad = torch.ones(64, dtype=torch.bfloat16)
        plain.grad = torch.ones(64, dtype=torch.bfloat16)
        opt.step()
        plain_opt.step()
    # 100 steps of ~1e-4 move the master by ~1e-2, which bf16 (spacing 2^-7 below 1) shows;
    # without a master, each 1e-4 update rounds away.
    assert torch.all(plain.detach() == 1.0)
    master = opt.state[p]["master_param"]
    torch.testing.assert_close(master, torch.full((64,), 1 - 100 * 1e-4), atol=1e-5, rtol=0)
    assert torch.all(p.detach() < 1.0)


def test_master_weights_ignored_for_fp32(backend):
    p = torch.randn(10, requires_grad=True)
    opt = fastopt.AdamW([p], master_weights=True, backend=backend)
    p.grad = torch.randn(10)
    opt.step()
    assert "master_param" not in opt.state[p]


# ---- Lion against the paper's update written out ----------------------------------------


@pytest.mark.parametrize("maximize", [False, True])
def test_lion_matches_paper_update(backend, maximize):
    gen = torch.Generator().manual_seed(3)
    p = torch.randn(1025, generator=gen)
    p.requires_grad_(True)
    opt = fastopt.Lion([p], lr=3e-3, betas=(0.9, 0.99), weight_decay=0.2, maximize=maximize,
                       backend=backend)
    w = p.detach().clone().double()
    m = torch.zeros(1025, dtype=torch.float64)
    lr, b1, b2, wd = 3e-3, 0.9, 0.99, 0.2
    for step in range(6):
        g = torch.randn(1025, generator=gen)
        g[:7] = 0.0  # sign(0) = 0: with m = 0 at step 0 these elements see no sign update
        p.grad = g.clone()
        opt.step()
        gd = -g.double() if maximize else g.double()
        c = b1 * m + (1 - b1) * gd
        w = w * (1 - lr * wd) - lr * torch.sign(c)
        m = b2 * m + (1 - b2) * gd
        torch.testing.assert_close(p.detach().double(), w, rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(opt.state[p]["exp_avg"].double(), m, rtol=1e-5, atol=1e-7)
        if step == 0:
            # only weight decay moved the zero-gradient elements
            torch.testing.assert_close(p.detach()[:7].double(), w[:7])


@pytest.mark.parametrize("opt_cls", [fastopt.AdamW, fastopt.Lion])
def test_nan_gradient_without_norm_pass_propagates(backend, opt_cls):
    """With no clipping and no scaler nothing computes a norm: NaN shows in the weights."""
    p = torch.randn(1025, requires_grad=True)
    opt = opt_cls([p], lr=1e-2, backend=backend)
    g = torch.randn(1025)
    g[[0, 511, 1024]] = float("nan")
    p.grad = g
    opt.step()
    assert torch.isnan(p.detach()[[0, 511, 1024]]).all()
    assert torch.isfinite(p.detach()[1:511]).all()
