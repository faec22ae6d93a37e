"""fastopt.GradScaler: torch's GradScaler that lets a fastopt optimizer do the inf check.

torch's scaler, before stepping a fused optimizer, runs its own pass over every
gradient (``_check_inf_per_device``: read, multiply by 1, write back) only to
learn whether one is non-finite. A fastopt optimizer computes the global norm
of the gradients anyway and skips the step when that norm is not finite, so
this scaler hands it a zeroed ``found_inf`` tensor, lets the norm pass fill it
in, and uses it for the scale update. A scaled, clipped step then reads the
gradients twice in all: the norm pass and the update kernel.

With any other optimizer, with an optimizer that clips by value (the clamp
would hide an overflow from the norm pass), after an explicit ``unscale_``, or
when disabled, it is torch's GradScaler unchanged; the state dict is torch's.
"""

from __future__ import annotations

from typing import Any

import torch
from torch.amp.grad_scaler import OptState

from fastopt._base import FusedOptimizer

__all__ = ["GradScaler"]


class GradScaler(torch.amp.GradScaler):
    """A :class:`torch.amp.GradScaler` whose inf check is done by fastopt's norm pass."""

    def step(self, optimizer: torch.optim.Optimizer, *args: Any, **kwargs: Any) -> Any:
        if not (self._enabled and isinstance(optimizer, FusedOptimizer)):
            return super().step(optimizer, *args, **kwargs)
        if optimizer.max_grad_value is not None:
            # The norm pass sees the value-clamped gradients, in which an overflow
            # (inf) is clamped to +-max_grad_value: it cannot be the inf check
            # here, so torch's scaler makes its own pass over the raw gradients.
            return super().step(optimizer, *args, **kwargs)
        if "closure" in kwargs:
            raise RuntimeError("Closure use is not currently supported if GradScaler is enabled.")
        self._check_scale_growth_tracker("step")
        optimizer_state = self._per_optimizer_states[id(optimizer)]
        if optimizer_state["stage"] is OptState.STEPPED:
            raise RuntimeError("step() has already been called since the last update().")
        if optimizer_state["stage"] is OptState.UNSCALED:
            # The gradients were already unscaled (and checked) by unscale_().
            return super().step(optimizer, *args, **kwargs)

        scale = self._get_scale_async()
        found_inf = torch.zeros((), dtype=torch.float32, device=scale.device)
        # update() reads this dict; the optimizer's norm pass writes into found_inf.
        optimizer_state["found_inf_per_device"] = {scale.device: found_inf}
        optimizer.grad_scale = scale * getattr(optimizer, "grad_scale", 1)
        optimizer.found_inf = found_inf
        try:
            retval = optimizer.step(*args, **kwargs)
        finally:
            del optimizer.grad_scale
            del optimizer.found_inf
        optimizer_state["stage"] = OptState.STEPPED
        return retval
