"""LAWA: latest weight averaging (Sanyal et al. 2023, "Early Weight Averaging meets High
Learning Rates for LLM Pre-training").

Every ``every`` optimizer steps the training loop calls ``LAWA.update``: the
current weights join a window of the last ``window`` snapshots, and the
weights are replaced by the window's mean; training then continues from the
average with the optimizer's moments untouched.
"""

from __future__ import annotations

from collections import deque

import torch
from torch import nn

from fastopt import _compressed


class LAWA:
    r"""Mean of the last ``window`` snapshots of a model's parameters.

    With snapshots :math:`\theta_{j-M+1}, \dots, \theta_j` in the window
    (fewer at the start), ``update`` sets
    :math:`\theta \leftarrow \frac{1}{|W|}\sum_{i \in W} \theta_i`.

    Snapshots are fp32 copies kept on the parameter's device. When the
    optimizer keeps fp32 master weights (``state[p]["master_param"]``), the
    master is what gets snapshotted and overwritten, because the next step
    would otherwise write the stale master back over the averaged parameter.
    With a master remainder (``state[p]["master_remainder"]``) the master is
    the one parameter and remainder hold, and the mean is split back into both
    (NOTE [master remainder]), marked as the optimizer's own write so the next
    step keeps it (NOTE [stale remainder]).
    """

    def __init__(self, window: int) -> None:
        if window < 1:
            raise ValueError(f"LAWA window must be >= 1, got {window}")
        self.window = window
        self.snapshots: deque[list[torch.Tensor]] = deque(maxlen=window)

    @staticmethod
    def _sources(model: nn.Module, optimizer: torch.optim.Optimizer | None) -> list[torch.Tensor]:
        out = []
        for p in model.parameters():
            state = optimizer.state.get(p, {}) if optimizer is not None else {}
            if _compressed.REMAINDER_KEY in state:
                out.append(_compressed.join(p, state[_compressed.REMAINDER_KEY]))
            else:
                out.append(state.get("master_param", p))
        return out

    def snapshot(self, model: nn.Module, optimizer: torch.optim.Optimizer | None = None) -> None:
        self.snapshots.append([t.detach().float().clone() for t in self._sources(model, optimizer)])

    def average(self) -> list[torch.Tensor]:
        if not self.snapshots:
            raise RuntimeError("LAWA has no snapshots to average")
        n = len(self.snapshots)
        # sum in a fixed order (oldest first) so the result is reproducible bit for bit
        means = [t.clone() for t in self.snapshots[0]]
        for snap in list(self.snapshots)[1:]:
            for m, t in zip(means, snap, strict=True):
                m.add_(t)
        return [m.div_(n) for m in means]

    @torch.no_grad()
    def update(self, model: nn.Module, optimizer: torch.optim.Optimizer | None = None) -> None:
        """Snapshot the current weights, then load the window's mean into the model."""
        self.snapshot(model, optimizer)
        for p, mean in zip(model.parameters(), self.average(), strict=True):
            state = optimizer.state.get(p, {}) if optimizer is not None else {}
            remainder = state.get(_compressed.REMAINDER_KEY)
            if remainder is not None:
                _compressed.store(p, remainder, mean)
                _compressed.mark_written([p], [remainder])
                continue
            p.copy_(mean)
            if "master_param" in state:
                state["master_param"].copy_(mean)

    def state_dict(self) -> dict:
        return {"window": self.window, "snapshots": [list(s) for s in self.snapshots]}

    def load_state_dict(self, state: dict) -> None:
        self.window = state["window"]
        self.snapshots = deque((list(s) for s in state["snapshots"]), maxlen=self.window)
