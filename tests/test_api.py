"""torch.optim compatibility: construction, errors, hooks, schedulers, state dicts, pickling."""

import copy
import io
import pickle

import pytest
import torch
from conftest import assert_state_equal, clone_params, set_grads

import fastopt
import fastopt._gather

# ---- construction and validation ------------------------------------------------------


def test_signature_matches_torch_adamw():
    import inspect

    ours = inspect.signature(fastopt.AdamW.__init__).parameters
    theirs = inspect.signature(torch.optim.AdamW.__init__).parameters
    for name, param in theirs.items():
        assert name in ours, name
        assert ours[name].kind == param.kind, name
        if name not in ("params", "self"):
            assert ours[name].default == param.default, name
    assert list(ours)[: len(theirs)] == list(theirs)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(lr=-1.0), "Invalid learning rate"),
        (dict(eps=-1e-8), "Invalid epsilon"),
        (dict(weight_decay=-0.1), "Invalid weight_decay"),
        (dict(betas=(1.0, 0.999)), "Invalid beta parameter at index 0"),
        (dict(betas=(0.9, -0.1)), "Invalid beta parameter at index 1"),
        (dict(max_grad_norm=0.0), "max_grad_norm"),
        (dict(max_grad_norm=float("nan")), "max_grad_norm"),
        (dict(lr=torch.tensor([1e-3, 1e-3])), "Tensor lr must be 1-element"),
    ],
)
def test_bad_hyperparameters_raise_value_error(kwargs, match):
    with pytest.raises(ValueError, match=match):
        fastopt.AdamW([torch.zeros(2, requires_grad=True)], **kwargs)


def test_lion_bad_hyperparameters():
    with pytest.raises(ValueError, match="Invalid learning rate"):
        fastopt.Lion([torch.zeros(2, requires_grad=True)], lr=-1)
    with pytest.raises(ValueError, match="index 1"):
        fastopt.Lion([torch.zeros(2, requires_grad=True)], betas=(0.9, 1.0))


def test_differentiable_not_implemented():
    with pytest.raises(NotImplementedError, match="differentiable"):
        fastopt.AdamW([torch.zeros(2, requires_grad=True)], differentiable=True)


@pytest.mark.parametrize("flags", [dict(fused=True), dict(foreach=True), dict(capturable=True)])
def test_compat_flags_accepted(flags):
    p = torch.randn(4, requires_grad=True)
    opt = fastopt.AdamW([p], **flags)
    p.grad = torch.ones(4)
    opt.step()
    assert all(opt.param_groups[0][k] == v for k, v in flags.items())


def test_unknown_and_unavailable_backends():
    with pytest.raises(ValueError, match="unknown backend 'gpu'"):
        fastopt.AdamW([torch.zeros(1, requires_grad=True)], backend="gpu")
    for name in ("cpu", "triton", "cuda"):
        if name not in fastopt.available_backends():
            with pytest.raises(RuntimeError, match=f"backend '{name}' is not available: .+"):
                fastopt.AdamW([torch.zeros(1, requires_grad=True)], backend=name)
    assert "reference" in fastopt.available_backends()


def test_cuda_backend_not_available_without_device():
    if torch.cuda.is_available():
        pytest.skip("a CUDA device is present; the no-device message cannot be shown")
    with pytest.raises(RuntimeError, match="cuda"):
        fastopt.AdamW([torch.zeros(1, requires_grad=True)], backend="cuda")


def test_sparse_gradient_names_the_parameter():
    a, b = torch.randn(3, requires_grad=True), torch.randn(5, requires_grad=True)
    opt = fastopt.AdamW([{"params": [a]}, {"params": [b]}])
    a.grad = torch.ones(3)
    b.grad = torch.sparse_coo_tensor([[1]], [1.0], (5,))
    snap = (a.detach().clone(), b.detach().clone())
    with pytest.raises(RuntimeError, match=r"sparse.*param_groups\[1\]\['params'\]\[0\]"):
        opt.step()
    assert torch.equal(a, snap[0]) and torch.equal(b, snap[1])


def test_lion_rejects_complex():
    with pytest.raises(TypeError, match="complex"):
        fastopt.Lion([torch.zeros(2, dtype=torch.complex64, requires_grad=True)])
    opt = fastopt.Lion([torch.zeros(2, requires_grad=True)])
    with pytest.raises(TypeError, match="complex"):
        opt.add_param_group({"params": [torch.zeros(2, dtype=torch.complex64, requires_grad=True)]})


# ---- the torch.optim surface --------------------------------------------------------------


def test_named_parameters_and_add_param_group():
    model = torch.nn.Linear(3, 2)
    opt = fastopt.AdamW(model.named_parameters(), lr=1e-2)
    assert opt.param_groups[0]["param_names"] == ["weight", "bias"]
    extra = torch.randn(4, requires_grad=True)
    opt.add_param_group({"params": [extra], "param_names": ["extra"], "lr": 0.5})
    assert opt.param_groups[1]["lr"] == 0.5 and opt.param_groups[1]["betas"] == (0.9, 0.999)
    model(torch.randn(2, 3)).sum().backward()
    extra.grad = torch.ones(4)
    opt.step()
    assert float(opt.state[extra]["step"]) == 1.0


def test_closure_and_zero_grad():
    p = torch.randn(5, requires_grad=True)
    opt = fastopt.AdamW([p])

    def closure():
        opt.zero_grad()
        loss = (p**2).sum()
        loss.backward()
        return loss

    loss = opt.step(closure)
    assert isinstance(loss, torch.Tensor) and loss.item() > 0
    opt.zero_grad(set_to_none=True)
    assert p.grad is None
    p.grad = torch.ones(5)
    opt.zero_grad(set_to_none=False)
    assert torch.equal(p.grad, torch.zeros(5))


def test_step_and_state_dict_hooks():
    p = torch.randn(3, requires_grad=True)
    opt = fastopt.AdamW([p])
    calls = []
    opt.register_step_pre_hook(lambda o, a, k: calls.append("pre"))
    opt.register_step_post_hook(lambda o, a, k: calls.append("post"))
    opt.register_state_dict_post_hook(lambda o, sd: sd.update(hooked=True))
    opt.register_load_state_dict_pre_hook(lambda o, sd: calls.append("load-pre"))
    p.grad = torch.ones(3)
    opt.step()
    sd = opt.state_dict()
    assert sd["hooked"] is True
    opt.load_state_dict(sd)
    assert calls == ["pre", "post", "load-pre"]


def _schedulers():
    from torch.optim import lr_scheduler as S

    return {
        "LambdaLR": lambda o: S.LambdaLR(o, lambda s: 0.9**s),
        "MultiplicativeLR": lambda o: S.MultiplicativeLR(o, lambda s: 0.95),
        "StepLR": lambda o: S.StepLR(o, 2, 0.5),
        "MultiStepLR": lambda o: S.MultiStepLR(o, [2, 4], 0.5),
        "ConstantLR": lambda o: S.ConstantLR(o, 0.5, total_iters=3),
        "LinearLR": lambda o: S.LinearLR(o, 0.1, 1.0, total_iters=4),
        "ExponentialLR": lambda o: S.ExponentialLR(o, 0.9),
        "PolynomialLR": lambda o: S.PolynomialLR(o, total_iters=5, power=2.0),
        "CosineAnnealingLR": lambda o: S.CosineAnnealingLR(o, T_max=5),
        "CosineAnnealingWarmRestarts": lambda o: S.CosineAnnealingWarmRestarts(o, T_0=3),
        "CyclicLR": lambda o: S.CyclicLR(o, 1e-4, 1e-2, step_size_up=2),
        "OneCycleLR": lambda o: S.OneCycleLR(o, max_lr=1e-2, total_steps=10),
        "SequentialLR": lambda o: S.SequentialLR(
            o, [S.ConstantLR(o, 0.5, total_iters=2), S.ExponentialLR(o, 0.9)], milestones=[2]
        ),
        "ChainedScheduler": lambda o: S.ChainedScheduler(
            [S.ConstantLR(o, 0.5, total_iters=2), S.ExponentialLR(o, 0.9)]
        ),
        "ReduceLROnPlateau": lambda o: S.ReduceLROnPlateau(o, patience=0, factor=0.5),
    }


@pytest.mark.parametrize("name", list(_schedulers()))
def test_every_lr_scheduler(name, backend):
    make = _schedulers()[name]
    base = [torch.randn(7), torch.randn(2, 3)]
    pa, pb = clone_params(base), clone_params(base)
    ref = torch.optim.AdamW(pa, lr=1e-2, foreach=False)
    opt = fastopt.AdamW(pb, lr=1e-2, backend=backend)
    sa, sb = make(ref), make(opt)
    gen = torch.Generator().manual_seed(0)
    for _ in range(6):
        grads = [torch.randn(p.shape, generator=gen) for p in base]
        set_grads(pa, grads)
        set_grads(pb, grads)
        ref.step()
        opt.step()
        if name == "ReduceLROnPlateau":
            sa.step(1.0)
            sb.step(1.0)
        else:
            sa.step()
            sb.step()
        assert [g["lr"] for g in ref.param_groups] == [g["lr"] for g in opt.param_groups]
        assert_state_equal(ref, pa, opt, pb, ("step", "exp_avg", "exp_avg_sq"))


@pytest.mark.parametrize("how", ["deepcopy", "pickle"])
def test_deepcopy_and_pickle(how):
    p = torch.randn(6, requires_grad=True)
    opt = fastopt.AdamW([p], lr=1e-2, max_grad_norm=0.7, master_weights=True, backend="reference")
    p.grad = torch.randn(6)
    opt.step()
    clone = copy.deepcopy(opt) if how == "deepcopy" else pickle.loads(pickle.dumps(opt))
    assert clone.max_grad_norm == 0.7 and clone.backend == "reference" and clone.master_weights
    assert clone.applied_steps == 1
    q = clone.param_groups[0]["params"][0]
    torch.testing.assert_close(clone.state[q]["exp_avg"], opt.state[p]["exp_avg"])
    q.grad = p.grad.clone()
    clone.step()
    opt.step()
    torch.testing.assert_close(q, p)


# ---- state dicts, both ways, and exact resume ---------------------------------------------


def _train(opt, params, gen, steps):
    for _ in range(steps):
        set_grads(params, [torch.randn(p.shape, generator=gen).to(p.dtype) for p in params])
        opt.step()


def test_torch_state_dict_loads_into_fastopt_and_continues():
    base = [torch.randn(9), torch.randn(3, 4)]
    pa, pb = clone_params(base), clone_params(base)
    ref = torch.optim.AdamW(pa, lr=1e-2, amsgrad=True, foreach=False)
    gen = torch.Generator().manual_seed(0)
    _train(ref, pa, gen, 3)
    with torch.no_grad():
        for a, b in zip(pa, pb):
            b.copy_(a)
    opt = fastopt.AdamW(pb, lr=5.0, amsgrad=True, max_grad_norm=3.0)
    opt.load_state_dict(ref.state_dict())
    assert opt.param_groups[0]["lr"] == 1e-2 and opt.max_grad_norm == 3.0
    assert opt.applied_steps == 3
    opt.max_grad_norm = None
    g1, g2 = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
    _train(ref, pa, g1, 3)
    _train(opt, pb, g2, 3)
    assert_state_equal(ref, pa, opt, pb, ("step", "exp_avg", "exp_avg_sq", "max_exp_avg_sq"))


def test_fastopt_state_dict_loads_into_torch_and_continues(backend):
    base = [torch.randn(9), torch.randn(3, 4)]
    pa, pb = clone_params(base), clone_params(base)
    opt = fastopt.AdamW(pa, lr=1e-2, backend=backend)
    gen = torch.Generator().manual_seed(0)
    _train(opt, pa, gen, 3)
    with torch.no_grad():
        for a, b in zip(pa, pb):
            b.copy_(a)
    ref = torch.optim.AdamW(pb, lr=1.0, foreach=False)
    # torch's loader keeps same-dtype tensors as they are (aliased); copy to keep runs apart
    ref.load_state_dict(copy.deepcopy(opt.state_dict()))
    g1, g2 = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
    _train(opt, pa, g1, 3)
    _train(ref, pb, g2, 3)
    assert_state_equal(ref, pb, opt, pa, ("step", "exp_avg", "exp_avg_sq"))


@pytest.mark.parametrize("opt_name", ["adamw", "lion"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_checkpoint_round_trip_continues_bitwise(backend, opt_name, dtype):
    make = {
        "adamw": lambda ps: fastopt.AdamW(ps, lr=1e-2, max_grad_norm=1.0, amsgrad=True,
                                          master_weights=True, backend=backend),
        "lion": lambda ps: fastopt.Lion(ps, lr=1e-3, weight_decay=0.1, max_grad_norm=1.0,
                                        master_weights=True, backend=backend),
    }[opt_name]
    gen = torch.Generator().manual_seed(0)
    base = [torch.randn(33, generator=gen).to(dtype), torch.randn(4, 5, generator=gen).to(dtype)]
    pa = clone_params(base)
    opt_a = make(pa)
    _train(opt_a, pa, gen, 4)
    buf = io.BytesIO()
    torch.save({"params": [p.detach() for p in pa], "opt": opt_a.state_dict()}, buf)
    buf.seek(0)
    ckpt = torch.load(buf, weights_only=True)
    pb = [p.clone().requires_grad_(True) for p in ckpt["params"]]
    opt_b = make(pb)
    opt_b.load_state_dict(ckpt["opt"])
    if dtype != torch.float32:
        assert opt_b.state[pb[0]]["master_param"].dtype == torch.float32
        assert torch.equal(opt_b.state[pb[0]]["master_param"], opt_a.state[pa[0]]["master_param"])
        assert opt_b.state[pb[0]]["exp_avg"].dtype == torch.float32
    g1, g2 = torch.Generator().manual_seed(9), torch.Generator().manual_seed(9)
    _train(opt_a, pa, g1, 4)
    _train(opt_b, pb, g2, 4)
    for a, b in zip(pa, pb):
        assert torch.equal(a, b)
        for k in opt_a.state[a]:
            assert torch.equal(opt_a.state[a][k], opt_b.state[b][k]), k


def test_loading_plain_torch_checkpoint_initialises_masters():
    p = torch.randn(8).to(torch.bfloat16).requires_grad_(True)
    ref = torch.optim.AdamW([p], lr=1e-2)
    p.grad = torch.randn(8).to(torch.bfloat16)
    ref.step()
    q = p.detach().clone().requires_grad_(True)
    opt = fastopt.AdamW([q], master_weights=True)
    opt.load_state_dict(ref.state_dict())
    st = opt.state[q]
    assert st["master_param"].dtype == torch.float32
    assert torch.equal(st["master_param"], q.detach().float())
    assert st["exp_avg"].dtype == torch.float32
    assert torch.equal(st["exp_avg"], ref.state[p]["exp_avg"].float())
    # and the reverse: a master checkpoint loads into torch with bf16 moments
    ref2 = torch.optim.AdamW([p])
    ref2.load_state_dict(opt.state_dict())
    assert ref2.state[p]["exp_avg"].dtype == torch.bfloat16


# ---- the gather cache (NOTE [gather cache]) must never serve stale tensors ----------


def test_gather_cache_sees_replaced_state_grads_and_loads(backend):
    base = [torch.randn(65), torch.randn(8, 8)]
    pa, pb = clone_params(base), clone_params(base)
    ref = torch.optim.AdamW(pa, lr=1e-2, foreach=False)
    opt = fastopt.AdamW(pb, lr=1e-2, backend=backend)
    gen = torch.Generator().manual_seed(0)

    def both_step(grads):
        set_grads(pa, grads)
        set_grads(pb, grads)
        ref.step()
        opt.step()
        assert_state_equal(ref, pa, opt, pb, ("step", "exp_avg", "exp_avg_sq"))

    for _ in range(2):
        both_step([torch.randn(p.shape, generator=gen) for p in base])
    # a state tensor replaced by hand
    ref.state[pa[1]]["exp_avg"] = torch.full((8, 8), 0.5)
    opt.state[pb[1]]["exp_avg"] = torch.full((8, 8), 0.5)
    both_step([torch.randn(p.shape, generator=gen) for p in base])
    # a non-contiguous gradient where a contiguous one was cached
    g = torch.randn(8, 8, generator=gen).t()
    both_step([torch.randn(65, generator=gen), g])
    # the same optimizer reloads an earlier state mid-run
    snapshot = copy.deepcopy(opt.state_dict())
    both_step([torch.randn(p.shape, generator=gen) for p in base])
    opt.load_state_dict(snapshot)
    ref.load_state_dict(copy.deepcopy(snapshot))
    both_step([torch.randn(p.shape, generator=gen) for p in base])
    # a sparse gradient after cached steps is still refused, naming the parameter
    pb[0].grad = torch.sparse_coo_tensor([[1]], [1.0], (65,))
    pb[1].grad = torch.randn(8, 8)
    with pytest.raises(RuntimeError, match=r"sparse.*\['params'\]\[0\]"):
        opt.step()


def test_failing_update_leaves_state_unchanged(backend, monkeypatch):
    """An error inside the update (here injected) must not leave `step` advanced."""
    p = torch.randn(17, requires_grad=True)
    opt = fastopt.AdamW([p], lr=1e-2, backend=backend)
    p.grad = torch.randn(17)
    opt.step()
    before = {k: v.clone() for k, v in opt.state[p].items()}
    value = p.detach().clone()

    def boom(*args, **kwargs):
        raise RuntimeError("injected kernel failure")

    monkeypatch.setattr(fastopt._gather.Bucket, "run", boom)
    with pytest.raises(RuntimeError, match="injected"):
        opt.step()
    assert torch.equal(p.detach(), value)
    for k, v in before.items():
        assert torch.equal(opt.state[p][k], v), k


def test_update_op_rejecting_a_state_leaves_everything_unchanged(backend):
    """A state tensor changed in place behind the optimizer's back (same object, so
    the step plan still holds it) is refused by the op's own checks, before any write."""
    p = torch.randn(17, requires_grad=True)
    opt = fastopt.AdamW([p], lr=1e-2, backend=backend)
    p.grad = torch.randn(17)
    opt.step()
    opt.state[p]["exp_avg_sq"].data = torch.zeros(5)
    before = {k: v.clone() for k, v in opt.state[p].items()}
    value = p.detach().clone()
    with pytest.raises((RuntimeError, ValueError), match="exp_avg_sq|size"):
        opt.step()
    assert torch.equal(p.detach(), value)
    for k, v in before.items():
        assert torch.equal(opt.state[p][k], v), k


def test_gather_cache_sees_a_parameter_swapped_into_the_group(backend):
    a, b = torch.zeros(3, requires_grad=True), torch.zeros(3, requires_grad=True)
    opt = fastopt.AdamW([a, b], lr=0.1, weight_decay=0.0, backend=backend)
    a.grad, b.grad = torch.ones(3), -torch.ones(3)
    opt.step()
    b_after_first = b.detach().clone()
    c = torch.zeros(3, requires_grad=True)
    opt.param_groups[0]["params"][1] = c
    a.grad, c.grad, b.grad = torch.ones(3), torch.ones(3), None
    opt.step()
    assert torch.equal(b.detach(), b_after_first)  # b is no longer optimized
    torch.testing.assert_close(c.detach(), torch.full((3,), -0.1))  # c's first step
    assert float(opt.state[c]["step"]) == 1.0


def test_gather_cache_sees_param_data_made_non_contiguous(backend):
    w = torch.zeros(4, 3, requires_grad=True)
    ref_w = torch.zeros(4, 3, requires_grad=True)
    opt = fastopt.AdamW([w], lr=0.1, backend=backend)
    ref = torch.optim.AdamW([ref_w], lr=0.1, foreach=False)
    for p in (w, ref_w):
        p.grad = torch.ones(4, 3)
    opt.step()
    ref.step()
    w.data = w.detach().t().contiguous().t()  # same values, transposed layout
    for p in (w, ref_w):
        p.grad = torch.ones(4, 3)
    opt.step()
    ref.step()
    torch.testing.assert_close(w, ref_w)


def test_lion_rejected_group_leaves_optimizer_unchanged():
    opt = fastopt.Lion([torch.zeros(2, requires_grad=True)])
    with pytest.raises(TypeError, match="complex"):
        opt.add_param_group({"params": [torch.zeros(2, dtype=torch.complex64, requires_grad=True)]})
    assert len(opt.param_groups) == 1


def test_step_plan_rebuilds_on_every_change_it_relies_on(backend):
    """NOTE [persistent step plan] (csrc/plan.cpp): each change below must reach the
    update (here: the same result as torch's AdamW fed the same changes)."""
    base = [torch.randn(33), torch.randn(4, 4), torch.randn(7)]
    pa, pb = clone_params(base), clone_params(base)
    ref = torch.optim.AdamW(pa, lr=1e-2, foreach=False)
    opt = fastopt.AdamW(pb, lr=1e-2, backend=backend)
    gen = torch.Generator().manual_seed(1)

    def both_step(grads=None):
        grads = grads or [torch.randn(p.shape, generator=gen) for p in base]
        set_grads(pa, grads)
        set_grads(pb, grads)
        ref.step()
        opt.step()
        assert_state_equal(ref, pa, opt, pb, ("step", "exp_avg", "exp_avg_sq"))

    both_step()
    both_step()
    if backend == "cpu":  # the compiled backend's groups run from the C++ plan
        assert opt._gatherer._cache[0].native is not None
    # a parameter's whole state dict replaced (same values, new objects)
    for o, p in ((ref, pa[0]), (opt, pb[0])):
        o.state[p] = {k: v.clone() for k, v in o.state[p].items()}
    both_step()
    # a state entry deleted and put back (it moves in the dict)
    for o, p in ((ref, pa[1]), (opt, pb[1])):
        moment = o.state[p].pop("exp_avg_sq")
        o.state[p]["exp_avg_sq"] = moment.mul(0.5)
    both_step()
    # unrelated entries added to optimizer.state (its table grows and moves)
    extra = [torch.zeros(1) for _ in range(40)]
    for e in extra:
        opt.state[e] = {}
        ref.state[e] = {}
    both_step()
    # a parameter loses its gradient, then gets it back
    grads = [torch.randn(p.shape, generator=gen) for p in base]
    grads[2] = None
    both_step(grads)
    both_step()


def test_step_plan_sees_a_new_gradient_dtype():
    """bf16 params whose grads turn fp32 (Tensor.grad_dtype): another bucket. The
    cached optimizer's step equals a fresh optimizer's (no cache) from the same state."""
    p = torch.randn(40).bfloat16().requires_grad_()
    opt = fastopt.AdamW([p], lr=1e-2, backend="cpu", master_weights=True)
    for _ in range(2):
        p.grad = torch.randn(40).bfloat16()
        opt.step()
    q = p.detach().clone().requires_grad_()
    fresh = fastopt.AdamW([q], lr=1e-2, backend="cpu", master_weights=True)
    fresh.load_state_dict(opt.state_dict())
    g = torch.randn(40)
    p.grad_dtype = q.grad_dtype = None  # allow fp32 grads of bf16 params
    p.grad, q.grad = g.clone(), g.clone()
    opt.step()
    fresh.step()
    assert torch.equal(p, q)
    for key in ("master_param", "exp_avg", "exp_avg_sq", "step"):
        assert torch.equal(opt.state[p][key], fresh.state[q][key]), key
    (key,) = opt._gatherer._cache[0].buckets
    assert key[2] == torch.float32  # the grad dtype of the rebuilt bucket
