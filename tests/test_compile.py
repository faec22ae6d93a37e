"""torch.compile: a compiled ``opt.step`` traces without graph breaks, does not
recompile when a scheduler moves a tensor lr, and matches eager bit for bit.

Counted with dynamo's own counters (``torch._dynamo.utils.counters``) and a
``CompileCounterWithBackend``. The aot_eager backend runs the same ops as eager,
so equality is exact; inductor (slow test) generates its own code for the
norm/clip scalar math, and is held to the same exact standard: that math is a
handful of fp32/fp64 scalar ops with no reduction order to vary.
"""

from __future__ import annotations

import pytest
import torch
import torch._dynamo
from torch._dynamo.testing import CompileCounterWithBackend
from torch._dynamo.utils import counters

import fastopt
from fastopt import schedules

SIZES = (0, 1, 3, 1025)
SKIP_AT = (3, 7)  # steps whose gradients hold an inf: skipped by the norm pass

OPTIMIZERS = {
    "adamw": lambda ps, lr, **kw: fastopt.AdamW(ps, lr=lr, weight_decay=0.1, **kw),
    "adamw-amsgrad": lambda ps, lr, **kw: fastopt.AdamW(ps, lr=lr, amsgrad=True, **kw),
    "lion": lambda ps, lr, **kw: fastopt.Lion(ps, lr=lr, weight_decay=0.1, **kw),
    "ademamix": lambda ps, lr, **kw: fastopt.AdEMAMix(ps, lr=lr, t_alpha=10, t_beta3=10, **kw),
}


def _grads(steps: int, bad: float = float("inf")) -> list[list[torch.Tensor]]:
    gen = torch.Generator().manual_seed(1)
    out = []
    for i in range(steps):
        gs = [torch.randn(n, generator=gen) for n in SIZES]
        if i in SKIP_AT:
            gs[-1][5] = bad
        out.append(gs)
    return out


def _run(name: str, compile_backend: str | None, steps: int = 10, lr_scheduler: bool = False,
         backend: str = "cpu"):
    """Train ``steps`` steps with a warm-up schedule on a tensor lr; returns the
    parameters, the optimizer and the compile counter (None in eager).

    The schedule is torch's recipe for compiled optimizers: a tensor lr, moved in
    place; either by a ``torch.optim.lr_scheduler`` (fastopt.schedules.warmup_decay)
    or, ``lr_scheduler=False``, by the loop itself with ``fill_`` (an LRScheduler
    wraps ``opt.step`` in a function dynamo does not trace: one graph break that
    torch's own AdamW gets too)."""
    torch._dynamo.reset()
    counters.clear()
    gen = torch.Generator().manual_seed(0)
    params = [torch.randn(n, generator=gen, requires_grad=True) for n in SIZES]
    opt = OPTIMIZERS[name](params, torch.tensor(1e-2), backend=backend, max_grad_norm=1.0)
    sched = schedules.warmup_decay(opt, warmup_steps=4, total_steps=steps) if lr_scheduler else None
    counter = None
    step = opt.step
    if compile_backend is not None:
        counter = CompileCounterWithBackend(compile_backend)
        step = torch.compile(opt.step, backend=counter)
    for gs in _grads(steps):
        for p, g in zip(params, gs):
            p.grad = g.clone()
        step()
        if sched is not None:
            sched.step()
        else:
            f = schedules.lr_factor(opt.applied_steps, warmup_steps=4, total_steps=steps)
            opt.param_groups[0]["lr"].fill_(1e-2 * f)
    return params, opt, counter


def _assert_same(a, b) -> None:
    (pa, oa), (pb, ob) = a, b
    for x, y in zip(pa, pb):
        assert torch.equal(x, y)
    for x, y in zip(pa, pb):
        sa, sb = oa.state[x], ob.state[y]
        assert sa.keys() == sb.keys()
        for key in sa:
            assert torch.equal(sa[key], sb[key]), key
    assert (oa.applied_steps, oa.skipped_steps) == (ob.applied_steps, ob.skipped_steps)
    assert oa.param_groups[0]["lr"] == ob.param_groups[0]["lr"]


# the compiled ops, and the Triton launchers (as opaque ops under the interpreter here)
BACKENDS = [b for b in ("cpu", "triton") if b in fastopt.available_backends()
            and fastopt.backends._module(b).supports(torch.device("cpu"))]  # fmt: skip


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_compiled_step_matches_eager_without_breaks_or_recompiles(name, backend):
    eager_params, eager_opt, _ = _run(name, None, backend=backend)
    params, opt, counter = _run(name, "aot_eager", backend=backend)
    assert dict(counters["graph_break"]) == {}
    assert counter.frame_count == 1  # the lr moved every step: still one graph
    _assert_same((params, opt), (eager_params, eager_opt))
    # the run did skip, and the schedule counted only applied steps
    assert opt.skipped_steps == len(SKIP_AT)
    assert opt.applied_steps == 10 - len(SKIP_AT)


def test_compiled_step_under_an_lr_scheduler_matches_eager():
    eager_params, eager_opt, _ = _run("adamw", None, lr_scheduler=True)
    params, opt, counter = _run("adamw", "aot_eager", lr_scheduler=True)
    assert counter.frame_count == 1
    _assert_same((params, opt), (eager_params, eager_opt))
    ours = sum(counters["graph_break"].values())
    # the same harness with torch's AdamW: its step has the scheduler's wrapper
    # break and one of its own
    torch._dynamo.reset()
    counters.clear()
    ps = [torch.randn(n, requires_grad=True) for n in SIZES]
    ref = torch.optim.AdamW(ps, lr=torch.tensor(1e-2))
    sched = schedules.warmup_decay(ref, warmup_steps=4, total_steps=10)
    step = torch.compile(ref.step, backend="aot_eager")
    for gs in _grads(3):
        for p, g in zip(ps, gs):
            p.grad = g.clone()
        step()
        sched.step()
    assert ours <= sum(counters["graph_break"].values())


def test_compiled_step_with_value_clipping_and_loss_scale_matches_eager():
    """The full transform: scaler protocol (grad_scale / found_inf), value clamp, norm."""

    def run(compile_backend):
        torch._dynamo.reset()
        counters.clear()
        params = [torch.full((n,), 0.5, requires_grad=True) for n in SIZES]
        opt = fastopt.AdamW(params, lr=torch.tensor(1e-2), backend="cpu", max_grad_norm=0.5,
                            max_grad_value=0.8)  # fmt: skip
        counter = CompileCounterWithBackend(compile_backend) if compile_backend else None
        step = torch.compile(opt.step, backend=counter) if counter else opt.step
        # NaN: a value clamp turns an inf into the bound, a NaN stays and skips
        for gs in _grads(8, bad=float("nan")):
            opt.grad_scale = torch.tensor(1024.0)
            opt.found_inf = torch.tensor(0.0)
            for p, g in zip(params, gs):
                p.grad = g * 1024.0
            step()
        return params, opt, counter

    eager = run(None)
    params, opt, counter = run("aot_eager")
    assert dict(counters["graph_break"]) == {}
    assert counter.frame_count == 1
    _assert_same((params, opt), eager[:2])
    assert opt.skipped_steps == len(SKIP_AT)


def test_float_lr_recompiles_tensor_lr_does_not():
    """What the README says: a float lr is a constant of the graph (a changed value
    recompiles); wrap it in a tensor to move it freely."""

    def frames(lr):
        torch._dynamo.reset()
        p = torch.zeros(8, requires_grad=True)
        opt = fastopt.AdamW([p], lr=lr, backend="cpu")
        counter = CompileCounterWithBackend("aot_eager")
        step = torch.compile(opt.step, backend=counter)
        for i in range(3):
            p.grad = torch.ones(8)
            step()
            if isinstance(lr, torch.Tensor):
                opt.param_groups[0]["lr"].fill_(1e-3 * (i + 2))
            else:
                opt.param_groups[0]["lr"] = 1e-3 * (i + 2)
        return counter.frame_count

    assert frames(torch.tensor(1e-3)) == 1
    assert frames(1e-3) > 1


def test_compiled_train_step_breaks_no_more_than_torch_adamw():
    """A whole compiled training step (forward, backward, step): fastopt adds no
    graph break to the ones torch's own AdamW gets (backward() is one)."""

    def breaks(make_opt):
        torch._dynamo.reset()
        counters.clear()
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 1))
        opt = make_opt(model.parameters())
        x, y = torch.randn(4, 8), torch.randn(4, 1)

        @torch.compile(backend="aot_eager")
        def train_step():
            loss = torch.nn.functional.mse_loss(model(x), y)
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            return loss

        losses = [float(train_step()) for _ in range(4)]
        assert losses[-1] < losses[0]
        return sum(counters["graph_break"].values())

    ours = breaks(lambda ps: fastopt.AdamW(ps, lr=torch.tensor(1e-2), backend="cpu",
                                           max_grad_norm=1.0))  # fmt: skip
    theirs = breaks(lambda ps: torch.optim.AdamW(ps, lr=torch.tensor(1e-2)))
    assert ours <= theirs


@pytest.mark.slow
@pytest.mark.parametrize("name", ["adamw", "lion"])
def test_inductor_compiled_step_matches_eager(name):
    eager_params, eager_opt, _ = _run(name, None)
    params, opt, counter = _run(name, "inductor")
    assert dict(counters["graph_break"]) == {}
    assert counter.frame_count == 1
    _assert_same((params, opt), (eager_params, eager_opt))
