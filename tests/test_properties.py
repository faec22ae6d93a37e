"""Property-based checks (hypothesis) over shapes, dtypes and hyperparameters.

Every backend is checked against the reference backend. fp32 at torch's default
tolerance; bf16/fp16 storage: both sides compute in fp32 and round once per
store, so they may differ by one unit in the last place of the storage dtype
where the fp32 intermediates differ by an ulp (operation order, contraction);
the tolerance is one ulp of the storage dtype at the value's magnitude
(rtol 2^-7 for bf16, 2^-10 for fp16). Without master weights the moments
themselves are stored in bf16/fp16, so a one-ulp difference in a stored moment
(relative 2^-8 / 2^-11) feeds the next update, which moves the parameter by
up to ~lr * (a few): parameters then get an extra absolute allowance of
steps * lr * 8 * ulp. That is still far tighter than a pure bf16 torch run,
whose error is many ulps after a few steps.
"""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import fastopt

# The triton backend runs under the Triton interpreter here (numpy, one program
# at a time), which is ~100x slower than the compiled backends: fewer examples.
SLOW_BACKENDS = {"triton"}
SETTINGS = settings(max_examples=25, deadline=None)
FEW = settings(SETTINGS, max_examples=6)


def _examples(backend):
    return FEW if backend in SLOW_BACKENDS else SETTINGS

TOL = {
    torch.float32: dict(rtol=1.3e-6, atol=1e-5),
    torch.bfloat16: dict(rtol=2**-7, atol=1e-5),
    torch.float16: dict(rtol=2**-10, atol=1e-5),
}

shapes = st.lists(
    st.one_of(
        st.integers(0, 2100).map(lambda n: (n,)),
        st.tuples(st.integers(1, 40), st.integers(1, 40)),
    ),
    min_size=1,
    max_size=6,
)
dtypes = st.sampled_from([torch.float32, torch.bfloat16, torch.float16])


def _run(opt_cls, backend, shapes, dtype, hp, steps, seed, master):
    gen = torch.Generator().manual_seed(seed)
    base = [torch.randn(s, generator=gen).to(dtype) for s in shapes]
    pa = [b.clone().requires_grad_(True) for b in base]
    pb = [b.clone().requires_grad_(True) for b in base]
    a = opt_cls(pa, backend="reference", master_weights=master, **hp)
    b = opt_cls(pb, backend=backend, master_weights=master, **hp)
    for _ in range(steps):
        grads = [torch.randn(s, generator=gen).to(dtype) for s in shapes]
        for p, q, g in zip(pa, pb, grads):
            p.grad, q.grad = g.clone(), g.clone()
        a.step()
        b.step()
    tol = dict(TOL[dtype])
    if dtype != torch.float32 and not master:
        tol["atol"] += steps * hp["lr"] * 8 * tol["rtol"]
    for p, q in zip(pa, pb):
        torch.testing.assert_close(q, p, **tol)
        for k, v in a.state[p].items():
            t = dict(TOL[v.dtype]) if v.is_floating_point() else {}
            if v.dtype != torch.float32 and t:
                t["rtol"] *= 2  # a stored moment may carry last step's one-ulp difference
            torch.testing.assert_close(b.state[q][k], v, **t)
    if a.last_grad_norm is not None:
        torch.testing.assert_close(b.last_grad_norm, a.last_grad_norm, rtol=1e-5, atol=1e-6)


ADAMW_ARGS = dict(
    shapes=shapes, dtype=dtypes, lr=st.floats(1e-5, 1e-1), beta1=st.floats(0.0, 0.99),
    beta2=st.floats(0.5, 0.9999), eps=st.floats(1e-10, 1e-3), wd=st.floats(0.0, 0.5),
    amsgrad=st.booleans(), maximize=st.booleans(),
    clip=st.one_of(st.none(), st.floats(1e-2, 10.0)), master=st.booleans(),
    steps=st.integers(1, 4), seed=st.integers(0, 2**16),
)
LION_ARGS = dict(
    shapes=shapes, dtype=dtypes, lr=st.floats(1e-5, 1e-1), beta1=st.floats(0.0, 0.99),
    beta2=st.floats(0.0, 0.999), wd=st.floats(0.0, 0.5), maximize=st.booleans(),
    clip=st.one_of(st.none(), st.floats(1e-2, 10.0)), master=st.booleans(),
    steps=st.integers(1, 4), seed=st.integers(0, 2**16),
)


def test_adamw_backends_agree_with_reference(backend):
    @_examples(backend)
    @given(**ADAMW_ARGS)
    def check(shapes, dtype, lr, beta1, beta2, eps, wd, amsgrad, maximize, clip, master,
              steps, seed):
        hp = dict(lr=lr, betas=(beta1, beta2), eps=eps, weight_decay=wd, amsgrad=amsgrad,
                  maximize=maximize, max_grad_norm=clip)
        _run(fastopt.AdamW, backend, shapes, dtype, hp, steps, seed, master)

    check()


def test_lion_backends_agree_with_reference(backend):
    @_examples(backend)
    @given(**LION_ARGS)
    def check(shapes, dtype, lr, beta1, beta2, wd, maximize, clip, master, steps, seed):
        hp = dict(lr=lr, betas=(beta1, beta2), weight_decay=wd, maximize=maximize,
                  max_grad_norm=clip)
        _run(fastopt.Lion, backend, shapes, dtype, hp, steps, seed, master)

    check()


def test_fp32_adamw_matches_torch(backend):
    @_examples(backend)
    @given(
        shapes=shapes, lr=st.floats(1e-5, 1e-1),
        betas=st.tuples(st.floats(0.0, 0.99), st.floats(0.5, 0.9999)),
        eps=st.floats(1e-10, 1e-3), wd=st.floats(0.0, 0.5), amsgrad=st.booleans(),
        maximize=st.booleans(), seed=st.integers(0, 2**16),
    )
    def check(shapes, lr, betas, eps, wd, amsgrad, maximize, seed):
        gen = torch.Generator().manual_seed(seed)
        base = [torch.randn(s, generator=gen) for s in shapes]
        pa = [b.clone().requires_grad_(True) for b in base]
        pb = [b.clone().requires_grad_(True) for b in base]
        hp = dict(lr=lr, betas=betas, eps=eps, weight_decay=wd, amsgrad=amsgrad,
                  maximize=maximize)
        ref = torch.optim.AdamW(pa, foreach=False, **hp)
        opt = fastopt.AdamW(pb, backend=backend, **hp)
        for _ in range(3):
            grads = [torch.randn(s, generator=gen) for s in shapes]
            for p, q, g in zip(pa, pb, grads):
                p.grad, q.grad = g.clone(), g.clone()
            ref.step()
            opt.step()
            for p, q in zip(pa, pb):
                torch.testing.assert_close(q, p)
                for k, v in ref.state[p].items():
                    torch.testing.assert_close(opt.state[q][k], v)

    check()


def test_property_tolerance_is_not_vacuous():
    """The bf16 tolerance above is tight enough to catch a real math error."""
    x = torch.ones(4, dtype=torch.bfloat16)
    wrong = x * (1 + 2**-6)  # two ulps off
    with pytest.raises(AssertionError):
        torch.testing.assert_close(wrong, x, **TOL[torch.bfloat16])
