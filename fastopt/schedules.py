"""Learning-rate schedules that follow the optimizer's count of applied steps.

``lr_factor`` is the schedule as a pure function of the step; ``warmup_decay``
wraps it in a ``torch.optim.lr_scheduler.LRScheduler`` so it composes with
everything that expects one (``state_dict``, ``get_last_lr``, ...).
"""

from __future__ import annotations

import math

import torch
from torch.optim.lr_scheduler import LRScheduler

DECAYS = ("cosine", "linear", "sqrt", "constant")


def lr_factor(
    step: int,
    *,
    warmup_steps: int,
    total_steps: int,
    decay: str = "cosine",
    min_lr_ratio: float = 0.0,
    decay_steps: int | None = None,
) -> float:
    r"""Multiplier of the base lr for the update that follows ``step`` applied steps.

    With ``W = warmup_steps``, ``T = total_steps``, ``m = min_lr_ratio`` and
    ``D = decay_steps`` (``T - W`` when None)::

        s <  W:        (s + 1) / W                      linear warm-up; update W uses the full lr
        s <  T - D:    1                                stable phase (only with decay_steps)
        otherwise:     m + (1 - m) * f(t),  t = min(1, (s - (T - D)) / D)

    where ``f`` is cosine ``½(1 + cos πt)``, linear ``1 − t``, sqrt ``√(1 − t)``
    or constant ``1``. The factor reaches ``m`` at ``s = T`` and stays there.
    """
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    if decay == "constant":
        return 1.0
    decay_len = total_steps - warmup_steps if decay_steps is None else decay_steps
    decay_start = total_steps - decay_len
    if step < decay_start:
        return 1.0
    t = 1.0 if decay_len <= 0 else min(1.0, (step - decay_start) / decay_len)
    if decay == "cosine":
        shape = 0.5 * (1.0 + math.cos(math.pi * t))
    elif decay == "linear":
        shape = 1.0 - t
    elif decay == "sqrt":
        shape = math.sqrt(1.0 - t)
    else:
        raise ValueError(f"unknown decay {decay!r}; choose one of {DECAYS}")
    return min_lr_ratio + (1.0 - min_lr_ratio) * shape


def applied_steps(optimizer: torch.optim.Optimizer) -> int:
    """How many steps ``optimizer`` has actually applied to the weights.

    NOTE [schedule counts applied steps]
    A step skipped for an overflow or non-finite gradients must not advance
    the schedule. fastopt optimizers count applied steps in
    ``optimizer.applied_steps``. For any other optimizer we read the largest
    per-parameter ``state["step"]``: torch's optimizers advance it only inside
    ``step()``, and ``torch.amp.GradScaler`` does not call ``step()`` when it
    finds an inf, so a scaler-skipped step leaves it unchanged too. Both
    counts live in (or are rebuilt from) the optimizer's state dict, so a
    resumed run continues the schedule where it stopped. A wrapper that
    exposes its optimizer as ``.optim`` (``ZeroRedundancyOptimizer``) or
    ``.optimizer`` (accelerate's ``AcceleratedOptimizer``) is read through: each
    rank's local optimizer holds the same counts.
    """
    while not hasattr(optimizer, "applied_steps"):
        inner = getattr(optimizer, "optim", None) or getattr(optimizer, "optimizer", None)
        if not isinstance(inner, torch.optim.Optimizer) or inner is optimizer:
            break
        optimizer = inner
    count = getattr(optimizer, "applied_steps", None)
    if count is not None:
        return int(count)
    steps = [s["step"] for s in optimizer.state.values() if isinstance(s, dict) and "step" in s]
    if not steps:
        return 0
    if isinstance(steps[0], torch.Tensor):
        # one host read for all parameters instead of one per parameter
        return int(torch.stack([s.detach().float().cpu() for s in steps]).max().item())
    return int(max(steps))


class WarmupDecay(LRScheduler):
    """``lr = base_lr * lr_factor(applied_steps(optimizer), ...)``; see ``lr_factor``.

    Call ``step()`` once after every ``optimizer.step()`` as with any torch
    scheduler. The lr does not depend on how often ``step()`` was called, only
    on the optimizer's applied steps (NOTE [schedule counts applied steps]).
    """

    def __init__(
        self,
        optimizer: torch.optim.Optimizer,
        *,
        warmup_steps: int,
        total_steps: int,
        decay: str = "cosine",
        min_lr_ratio: float = 0.0,
        decay_steps: int | None = None,
        last_epoch: int = -1,
    ) -> None:
        if decay not in DECAYS:
            raise ValueError(f"unknown decay {decay!r}; choose one of {DECAYS}")
        if total_steps <= 0:
            raise ValueError(f"total_steps must be positive, got {total_steps}")
        if not 0 <= warmup_steps <= total_steps:
            raise ValueError(f"warmup_steps must be in [0, total_steps], got {warmup_steps}")
        if not 0.0 <= min_lr_ratio <= 1.0:
            raise ValueError(f"min_lr_ratio must be in [0, 1], got {min_lr_ratio}")
        if decay_steps is not None and not 0 < decay_steps <= total_steps - warmup_steps:
            raise ValueError(
                f"decay_steps must be in (0, total_steps - warmup_steps], got {decay_steps}"
            )
        self.warmup_steps = warmup_steps
        self.total_steps = total_steps
        self.decay = decay
        self.min_lr_ratio = min_lr_ratio
        self.decay_steps = decay_steps
        super().__init__(optimizer, last_epoch)

    def factor(self, step: int) -> float:
        return lr_factor(
            step,
            warmup_steps=self.warmup_steps,
            total_steps=self.total_steps,
            decay=self.decay,
            min_lr_ratio=self.min_lr_ratio,
            decay_steps=self.decay_steps,
        )

    def get_lr(self) -> list[float]:
        f = self.factor(applied_steps(self.optimizer))
        return [base_lr * f for base_lr in self.base_lrs]


def warmup_decay(
    optimizer: torch.optim.Optimizer,
    *,
    warmup_steps: int,
    total_steps: int,
    decay: str = "cosine",
    min_lr_ratio: float = 0.0,
    decay_steps: int | None = None,
) -> WarmupDecay:
    """Linear warm-up to each group's lr, then decay to ``min_lr_ratio * lr`` at ``total_steps``.

    ``decay`` is ``"cosine"`` (½(1+cos πt)), ``"linear"`` (1−t), ``"sqrt"``
    (√(1−t)) or ``"constant"``, ``t`` the fraction of the decay phase done.
    With ``decay_steps`` it is warm-up–stable–decay: constant after warm-up
    until the last ``decay_steps`` steps, which decay. Counts the optimizer's
    applied steps, so a skipped step does not advance it. See ``lr_factor``.
    """
    return WarmupDecay(
        optimizer,
        warmup_steps=warmup_steps,
        total_steps=total_steps,
        decay=decay,
        min_lr_ratio=min_lr_ratio,
        decay_steps=decay_steps,
    )
