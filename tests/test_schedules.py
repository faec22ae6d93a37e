"""warmup_decay against its closed form, the applied-step count, and the state-dict round trip."""

import math

import pytest
import torch

import fastopt
from fastopt.schedules import WarmupDecay, applied_steps, lr_factor, warmup_decay

BASE_LR = 0.5


def _opt(lr=BASE_LR):
    p = torch.nn.Parameter(torch.ones(3))
    return torch.optim.SGD([p], lr=lr), p


def _drive(sched, opt, p, n):
    """n applied steps; the lr seen by each update, in order."""
    seen = []
    for _ in range(n):
        seen.append(opt.param_groups[0]["lr"])
        p.grad = torch.ones_like(p)
        opt.step()
        sched.step()
    return seen


class _Counting(torch.optim.SGD):
    """An optimizer exposing ``applied_steps`` as fastopt's do (SGD keeps no per-param step)."""

    def __init__(self, params, lr):
        super().__init__(params, lr=lr)
        self.applied_steps = 0

    def step(self, closure=None):
        super().step(closure)
        self.applied_steps += 1


# (decay, warmup, total, min_ratio, decay_steps, {step: expected factor}) — each factor written
# out from the closed form in the issue: warm-up (s+1)/W, then m + (1-m) f(t), t over the decay phase
CASES = [
    (
        "cosine",
        10,
        110,
        0.0,
        None,
        {
            0: 0.1,
            4: 0.5,
            9: 1.0,
            10: 1.0,
            60: 0.5,
            85: 0.5 * (1 + math.cos(0.75 * math.pi)),
            110: 0.0,
            500: 0.0,
        },
    ),
    ("cosine", 10, 110, 0.1, None, {60: 0.1 + 0.9 * 0.5, 110: 0.1}),
    ("linear", 0, 100, 0.0, None, {0: 1.0, 25: 0.75, 50: 0.5, 99: 0.01, 100: 0.0}),
    ("linear", 20, 120, 0.2, None, {19: 1.0, 70: 0.2 + 0.8 * 0.5, 120: 0.2}),
    ("sqrt", 0, 100, 0.0, None, {0: 1.0, 36: 0.8, 75: 0.5, 100: 0.0}),
    ("constant", 5, 50, 0.3, None, {0: 0.2, 4: 1.0, 5: 1.0, 49: 1.0}),
    # warm-up-stable-decay: stable until step 80, then linear decay over the last 20
    (
        "linear",
        10,
        100,
        0.0,
        20,
        {9: 1.0, 50: 1.0, 79: 1.0, 80: 1.0, 90: 0.5, 100: 0.0},
    ),
    ("cosine", 10, 100, 0.1, 40, {59: 1.0, 60: 1.0, 80: 0.1 + 0.9 * 0.5, 100: 0.1}),
]


@pytest.mark.parametrize("decay,warmup,total,m,decay_steps,expect", CASES)
def test_lr_factor_closed_form(decay, warmup, total, m, decay_steps, expect):
    for step, want in expect.items():
        got = lr_factor(
            step,
            warmup_steps=warmup,
            total_steps=total,
            decay=decay,
            min_lr_ratio=m,
            decay_steps=decay_steps,
        )
        assert got == pytest.approx(want, abs=1e-12), (step, got, want)


@pytest.mark.parametrize("decay,warmup,total,m,decay_steps,expect", CASES)
def test_scheduler_follows_closed_form(decay, warmup, total, m, decay_steps, expect):
    opt, p = _opt()
    sched = warmup_decay(
        opt,
        warmup_steps=warmup,
        total_steps=total,
        decay=decay,
        min_lr_ratio=m,
        decay_steps=decay_steps,
    )
    assert isinstance(sched, torch.optim.lr_scheduler.LRScheduler)
    # SGD has no per-parameter step: drive a counting optimizer instead
    opt = _Counting([p], lr=BASE_LR)
    sched = WarmupDecay(
        opt,
        warmup_steps=warmup,
        total_steps=total,
        decay=decay,
        min_lr_ratio=m,
        decay_steps=decay_steps,
    )
    seen = _drive(sched, opt, p, max(expect) + 1)
    for step, want in expect.items():
        assert seen[step] == pytest.approx(BASE_LR * want, abs=1e-12), step


def test_skipped_steps_do_not_advance_torch_optimizer_schedule():
    # torch.optim.AdamW keeps state["step"]; a step GradScaler skips never calls opt.step()
    p = torch.nn.Parameter(torch.ones(4))
    opt = torch.optim.AdamW([p], lr=1.0)
    sched = warmup_decay(opt, warmup_steps=4, total_steps=20, decay="linear")
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**4)
    lrs = []
    for i in range(6):
        lrs.append(opt.param_groups[0]["lr"])
        bad = i in (1, 2)
        loss = (p * (float("inf") if bad else 1.0)).sum()
        scaler.scale(loss).backward()
        scaler.step(opt)
        opt.zero_grad()
        scaler.update()
        sched.step()
    assert applied_steps(opt) == 4
    # steps 1 and 2 were skipped: the lr stays where it was until an update goes through
    assert lrs == pytest.approx([0.25, 0.5, 0.5, 0.5, 0.75, 1.0])


def test_applied_steps_attribute_wins():
    opt, _ = _opt()
    opt.applied_steps = 7
    assert applied_steps(opt) == 7


def test_state_dict_round_trip():
    opt = _Counting([torch.nn.Parameter(torch.ones(2))], lr=BASE_LR)
    sched = warmup_decay(
        opt,
        warmup_steps=3,
        total_steps=30,
        decay="sqrt",
        min_lr_ratio=0.05,
        decay_steps=10,
    )
    _drive(sched, opt, opt.param_groups[0]["params"][0], 25)
    state = sched.state_dict()

    opt2 = _Counting([torch.nn.Parameter(torch.ones(2))], lr=123.0)
    sched2 = warmup_decay(opt2, warmup_steps=0, total_steps=1, decay="cosine")
    sched2.load_state_dict(state)
    opt2.applied_steps = opt.applied_steps
    opt2.load_state_dict(opt.state_dict())
    assert (
        sched2.warmup_steps,
        sched2.total_steps,
        sched2.decay,
        sched2.min_lr_ratio,
        sched2.decay_steps,
    ) == (
        3,
        30,
        "sqrt",
        0.05,
        10,
    )
    a = _drive(sched, opt, opt.param_groups[0]["params"][0], 5)
    b = _drive(sched2, opt2, opt2.param_groups[0]["params"][0], 5)
    assert a == b
    assert b[-1] == pytest.approx(BASE_LR * (0.05 + 0.95 * math.sqrt(1 - 9 / 10)))


@pytest.mark.parametrize(
    "kwargs",
    [
        {"warmup_steps": 5, "total_steps": 0},
        {"warmup_steps": 11, "total_steps": 10},
        {"warmup_steps": 0, "total_steps": 10, "decay": "exp"},
        {"warmup_steps": 0, "total_steps": 10, "min_lr_ratio": 1.5},
        {"warmup_steps": 5, "total_steps": 10, "decay_steps": 6},
    ],
)
def test_bad_arguments(kwargs):
    opt, _ = _opt()
    with pytest.raises(ValueError):
        warmup_decay(opt, **kwargs)


def test_applied_steps_reads_through_an_optimizer_attribute():
    """accelerate's AcceleratedOptimizer (an Optimizer) keeps the real one as `.optimizer`."""
    p = torch.zeros(3, requires_grad=True)
    inner = fastopt.AdamW([p], lr=0.1, max_grad_norm=1.0, backend="reference")

    class Wrapper(torch.optim.Optimizer):
        def __init__(self, optimizer):
            self.optimizer = optimizer
            self.param_groups = optimizer.param_groups
            self.state = {}  # deliberately not the inner state: only the counters tell

    for g in (torch.ones(3), torch.full((3,), float("nan")), torch.ones(3)):
        p.grad = g
        inner.step()
    assert applied_steps(Wrapper(inner)) == 2
