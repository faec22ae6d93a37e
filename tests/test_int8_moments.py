"""8-bit moments, ``state_dtype="int8"`` (NOTE [int8 moments] in update_math.h).

* the code itself: the reference (fastopt/_compressed.py) against an encoding
  written out here in numpy, and every kernel against both, bit for bit, on
  blocks chosen for their values (random, zero, tiny, huge, NaN, infinity, a
  short last block);
* the error bound of a block's code, element by element;
* lock step: each kernel against the reference, resynchronised every step,
  over many steps with clipping, value clipping, a skipped step and the
  optimizers' master modes;
* checkpoints: bit-for-bit round trips, torch AdamW checkpoints in and out;
* the rules: small tensors keep fp32, amsgrad is refused, a skipped step
  writes nothing, wrong sizes are named.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from test_capturable import _gpu_backends
from test_compressed import _through_bytes

import fastopt
from fastopt import _compressed
from fastopt import functional as F

BACKENDS = [b for b in ("reference", "cpu", "triton") if b in fastopt.available_backends()]
KERNELS = [b for b in BACKENDS if b != "reference"]
BF16 = torch.bfloat16
BLOCK = _compressed.Q8_BLOCK

# ---- the code, written out independently in numpy --------------------------------------


def np_encode(x: np.ndarray, signed: bool) -> np.ndarray:
    """The uint8 state (codes, then fp32 block scales) of fp32 values ``x``."""
    x = x.astype(np.float32)
    n = x.size
    blocks = -(-n // BLOCK)
    xb = np.zeros(blocks * BLOCK, np.float32)
    xb[:n] = x
    xb = xb.reshape(blocks, BLOCK)
    a = np.abs(xb)
    with np.errstate(invalid="ignore", divide="ignore", over="ignore"):
        s = np.where(np.isnan(a).any(axis=1), np.float32(np.nan), np.nanmax(a, axis=1))
        s = s.astype(np.float32)[:, None]
        # |x| * e * (1 / (s * e)), e = 2^64 for a subnormal s (update_math.h's q8_ratio)
        e = np.where(s < np.float32(2.0**-126), np.float32(2.0**64), np.float32(1))
        usable = (s > 0) & np.isfinite(s)
        inv = np.where(usable, np.float32(1) / np.where(usable, s * e, np.float32(1)),
                       np.float32(0)).astype(np.float32)  # fmt: skip
        r = ((a * e).astype(np.float32) * inv).astype(np.float32)
        r = np.where(r < 1, r, np.where(r >= 1, np.float32(1), np.float32(0))).astype(np.float32)
        if signed:
            q = np.rint(np.sqrt(r) * np.float32(127)).astype(np.int16)
            q = np.where(xb < 0, -q, q).astype(np.int8).view(np.uint8)
        else:
            q = np.rint(np.sqrt(np.sqrt(r)) * np.float32(255)).astype(np.int16)
            q = np.where((q == 0) & (a > 0), 1, q).astype(np.uint8)
    return np.concatenate([q.reshape(-1), s.reshape(-1).view(np.uint8)])


def np_decode(buf: np.ndarray, n: int, signed: bool) -> np.ndarray:
    blocks = -(-n // BLOCK)
    codes = buf[: blocks * BLOCK].reshape(blocks, BLOCK)
    s = buf[blocks * BLOCK :].view(np.float32)[:, None]
    with np.errstate(invalid="ignore", over="ignore"):
        if signed:
            t = codes.view(np.int8).astype(np.float32) * (np.float32(1) / np.float32(127))
            out = (t * np.abs(t)) * s
        else:
            t = codes.astype(np.float32) * (np.float32(1) / np.float32(255))
            out = (t * t) * (t * t) * s
    return out.astype(np.float32).reshape(-1)[:n]


def patterns(seed: int = 0) -> np.ndarray:
    """Blocks chosen for their values, and a short last block: 12 blocks + 37."""
    rng = np.random.default_rng(seed)
    blocks = [
        rng.standard_normal(BLOCK),
        rng.standard_normal(BLOCK) * 1e-30,  # tiny, subnormal quotients
        rng.standard_normal(BLOCK) * 1e30,
        np.zeros(BLOCK),  # an all-zero block: scale 0
        np.r_[3.0e38, rng.standard_normal(BLOCK - 1)],  # a huge top element: tiny codes
        np.r_[np.nan, rng.standard_normal(BLOCK - 1)],  # NaN: the whole block NaN
        np.r_[np.inf, rng.standard_normal(BLOCK - 1)],
        np.r_[-np.inf, rng.standard_normal(BLOCK - 1)],
        np.r_[-0.0, 0.0, 1e-45, -1e-45, rng.standard_normal(BLOCK - 4) * 1e-40],
        np.r_[1.0, np.full(BLOCK - 1, 1e-12)],  # far below the top: codes 0 and 1
        -np.abs(rng.standard_normal(BLOCK)),
        rng.standard_normal(BLOCK) * np.logspace(-20, 0, BLOCK),
        rng.standard_normal(37),
    ]
    return np.concatenate(blocks).astype(np.float32)


@pytest.mark.parametrize("signed", [True, False], ids=["signed", "unsigned"])
def test_reference_code_matches_numpy(signed):
    x = patterns()
    if not signed:
        x = np.abs(x)
    want = np_encode(x, signed)
    got = _compressed.q8_encode(torch.from_numpy(x), signed).numpy()
    assert np.array_equal(got, want)
    dec = _compressed.q8_decode(torch.from_numpy(want), x.size, signed).numpy()
    assert np.array_equal(dec.view(np.uint32), np_decode(want, x.size, signed).view(np.uint32))


def _first_step_moments(backend: str, g: torch.Tensor):
    """AdamW with beta1 = beta2 = 0: after one step m = g (finite g) and v = g*g
    exactly, so the 8-bit state is the code of g (signed) and of g*g (unsigned)."""
    p = torch.zeros_like(g)
    m, v = _compressed.q8_zeros(g.numel(), "cpu"), _compressed.q8_zeros(g.numel(), "cpu")
    F.adamw([p], [g], [m], [v], [], [], [torch.tensor(1.0)], lr=0.0, beta1=0.0, beta2=0.0,
            eps=1e-8, weight_decay=0.0, amsgrad=False, maximize=False, backend=backend)  # fmt: skip
    return m, v


@pytest.mark.parametrize("backend", BACKENDS)
def test_kernels_code_bit_for_bit(backend):
    """The state a kernel writes is the numpy code of the values, byte for byte, for
    every pattern; several chunks of the CPU and Triton plans (70001 elements)."""
    x = patterns()
    rest = np.random.default_rng(1).standard_normal(70001 - x.size).astype(np.float32)
    g = torch.from_numpy(np.concatenate([x, rest]))
    m, v = _first_step_moments(backend, g)
    # m = lerp(0, g, 1) is g, except that an infinite g gives NaN (inf - inf)
    assert np.array_equal(m.numpy(), np_encode(torch.zeros_like(g).lerp(g, 1.0).numpy(), True))
    sq = (g * g).numpy()
    assert np.array_equal(v.numpy(), np_encode(sq, False))


@pytest.mark.parametrize("backend", BACKENDS)
def test_decoding_then_coding_gives_back_the_same_bytes(backend):
    """A step that keeps a moment (Lion with beta2 = 1: m = lerp(m, g, 0) is its
    decoded value; AdamW with beta2 = 1: v = v) codes it back to the same bytes:
    decoding in the kernel is the reference's decoding, and every block's top
    element decodes to its scale."""
    g = torch.from_numpy(patterns(2))
    g = torch.where(g.isfinite(), g, 1.0)  # finite: lerp(m, g, 0) is m exactly
    m, v = _first_step_moments("reference", g)
    m0, v0 = m.clone(), v.clone()
    p = torch.zeros_like(g)
    F.lion([p], [g.flip(0)], [m], [], lr=1e-3, beta1=0.9, beta2=1.0, weight_decay=0.0,
           maximize=False, backend=backend)  # fmt: skip
    assert torch.equal(m, m0)
    F.adamw([p], [g], [m], [v], [], [], [torch.tensor(2.0)], lr=1e-3, beta1=0.0, beta2=1.0,
            eps=1e-8, weight_decay=0.0, amsgrad=False, maximize=False, backend=backend)  # fmt: skip
    assert torch.equal(v, v0)


@pytest.mark.parametrize("signed", [True, False], ids=["signed", "unsigned"])
def test_error_bound_of_every_element(signed):
    """|x - decode(code(x))| per element, against what the code's resolution allows
    in its block of scale s (r = |x|/s, d = half a code step):
    signed, code c = rint(127 sqrt r): s * ((sqrt r + d)^2 - r) with d = 0.5/127;
    unsigned, c = rint(255 r^(1/4)): s * ((r^(1/4) + d)^4 - r) with d = 0.5/255, and
    up to s / 255^4 where a tiny v > 0 takes code 1 instead of 0.
    Plus 8 fp32 ulps of s for the arithmetic. The top element is exact."""
    rng = np.random.default_rng(3)
    x = (rng.standard_normal(64 * BLOCK) * np.logspace(-12, 3, 64 * BLOCK)).astype(np.float32)
    if not signed:
        x = np.abs(x)
    buf = np_encode(x, signed)
    got = _compressed.q8_decode(torch.from_numpy(buf), x.size, signed).numpy().astype(np.float64)
    xb = x.astype(np.float64).reshape(-1, BLOCK)
    s = np.abs(xb).max(axis=1, keepdims=True)
    r = np.abs(xb) / s
    if signed:
        d = 0.5 / 127
        bound = s * ((np.sqrt(r) + d) ** 2 - r)
    else:
        d = 0.5 / 255
        bound = s * np.maximum((r**0.25 + d) ** 4 - r, 1 / 255**4)
    bound += 8 * np.spacing(s.astype(np.float32)).astype(np.float64)
    err = np.abs(got.reshape(-1, BLOCK) - xb)
    assert (err <= bound).all(), float((err / bound).max())
    top = np.abs(xb).argmax(axis=1)
    assert np.array_equal(np.abs(got.reshape(-1, BLOCK)[np.arange(64), top]), s[:, 0])


# ---- lock step against the reference --------------------------------------------------

OPTIMIZERS = {
    "adamw": lambda ps, **kw: fastopt.AdamW(ps, lr=3e-3, weight_decay=0.1, **kw),
    "lion": lambda ps, **kw: fastopt.Lion(ps, lr=1e-3, weight_decay=0.1, **kw),
    "ademamix": lambda ps, **kw: fastopt.AdEMAMix(ps, lr=3e-3, t_alpha=20, t_beta3=20, **kw),
}
MODES = {  # param dtype, master_weights
    "fp32": (torch.float32, False),
    "bf16-remainder": (BF16, "remainder"),
    "bf16-master": (BF16, True),
    "bf16": (BF16, False),
}
SIZES = (5, 4096, 9000 + 3)  # one stays fp32 (below Q8_MIN_NUMEL), a short last block
STEPS = 12


def _params(dtype, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return [torch.nn.Parameter(torch.randn(n, generator=gen).to(dtype)) for n in SIZES]


def _grads(step, dtype):
    gen = torch.Generator().manual_seed(100 + step)
    out = [(torch.randn(n, generator=gen) * (1 + step % 3)).to(dtype) for n in SIZES]
    if step == 7:
        out[2][11] = math.nan  # a non-finite norm: the whole step is skipped
    return out


def _sync(src, dst, ps_src, ps_dst):
    """Make dst's params and states the same bits as src's (across devices too)."""
    with torch.no_grad():
        for a, b in zip(ps_src, ps_dst):
            b.copy_(a)
            for key, t in src.state[a].items():
                if key != "step":
                    dst.state[b][key].copy_(t)
                if key == _compressed.REMAINDER_KEY:  # our own write: trust it
                    _compressed.forget(dst.state[b][key])


def _assert_moments_close(a: torch.Tensor, b: torch.Tensor, n: int, key: str):
    """Two sides' 8-bit moments after one step from the same state: the same bytes,
    except where one side's fp32 value sat an ulp from a code's rounding edge
    (torch's vectorised ops and the kernels may differ by an ulp in v): a
    neighbouring code, in at most 1 element in 1000, and the scale an ulp apart."""
    if not _compressed.is_q8(a):
        torch.testing.assert_close(a, b, rtol=2e-6, atol=0)
        return
    signed = _compressed.is_signed(key)
    da, db = (_compressed.q8_decode(t, n, signed) for t in (a, b))
    blocks = -(-n // BLOCK)
    sa = a[blocks * BLOCK :].view(torch.float32)
    sb = b[blocks * BLOCK :].view(torch.float32)
    torch.testing.assert_close(sa, sb, rtol=1e-6, atol=0)
    codes_a = a[:n].view(torch.int8).to(torch.int16) if signed else a[:n].to(torch.int16)
    codes_b = b[:n].view(torch.int8).to(torch.int16) if signed else b[:n].to(torch.int16)
    diff = (codes_a - codes_b).abs()
    assert int(diff.max()) <= 1 and int((diff > 0).sum()) <= max(1, n // 1000), key
    assert torch.isfinite(da).all() and torch.isfinite(db).all()


@pytest.mark.parametrize("mode", list(MODES))
@pytest.mark.parametrize("name", list(OPTIMIZERS))
@pytest.mark.parametrize("backend", KERNELS)
def test_lock_step_against_the_reference(backend, name, mode):
    """12 steps, norm and value clipping, one skipped step: each step starts both
    sides from the kernel side's bits, and after it the moments agree (above) and
    the weights to the ulp budget of one fp32 step (2e-6 relative, 1e-7 absolute:
    the reference's addcdiv and the kernels' may round the quotient differently)."""
    _lock_step(backend, name, mode, torch.device("cpu"))


def _lock_step(backend, name, mode, device):
    dtype, master = MODES[mode]
    sides = []
    for b in (backend, "reference"):
        ps = _params(dtype)
        if b != "reference":
            ps = [torch.nn.Parameter(p.detach().to(device)) for p in ps]
        opt = OPTIMIZERS[name](ps, backend=b, master_weights=master, state_dtype="int8",
                               max_grad_norm=20.0, max_grad_value=2.5)  # fmt: skip
        sides.append((ps, opt))
    (pk, ok), (pr, orf) = sides
    for step in range(STEPS):
        for ps in (pk, pr):
            for p, g in zip(ps, _grads(step, dtype)):
                p.grad = g.to(p.device)
        if step:
            _sync(ok, orf, pk, pr)
        ok.step()
        orf.step()
        for a, b, n in zip(pk, pr, SIZES):
            for key, t in ok.state[a].items():
                if key.startswith("exp_avg"):
                    assert t.dtype == (torch.uint8 if n >= 4096 else torch.float32)
                    _assert_moments_close(t.cpu(), orf.state[b][key], n, key)
            wa = _weights(ok, a).cpu()
            wb = _weights(orf, b)
            torch.testing.assert_close(wa, wb, rtol=2e-6, atol=1e-7)
    assert ok.skipped_steps == orf.skipped_steps == 1


@pytest.mark.gpu
@pytest.mark.parametrize("backend", _gpu_backends())
def test_gpu_kernels_code_bit_for_bit(backend):
    """The CUDA and compiled Triton kernels write the numpy code byte for byte
    (70001 elements: two CUDA chunks, several Triton programs)."""
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    x = patterns()
    rest = np.random.default_rng(1).standard_normal(70001 - x.size).astype(np.float32)
    g = torch.from_numpy(np.concatenate([x, rest]))
    p = torch.zeros_like(g).cuda()
    m, v = (_compressed.q8_zeros(g.numel(), "cuda") for _ in range(2))
    F.adamw([p], [g.cuda()], [m], [v], [], [], [torch.tensor(1.0, device="cuda")], lr=0.0,
            beta1=0.0, beta2=0.0, eps=1e-8, weight_decay=0.0, amsgrad=False, maximize=False,
            backend=backend)  # fmt: skip
    assert np.array_equal(m.cpu().numpy(), np_encode(torch.zeros_like(g).lerp(g, 1.0).numpy(), True))
    assert np.array_equal(v.cpu().numpy(), np_encode((g * g).numpy(), False))


@pytest.mark.gpu
@pytest.mark.parametrize("mode", list(MODES))
@pytest.mark.parametrize("name", list(OPTIMIZERS))
@pytest.mark.parametrize("backend", _gpu_backends())
def test_gpu_lock_step_against_the_reference(backend, name, mode):
    """test_lock_step_against_the_reference with the kernel side on the GPU."""
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    _lock_step(backend, name, mode, torch.device("cuda"))


def _weights(opt, p):
    st = opt.state[p]
    if _compressed.REMAINDER_KEY in st:
        return _compressed.join(p, st[_compressed.REMAINDER_KEY])
    return st.get("master_param", p.detach()).float()


@pytest.mark.parametrize("backend", BACKENDS)
def test_grad_scaler_and_a_skipped_step_write_nothing(backend):
    """An overflowing scaled step leaves param, remainder and 8-bit moments bitwise
    unchanged; the next step goes through."""
    ps = _params(BF16)
    opt = fastopt.AdamW(ps, lr=1e-3, master_weights="remainder", state_dtype="int8",
                        backend=backend)  # fmt: skip
    scaler = fastopt.GradScaler("cpu", init_scale=2.0**8)
    before = None
    for step in range(3):
        xs = [g.float() for g in _grads(step, torch.float32)]
        if step == 1:
            xs[1][3] = math.inf  # an overflowing gradient
            before = [(p.detach().clone(), {k: v.clone() for k, v in opt.state[p].items()})
                      for p in ps]  # fmt: skip
        loss = sum((p.float() * x).sum() for p, x in zip(ps, xs))
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()
        opt.zero_grad(set_to_none=True)
        if step == 1:
            for p, (p0, st0) in zip(ps, before):
                assert torch.equal(p.detach().view(torch.int16), p0.view(torch.int16))
                for k, v in st0.items():
                    assert torch.equal(opt.state[p][k], v), k
    assert opt.skipped_steps == 1
    assert opt.state[ps[2]]["exp_avg"].dtype == torch.uint8


# ---- checkpoints ------------------------------------------------------------------------


def _trained(opt_cls=fastopt.AdamW, dtype=BF16, master="remainder", steps=3, **kw):
    ps = _params(dtype)
    opt = opt_cls(ps, lr=1e-2, master_weights=master, state_dtype="int8", **kw)
    for step in range(steps):
        for p, g in zip(ps, _grads(step + 20, dtype)):
            p.grad = g
        opt.step()
    return ps, opt


@pytest.mark.parametrize("opt_cls", [fastopt.AdamW, fastopt.Lion, fastopt.AdEMAMix])
def test_state_dict_round_trips_bit_for_bit(opt_cls):
    ps, opt = _trained(opt_cls)
    sd = opt.state_dict()  # NOTE [8-bit moments in checkpoints]: decoded, shaped like p
    for i, p in enumerate(ps):
        assert sd["state"][i]["exp_avg"].dtype == torch.float32
        assert sd["state"][i]["exp_avg"].shape == p.shape
    assert opt.state[ps[2]]["exp_avg"].dtype == torch.uint8  # the live state stays 8-bit
    qs = [torch.nn.Parameter(p.detach().clone()) for p in ps]
    opt2 = opt_cls(qs, lr=1e-2, master_weights="remainder", state_dtype="int8")
    opt2.load_state_dict(_through_bytes(opt.state_dict()))
    for p, q in zip(ps, qs):
        assert opt.state[p].keys() == opt2.state[q].keys()
        for k, t in opt.state[p].items():
            assert t.dtype == opt2.state[q][k].dtype and torch.equal(t, opt2.state[q][k]), k
    # and both continue identically
    for ps_, o in ((ps, opt), (qs, opt2)):
        for p, g in zip(ps_, _grads(40, BF16)):
            p.grad = g
        o.step()
    for p, q in zip(ps, qs):
        assert torch.equal(p.detach().view(torch.int16), q.detach().view(torch.int16))


def test_torch_checkpoints_in_and_out():
    """A torch AdamW checkpoint loads into 8-bit moments (coded on load); an 8-bit
    optimizer writes a torch AdamW state dict (decoded, shaped like the params),
    which torch steps on, and which codes back to the same bytes; 8-bit
    checkpoints load into an fp32-moment optimizer decoded."""
    ps, opt = _trained(dtype=torch.float32, master=False)
    sd = _through_bytes(opt.torch_state_dict())
    for i, p in enumerate(ps):
        for k in ("exp_avg", "exp_avg_sq"):
            v = sd["state"][i][k]
            assert v.dtype == torch.float32 and v.shape == p.shape
            want = _compressed.moment_values(opt.state[p][k], p, k)
            assert torch.equal(v, want.float())
    tq = [torch.nn.Parameter(p.detach().clone()) for p in ps]
    ta = torch.optim.AdamW(tq, lr=1e-2)
    ta.load_state_dict(_through_bytes(sd))
    for p, g in zip(tq, _grads(41, torch.float32)):
        p.grad = g
    ta.step()
    opt3 = fastopt.AdamW([torch.nn.Parameter(p.detach().clone()) for p in ps], lr=1e-2,
                         state_dtype="int8")  # fmt: skip
    opt3.load_state_dict(sd)
    for p, q in zip(ps, opt3.param_groups[0]["params"]):
        for k in ("exp_avg", "exp_avg_sq"):
            assert torch.equal(opt.state[p][k], opt3.state[q][k]), k
    opt4 = fastopt.AdamW([torch.nn.Parameter(p.detach().clone()) for p in ps], lr=1e-2)
    opt4.load_state_dict(_through_bytes(opt.state_dict()))
    for p, q in zip(ps, opt4.param_groups[0]["params"]):
        assert opt4.state[q]["exp_avg"].dtype == torch.float32
        assert torch.equal(opt4.state[q]["exp_avg"],
                           _compressed.moment_values(opt.state[p]["exp_avg"], p, "exp_avg"))


# ---- the rules --------------------------------------------------------------------------


def test_small_tensors_keep_fp32_and_bytes_are_what_the_note_says():
    ps, opt = _trained(dtype=torch.float32, master=False)
    st = [opt.state[p]["exp_avg"] for p in ps]
    assert st[0].dtype == torch.float32 and st[0].shape == ps[0].shape
    for t, n in zip(st[1:], SIZES[1:]):
        assert t.dtype == torch.uint8 and t.shape == (_compressed.q8_bytes(n),)
        assert t.numel() == -(-n // 256) * 260


def test_amsgrad_is_refused_clearly():
    with pytest.raises(ValueError, match="amsgrad.*int8"):
        fastopt.AdamW(_params(torch.float32), amsgrad=True, state_dtype="int8")
    opt = fastopt.AdamW(_params(torch.float32), state_dtype="int8")
    opt.param_groups[0]["amsgrad"] = True
    for p in opt.param_groups[0]["params"]:
        p.grad = torch.ones_like(p)
    with pytest.raises(ValueError, match="amsgrad"):
        opt.step()


@pytest.mark.parametrize("backend", KERNELS)
def test_ops_name_a_wrong_size(backend):
    p, g = torch.zeros(5000), torch.ones(5000)
    bad = torch.zeros(5000, dtype=torch.uint8)
    good = _compressed.q8_zeros(5000, "cpu")
    with pytest.raises((RuntimeError, ValueError), match="exp_avg|size|bytes"):
        F.adamw([p], [g], [bad], [good], [], [], [torch.tensor(1.0)], lr=1e-3, beta1=0.9,
                beta2=0.99, eps=1e-8, weight_decay=0.0, amsgrad=False, maximize=False,
                backend=backend)  # fmt: skip
    assert torch.equal(p, torch.zeros(5000)) and torch.equal(good, _compressed.q8_zeros(5000, "cpu"))
