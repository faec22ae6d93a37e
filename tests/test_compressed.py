"""Compressed state (SPEC §8): master remainders and the moments' dtype.

* the remainder encoding (NOTE [master remainder] in update_math.h) in every
  backend, on every bf16 bit pattern and on fp32 masters chosen for their bits
  (ties, signed zeros, subnormals, infinities, NaNs), against an encoding
  written out here with numpy integers;
* lock step: ``master_weights="remainder"`` holds the master of a
  ``master_weights=True`` run bit for bit, step after step, with clipping,
  value clipping and a skipped step;
* state dicts: round trips, torch and fastopt checkpoints across modes;
* a parameter overwritten from outside resets its remainder (NOTE [stale
  remainder] in fastopt/_compressed.py);
* the arguments' errors.
"""

from __future__ import annotations

import copy
import io
import math

import numpy as np
import pytest
import torch

import fastopt
from fastopt import _compressed
from fastopt import functional as F

BACKENDS = [b for b in ("reference", "cpu", "triton") if b in fastopt.available_backends()]
BF16 = torch.bfloat16

# ---- the encoding, written out independently ------------------------------------------


def np_split(u: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(param bits, remainder bits) of fp32 bits ``u`` (uint32): the param is the
    master rounded to nearest, ties away from zero; a NaN keeps its top bits, quieted."""
    u = u.astype(np.uint64)
    nan = (u & 0x7FFFFFFF) > 0x7F800000
    hi = np.where(nan, (u >> 16) | 0x40, ((u + 0x8000) >> 16) & 0xFFFF)
    return hi.astype(np.uint16), (u & 0xFFFF).astype(np.uint16)


def np_join(hi: np.ndarray, lo: np.ndarray) -> np.ndarray:
    """fp32 bits of the master held by param bits ``hi`` and remainder bits ``lo``."""
    h = hi.astype(np.uint64) << 16
    signed = lo.astype(np.uint16).view(np.int16).astype(np.int64)
    nan = (h & 0x7FFF0000) > 0x7F800000
    u = np.where(nan, h | lo.astype(np.uint64), (h.astype(np.int64) + signed).astype(np.uint64))
    return (u & 0xFFFFFFFF).astype(np.uint32)


def bits16(t: torch.Tensor) -> np.ndarray:
    return t.detach().cpu().contiguous().view(torch.int16).numpy().view(np.uint16)


def bits32(t: torch.Tensor) -> np.ndarray:
    return t.detach().cpu().contiguous().view(torch.int32).numpy().view(np.uint32)


def pair(hi: np.ndarray, lo: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    p = torch.from_numpy(hi.astype(np.uint16).view(np.int16).copy()).view(BF16)
    r = torch.from_numpy(lo.astype(np.uint16).view(np.int16).copy())
    return p, r


def identity_step(backend: str, p: torch.Tensor, r: torch.Tensor) -> None:
    """A Lion step with lr = 0 and no decay: the weight is rebuilt, left as it is
    (w * 1 - 0 * sign(c) == w for every w) and split again."""
    n = p.numel()
    F.lion([p], [torch.ones(n, dtype=BF16)], [torch.zeros(n)], [r], lr=0.0, beta1=0.9,
           beta2=0.99, weight_decay=0.0, maximize=False, backend=backend)  # fmt: skip


REMAINDERS = [0, 1, -1, 0x3FFF, 0x4000, 0x7FFF, -0x8000, -0x7FFF, -0x4000, 0x1234, -0x1234]


@pytest.mark.parametrize("backend", BACKENDS)
def test_every_bf16_pattern_with_representative_remainders(backend):
    """Every bf16 param bit pattern beside remainders around the rounding boundary
    (+-1, the largest and the most negative, i.e. ties) goes through join -> split."""
    hi = np.tile(np.arange(2**16, dtype=np.uint32).astype(np.uint16), len(REMAINDERS))
    lo = np.repeat(np.array(REMAINDERS, dtype=np.int64) & 0xFFFF, 2**16).astype(np.uint16)
    u = np_join(hi, lo)
    p, r = pair(hi, lo)
    identity_step(backend, p, r)
    got_hi, got_lo = bits16(p), bits16(r)
    master_nan = (u & 0x7FFFFFFF) > 0x7F800000
    param_nan = (hi & 0x7FFF) > 0x7F80
    want_hi, want_lo = np_split(u)
    canonical = (want_hi == hi) & (want_lo == lo)
    # A pair split() produces comes back unchanged, the master bit for bit.
    ok = canonical & ~master_nan
    assert ok.sum() > 0.9 * len(u)
    assert np.array_equal(got_hi[ok], hi[ok]) and np.array_equal(got_lo[ok], lo[ok])
    assert np.array_equal(np_join(got_hi, got_lo)[ok], u[ok])
    # A NaN param (quiet or not) stays a NaN with its remainder; it comes back quieted.
    assert np.array_equal(got_hi[param_nan], hi[param_nan] | 0x40)
    assert np.array_equal(got_lo[param_nan], lo[param_nan])
    # The few pairs split() never writes (a +-0 or +-inf param whose remainder
    # pushes the sum into the NaN range) hold a NaN master: it stays visible as NaN.
    odd = master_nan & ~param_nan
    assert odd.sum() > 0
    assert bool(p[torch.from_numpy(odd)].isnan().all())


def fp32_specials() -> np.ndarray:
    rng = np.random.default_rng(3)
    hi = rng.integers(0, 2**16, 4000, dtype=np.uint64)
    ties = (hi << 16) | 0x8000  # exactly halfway between two bf16 values
    near = np.concatenate([(hi << 16) | 0x7FFF, (hi << 16) | 0x8001, (hi << 16) | 0xFFFF])
    fixed = [
        0x00000000, 0x80000000,  # +-0
        0x00000001, 0x80000001, 0x00008000, 0x00018000, 0x007FFFFF, 0x807F8000,  # subnormals
        0x7F800000, 0xFF800000,  # +-inf
        0x7F7F7FFF, 0x7F7F8000, 0xFF7F8000, 0x7F7FFFFF,  # the largest finite: some round to inf
        0x7FC00000, 0xFFC00000, 0x7FC00001, 0x7FFF8000, 0x7FFFFFFF, 0xFFFFFFFF,  # quiet NaNs
        0x3F808000, 0x3F818000, 0xBF808000, 0xBF818000,  # ties at odd and even neighbours
    ]  # fmt: skip
    u = np.concatenate([ties, near, rng.integers(0, 2**32, 20000, dtype=np.uint64),
                        np.array(fixed, dtype=np.uint64)]).astype(np.uint32)  # fmt: skip
    nan = (u & 0x7FFFFFFF) > 0x7F800000
    return u[~nan | ((u & 0x00400000) != 0)]  # signalling NaNs: see the next test


@pytest.mark.parametrize("backend", BACKENDS)
def test_every_kind_of_fp32_master_round_trips(backend):
    """Masters chosen for their bits, ties included, split into (param, remainder)
    round trip bit for bit through every backend, and the param is the master
    rounded to nearest, ties away from zero."""
    u = fp32_specials()
    hi, lo = np_split(u)
    assert np.array_equal(np_join(hi, lo), u)  # the written-out encoding itself
    master = torch.from_numpy(u.view(np.int32).copy()).view(torch.float32)
    ref_p, ref_r = _compressed.split(master)
    assert np.array_equal(bits16(ref_p), hi) and np.array_equal(bits16(ref_r), lo)
    assert np.array_equal(bits32(_compressed.join(ref_p, ref_r)), u)
    p, r = pair(hi, lo)
    identity_step(backend, p, r)
    assert np.array_equal(bits16(p), hi) and np.array_equal(bits16(r), lo)
    finite = np.isfinite(master.numpy())
    # ties away from zero: |param| >= |master| exactly on the ties
    tie = finite & ((u & 0xFFFF) == 0x8000)
    pf = p.float().numpy()
    assert tie.sum() > 1000
    assert np.all(np.abs(pf[tie]) > np.abs(master.numpy()[tie]))


@pytest.mark.parametrize("backend", BACKENDS)
def test_signalling_nan_master_comes_back_quiet(backend):
    u = np.array([0x7F800001, 0x7F808000, 0xFF800123, 0x7FBFFFFF], dtype=np.uint32)
    hi, lo = np_split(u)
    p, r = pair(hi, lo)
    identity_step(backend, p, r)
    assert bool(p.isnan().all())
    assert np.array_equal(bits16(r), lo)
    assert np.array_equal(bits16(p), (u >> 16).astype(np.uint16) | 0x40)


# ---- lock step against master_weights=True ---------------------------------------------

OPTIMIZERS = {
    "adamw": lambda ps, **kw: fastopt.AdamW(ps, lr=3e-3, weight_decay=0.1, **kw),
    "adamw-amsgrad": lambda ps, **kw: fastopt.AdamW(ps, lr=3e-3, amsgrad=True, **kw),
    "lion": lambda ps, **kw: fastopt.Lion(ps, lr=1e-3, weight_decay=0.1, **kw),
    "ademamix": lambda ps, **kw: fastopt.AdEMAMix(ps, lr=3e-3, t_alpha=20, t_beta3=20, **kw),
}
SIZES = (1, 7, 4097, 20000)
STEPS = 40


def _params(seed=0, dtype=BF16):
    gen = torch.Generator().manual_seed(seed)
    return [torch.nn.Parameter(torch.randn(n, generator=gen).to(dtype)) for n in SIZES]


def _grads(step: int, dtype=BF16):
    gen = torch.Generator().manual_seed(100 + step)
    out = [(torch.randn(n, generator=gen) * 3).to(dtype) for n in SIZES]
    if step == 17:
        out[2][5] = math.nan  # a non-finite norm: the whole step is skipped
    return out


def _master(opt, p):
    st = opt.state[p]
    if _compressed.REMAINDER_KEY in st:
        return _compressed.join(p, st[_compressed.REMAINDER_KEY])
    return st["master_param"]


@pytest.mark.parametrize("state_dtype", [None, BF16], ids=["m32", "m16"])
@pytest.mark.parametrize("name", list(OPTIMIZERS))
@pytest.mark.parametrize("backend", BACKENDS)
def test_remainder_holds_the_fp32_master_bit_for_bit(backend, name, state_dtype):
    """40 steps with norm clipping, value clipping and one skipped step: the master
    rebuilt from bf16 param + remainder equals master_weights=True's, and the
    moments are the same bits."""
    runs = []
    for mode in (True, "remainder"):
        ps = _params()
        opt = OPTIMIZERS[name](ps, master_weights=mode, backend=backend, max_grad_norm=5.0,
                               max_grad_value=4.0, state_dtype=state_dtype)  # fmt: skip
        runs.append((ps, opt))
    (pa, oa), (pb, ob) = runs
    for step in range(STEPS):
        for ps in (pa, pb):
            for p, g in zip(ps, _grads(step)):
                p.grad = g.clone()
        oa.step()
        ob.step()
        for a, b in zip(pa, pb):
            assert np.array_equal(bits32(_master(oa, a)), bits32(_master(ob, b))), step
            for key, t in oa.state[a].items():
                if key.startswith(("exp_avg", "max_exp")):
                    assert t.dtype == (state_dtype or torch.float32)
                    assert torch.equal(t.view(torch.int16 if t.dtype == BF16 else torch.int32),
                                       ob.state[b][key].view(torch.int16 if t.dtype == BF16
                                                             else torch.int32)), (step, key)
    assert oa.skipped_steps == ob.skipped_steps == 1
    for b in pb:
        assert set(ob.state[b]) >= {_compressed.REMAINDER_KEY} and "master_param" not in ob.state[b]
        assert ob.state[b][_compressed.REMAINDER_KEY].dtype == torch.int16


@pytest.mark.parametrize("scaler_cls", [torch.amp.GradScaler, fastopt.GradScaler])
@pytest.mark.parametrize("backend", BACKENDS)
def test_remainder_lock_step_under_a_grad_scaler(backend, scaler_cls):
    """Loss scaling (unscale in the kernel, an overflowing step skipped, the scale
    backed off) gives the same masters with remainders as with fp32 masters. The
    forward reads the bf16 params, which differ between the modes where a master
    sits exactly on a tie (2^-16 per element and step); this seeded run has none."""
    runs = []
    for mode in (True, "remainder"):
        model = torch.nn.Linear(48, 48).to(BF16)
        init = torch.Generator().manual_seed(0)
        for p in model.parameters():
            torch.nn.init.normal_(p, generator=init)
        opt = fastopt.AdamW(model.parameters(), lr=1e-2, master_weights=mode, backend=backend,
                            max_grad_norm=1.0)  # fmt: skip
        runs.append((model, opt, scaler_cls("cpu", init_scale=2.0**10)))
    gen = torch.Generator().manual_seed(1)
    for step in range(12):
        x = torch.randn(16, 48, generator=gen).to(BF16)
        if step == 5:
            x[0, 0] = math.inf  # an overflow: the scaler's inf check or the norm skips
        for model, opt, scaler in runs:
            loss = model(x).float().square().mean()
            scaler.scale(loss).backward()
            scaler.step(opt)
            scaler.update()
            opt.zero_grad(set_to_none=True)
        (ma, oa, sa), (mb, ob, sb) = runs
        assert sa.get_scale() == sb.get_scale()
        for a, b in zip(ma.parameters(), mb.parameters()):
            assert np.array_equal(bits32(_master(oa, a)), bits32(_master(ob, b))), step
    assert runs[0][2].get_scale() < 2.0**10  # the overflow was seen


@pytest.mark.parametrize("backend", BACKENDS)
def test_skipped_step_leaves_param_and_remainder_unchanged(backend):
    ps = _params()
    opt = fastopt.AdamW(ps, master_weights="remainder", backend=backend, max_grad_norm=1.0)
    for p, g in zip(ps, _grads(0)):
        p.grad = g
    opt.step()
    before = copy.deepcopy([(p.detach().clone(), dict(opt.state[p])) for p in ps])
    for p, g in zip(ps, _grads(17)):  # NaN in one gradient
        p.grad = g
    opt.step()
    assert opt.skipped_steps == 1
    for p, (p0, st0) in zip(ps, before):
        assert np.array_equal(bits16(p), bits16(p0))
        for key, t in st0.items():
            assert torch.equal(opt.state[p][key], t), key


# ---- state dicts ---------------------------------------------------------------------


def _trained(mode, state_dtype=None, backend="cpu", steps=5):
    ps = _params()
    opt = fastopt.AdamW(ps, master_weights=mode, state_dtype=state_dtype, backend=backend)
    for step in range(steps):
        for p, g in zip(ps, _grads(step)):
            p.grad = g
        opt.step()
    return ps, opt


def _through_bytes(sd):
    buf = io.BytesIO()
    torch.save(sd, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=True)


@pytest.mark.parametrize("state_dtype", [None, BF16], ids=["m32", "m16"])
def test_remainder_state_dict_round_trips_bit_for_bit(state_dtype):
    """torch's loader casts the int16 remainder to bf16 by value; the load re-takes
    it from the saved tensor, so every state comes back bit for bit and training
    continues identically."""
    ps, opt = _trained("remainder", state_dtype)
    sd = _through_bytes(opt.state_dict())
    assert sd["state"][0][_compressed.REMAINDER_KEY].dtype == torch.int16
    qs = [torch.nn.Parameter(p.detach().clone()) for p in ps]
    opt2 = fastopt.AdamW(qs, master_weights="remainder", state_dtype=state_dtype, backend="cpu")
    opt2.load_state_dict(sd)
    for p, q in zip(ps, qs):
        for key, t in opt.state[p].items():
            u = opt2.state[q][key]
            assert u.dtype == t.dtype, key
            assert torch.equal(u, t), key
    for p, q, g in zip(ps, qs, _grads(9)):
        p.grad, q.grad = g, g.clone()
    opt.step()
    opt2.step()
    for p, q in zip(ps, qs):
        assert np.array_equal(bits16(p), bits16(q))
        assert np.array_equal(bits32(_master(opt, p)), bits32(_master(opt2, q)))


def test_torch_adamw_checkpoint_loads_with_a_zero_remainder():
    """A plain torch AdamW state dict (no master): the remainder starts at zero, i.e.
    the master is the bf16 parameter exactly; moments become fp32."""
    ps = _params()
    ref = torch.optim.AdamW(ps, lr=1e-3)
    for p, g in zip(ps, _grads(0)):
        p.grad = g
    ref.step()
    sd = _through_bytes(ref.state_dict())
    opt = fastopt.AdamW(ps, master_weights="remainder", backend="cpu")
    opt.load_state_dict(sd)
    for i, p in enumerate(ps):
        st = opt.state[p]
        assert torch.equal(st[_compressed.REMAINDER_KEY], torch.zeros(p.numel(), dtype=torch.int16))
        assert torch.equal(_master(opt, p), p.float())
        assert st["exp_avg"].dtype == torch.float32
        assert torch.equal(st["exp_avg"], sd["state"][i]["exp_avg"].float())
        assert float(st["step"]) == 1.0


def test_master_checkpoints_convert_between_modes():
    """fp32 master -> remainder: parameter and remainder hold that master exactly (the
    parameter is re-split, so a round-half-even tie moves to its away-from-zero
    neighbour); remainder -> fp32 master: the master is the joined value."""
    ps, opt = _trained(True)
    masters = [opt.state[p]["master_param"].clone() for p in ps]
    opt_r = fastopt.AdamW(ps, master_weights="remainder", backend="cpu")
    opt_r.load_state_dict(_through_bytes(opt.state_dict()))
    for p, m in zip(ps, masters):
        assert np.array_equal(bits32(_master(opt_r, p)), bits32(m))
    opt_m = fastopt.AdamW(ps, master_weights=True, backend="cpu")
    opt_m.load_state_dict(_through_bytes(opt_r.state_dict()))
    for p, m in zip(ps, masters):
        assert np.array_equal(bits32(opt_m.state[p]["master_param"]), bits32(m))


def test_fp32_params_with_bf16_moments_load_torch_checkpoints():
    """state_dtype=torch.bfloat16 for fp32 params: a torch fp32 checkpoint's moments
    are rounded to nearest even on load; the bf16 moments round trip bit for bit."""
    ps = _params(dtype=torch.float32)
    ref = torch.optim.AdamW(ps, lr=1e-3)
    for p, g in zip(ps, _grads(0, torch.float32)):
        p.grad = g
    ref.step()
    sd = _through_bytes(ref.state_dict())
    opt = fastopt.AdamW(ps, state_dtype=BF16, backend="cpu")
    opt.load_state_dict(sd)
    for i, p in enumerate(ps):
        assert opt.state[p]["exp_avg_sq"].dtype == BF16
        assert torch.equal(opt.state[p]["exp_avg_sq"], sd["state"][i]["exp_avg_sq"].to(BF16))
    for p, g in zip(ps, _grads(1, torch.float32)):
        p.grad = g
    opt.step()
    opt2 = fastopt.AdamW(ps, state_dtype=BF16, backend="cpu")
    opt2.load_state_dict(_through_bytes(opt.state_dict()))
    for p in ps:
        for key in ("exp_avg", "exp_avg_sq"):
            assert torch.equal(opt2.state[p][key].view(torch.int16),
                               opt.state[p][key].view(torch.int16))  # fmt: skip


def test_a_compressed_optimizer_writes_a_torch_adamw_state_dict():
    """torch_state_dict(): what torch.optim.AdamW loads and steps on, with the moments'
    values (bf16 moments widened exactly) and no fastopt-only keys."""
    ps, opt = _trained("remainder", BF16)
    sd = _through_bytes(opt.torch_state_dict())
    assert all(set(st) == {"step", "exp_avg", "exp_avg_sq"} for st in sd["state"].values())
    ref = torch.optim.AdamW(ps, lr=1e-3)
    ref.load_state_dict(sd)
    for p in ps:
        assert torch.equal(ref.state[p]["exp_avg"].float(), opt.state[p]["exp_avg"].float())
    for p, g in zip(ps, _grads(9)):
        p.grad = g
    ref.step()
    assert all(float(ref.state[p]["step"]) == 6.0 for p in ps)


# ---- NOTE [stale remainder] ----------------------------------------------------------


@pytest.mark.parametrize("how", ["copy_", "data", "load_state_dict"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_parameter_overwritten_from_outside_resets_its_remainder(backend, how):
    """After an outside write the next step runs on exactly the new bf16 value (the
    remainder is zeroed), never on new param + stale remainder."""
    model = torch.nn.Linear(64, 64, bias=False).to(BF16)
    w = model.weight
    opt = fastopt.AdamW(model.parameters(), lr=0.0, weight_decay=0.0,
                        master_weights="remainder", backend=backend)  # fmt: skip
    w.grad = torch.randn_like(w)
    opt.step()
    opt.state[w][_compressed.REMAINDER_KEY].fill_(0x1234)  # a remainder the old value had
    opt.step()  # the optimizer's own state: kept
    assert bool((opt.state[w][_compressed.REMAINDER_KEY] == 0x1234).all())
    new = torch.randn(64, 64).to(BF16)
    with torch.no_grad():
        if how == "copy_":
            w.copy_(new)
        elif how == "data":
            w.data = new.clone()
        else:
            model.load_state_dict({"weight": new})
    opt.step()  # lr = 0: the weight stays what the step rebuilt
    assert np.array_equal(bits16(w), bits16(new))
    assert not bool(opt.state[opt.param_groups[0]["params"][0]][_compressed.REMAINDER_KEY].any())


def test_a_loaded_remainder_is_trusted():
    """A remainder loaded from a checkpoint pairs with the parameter as it is."""
    ps, opt = _trained("remainder", steps=3)
    sd = _through_bytes(opt.state_dict())
    masters = [_master(opt, p).clone() for p in ps]
    opt2 = fastopt.AdamW(ps, lr=0.0, weight_decay=0.0, master_weights="remainder",
                         backend="cpu")  # fmt: skip
    opt2.load_state_dict(sd)
    for g in opt2.param_groups:
        g["lr"], g["weight_decay"] = 0.0, 0.0
    for p in ps:
        p.grad = torch.ones_like(p)
    opt2.step()
    for p, m in zip(ps, masters):
        assert np.array_equal(bits32(_master(opt2, p)), bits32(m))


def test_lawa_averages_the_rebuilt_master_and_keeps_it():
    """LAWA under remainders averages the exact masters and splits the mean back into
    parameter and remainder; the next step starts from that mean, not a reset."""
    from fastopt.averaging import LAWA

    model = torch.nn.Linear(32, 32, bias=False).to(BF16)
    opt = fastopt.AdamW(model.parameters(), lr=1e-2, master_weights="remainder", backend="cpu")
    lawa = LAWA(window=3)
    w = model.weight
    snaps = []
    for step in range(3):
        w.grad = torch.randn_like(w)
        opt.step()
        snaps.append(_master(opt, w).clone())
        if step < 2:
            lawa.snapshot(model, opt)
    lawa.update(model, opt)
    mean = (snaps[0] + snaps[1] + snaps[2]) / 3  # LAWA's order: oldest first, in fp32
    assert np.array_equal(bits32(_master(opt, w)), bits32(mean))
    for g in opt.param_groups:
        g["lr"], g["weight_decay"] = 0.0, 0.0
    w.grad = torch.randn_like(w)
    opt.step()
    assert np.array_equal(bits32(_master(opt, w)), bits32(mean))


# ---- arguments -----------------------------------------------------------------------


def test_bad_arguments_raise_clear_errors():
    p = torch.nn.Parameter(torch.zeros(3))
    with pytest.raises(ValueError, match="master_weights"):
        fastopt.AdamW([p], master_weights="half")
    for bad in (torch.float16, "bf16", 8):
        with pytest.raises(ValueError, match="state_dtype"):
            fastopt.Lion([p], state_dtype=bad)
    assert fastopt.AdEMAMix([p], state_dtype="int8").moment_dtype == "int8"


def test_remainder_is_a_no_op_for_fp32_and_an_fp32_master_for_fp16():
    p32 = torch.nn.Parameter(torch.randn(5))
    p16 = torch.nn.Parameter(torch.randn(5).half())
    opt = fastopt.AdamW([p32, p16], master_weights="remainder", backend="cpu")
    p32.grad, p16.grad = torch.randn(5), torch.randn(5).half()
    opt.step()
    assert set(opt.state[p32]) == {"step", "exp_avg", "exp_avg_sq"}
    assert opt.state[p16]["master_param"].dtype == torch.float32
    assert _compressed.REMAINDER_KEY not in opt.state[p16]


@pytest.mark.parametrize("backend", [b for b in BACKENDS if b != "reference"])
def test_ops_reject_mismatched_master_and_moment_dtypes(backend):
    p, g = torch.zeros(8, dtype=torch.float16), torch.zeros(8, dtype=torch.float16)
    with pytest.raises((RuntimeError, ValueError), match="int16|remainder"):
        F.lion([p], [g], [torch.zeros(8)], [torch.zeros(8, dtype=torch.int16)], lr=0.1,
               beta1=0.9, beta2=0.99, weight_decay=0.0, maximize=False, backend=backend)
    q = torch.zeros(8)
    with pytest.raises((RuntimeError, ValueError), match="moments|exp_avgs"):
        F.lion([q], [q.clone()], [torch.zeros(8, dtype=torch.float16)], [], lr=0.1, beta1=0.9,
               beta2=0.99, weight_decay=0.0, maximize=False, backend=backend)
