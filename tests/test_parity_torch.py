"""Lock-step parity with torch.optim.AdamW(foreach=False), on every CPU-capable backend.

Both optimizers see identical gradients each step and are compared after
every step, parameters and every state tensor, as torch's own optimizer suite
does. fp32 uses torch's default assert_close tolerance (rtol 1.3e-6, atol
1e-5): fastopt computes m as b1*m + (1-b1)*g where torch uses lerp, and the
compiled kernels may contract multiply-adds, so agreement is to rounding, not
bitwise.
"""

import pytest
import torch
from conftest import assert_state_equal, clone_params, set_grads

import fastopt

ADAM_KEYS = ("step", "exp_avg", "exp_avg_sq")


def _lockstep(shapes, steps, backend, *, torch_kwargs=None, groups=None, none_every=None,
              dtype=torch.float32, seed=0, scheduler=None):
    gen = torch.Generator().manual_seed(seed)
    base = [torch.randn(s, generator=gen, dtype=dtype) for s in shapes]
    pa, pb = clone_params(base), clone_params(base)
    kw = dict(torch_kwargs or {})
    if groups is not None:
        ga = [dict(g, params=[pa[i] for i in g["params"]]) for g in groups]
        gb = [dict(g, params=[pb[i] for i in g["params"]]) for g in groups]
    else:
        ga, gb = pa, pb
    ref = torch.optim.AdamW(ga, foreach=False, **kw)
    opt = fastopt.AdamW(gb, backend=backend, **kw)
    scheds = []
    if scheduler is not None:
        scheds = [scheduler(ref), scheduler(opt)]
    keys = ADAM_KEYS + (("max_exp_avg_sq",) if kw.get("amsgrad") else ())
    for step in range(steps):
        grads = []
        for i, p in enumerate(base):
            if none_every and step % (i + none_every) == 1:
                grads.append(None)
            else:
                grads.append(torch.randn(p.shape, generator=gen, dtype=dtype))
        set_grads(pa, grads)
        set_grads(pb, grads)
        ref.step()
        opt.step()
        for s in scheds:
            s.step()
        assert_state_equal(ref, pa, opt, pb, keys)
    return ref, opt, pa, pb


@pytest.mark.parametrize("numel", [0, 1, 3, 1025, 65543])
@pytest.mark.parametrize("weight_decay", [0.0, 0.1])
def test_sizes(backend, numel, weight_decay):
    _lockstep([(numel,)], 5, backend, torch_kwargs=dict(lr=1e-2, weight_decay=weight_decay))


def test_large_tensor(backend):
    _lockstep([(2**20 + 7,)], 3, backend, torch_kwargs=dict(lr=1e-3, weight_decay=0.1))


def test_many_small_tensors(backend):
    shapes = [((i * 7) % 13 + 1, (i % 5) + 1) for i in range(2000)]
    # Under the Triton interpreter every program runs in Python: two steps there.
    _lockstep(shapes, 2 if backend == "triton" else 3, backend, torch_kwargs=dict(lr=1e-2))


@pytest.mark.parametrize("amsgrad", [False, True])
@pytest.mark.parametrize("maximize", [False, True])
def test_modes(backend, amsgrad, maximize):
    _lockstep([(37, 5), (1025,), (3,)], 8, backend,
              torch_kwargs=dict(lr=3e-3, betas=(0.8, 0.95), eps=1e-6, weight_decay=0.05,
                                amsgrad=amsgrad, maximize=maximize))


def test_param_groups_with_different_hyperparameters(backend):
    groups = [
        dict(params=[0, 1], lr=1e-2, weight_decay=0.0),
        dict(params=[2], lr=3e-3, betas=(0.5, 0.9), eps=1e-4, amsgrad=True),
        dict(params=[3, 4], weight_decay=0.3, maximize=True),
    ]
    _lockstep([(17,), (4, 4), (129,), (3, 3, 3), (1,)], 6, backend, groups=groups,
              torch_kwargs=dict(lr=1e-3))


def test_grad_none_for_some_steps(backend):
    # Tensors get different per-tensor step counts: bias correction is per tensor.
    ref, opt, pa, pb = _lockstep([(11,), (23,), (5, 7), (64,)], 9, backend, none_every=2,
                                 torch_kwargs=dict(lr=1e-2))
    steps = sorted({float(opt.state[p]["step"]) for p in pb})
    assert len(steps) > 1, "the test must exercise different per-tensor steps"


def test_with_scheduler(backend):
    sched = lambda o: torch.optim.lr_scheduler.OneCycleLR(o, max_lr=0.05, total_steps=20)  # noqa: E731
    _lockstep([(33,), (8, 8)], 10, backend, scheduler=sched, torch_kwargs=dict(lr=1e-2))


def test_tensor_lr(backend):
    _lockstep([(65,)], 4, backend, torch_kwargs=dict(lr=torch.tensor(3e-3)))


def test_complex_params(backend):
    _lockstep([(9,), (4, 3)], 6, backend, dtype=torch.complex64,
              torch_kwargs=dict(lr=1e-2, weight_decay=0.1, amsgrad=True))


def test_no_grad_param_gets_no_state(backend):
    a, b = torch.randn(4, requires_grad=True), torch.randn(4, requires_grad=True)
    opt = fastopt.AdamW([a, b], backend=backend)
    a.grad = torch.randn(4)
    before = b.detach().clone()
    opt.step()
    assert len(opt.state[b]) == 0 and "exp_avg" in opt.state[a]
    assert torch.equal(b, before)


@pytest.mark.parametrize("dtype", [torch.float64, torch.complex128])
def test_double_precision_matches_torch(backend, dtype):
    """float64 storage is computed in float64 (by the reference path), as torch does."""
    ref, opt, pa, pb = _lockstep([(33,), (4, 5)], 5, backend, dtype=dtype,
                                 torch_kwargs=dict(lr=1e-2, amsgrad=True, weight_decay=0.1))
    for a, b in zip(pa, pb):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
