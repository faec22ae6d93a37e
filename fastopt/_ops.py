"""Loads the compiled extension (fastopt._C) and registers the fake kernels of its ops.

The ops themselves (schemas in csrc/ops.cpp, kernels in csrc/cpu and csrc/cuda)
register when ``fastopt._C`` is imported. The fake kernels below describe the
ops' outputs without computing anything, so ``torch.compile`` can trace
around them. Importing this module never fails: if the extension is missing
(not built, or built against another torch), ``LOAD_ERROR`` says why and the
compiled backends report it from ``available()``.
"""

from __future__ import annotations

import torch
from torch import Tensor

LOAD_ERROR: str | None = None

try:
    from fastopt import _C  # noqa: F401  (importing runs the op registrations)
except ImportError as exc:
    LOAD_ERROR = (
        f"the fastopt._C extension could not be imported ({exc}); build it with "
        "`python setup.py build_ext --inplace` or `pip install .`"
    )


def loaded() -> bool:
    """Whether the extension's ops are registered in this process."""
    return LOAD_ERROR is None


if LOAD_ERROR is None:

    @torch.library.register_fake("fastopt::adamw_")
    def _adamw_fake(
        params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, master_params, steps,
        lr, lr_tensor, beta1, beta2, eps, weight_decay, amsgrad, maximize, grad_scale,
        found_inf,
    ) -> None:  # fmt: skip
        return None

    @torch.library.register_fake("fastopt::lion_")
    def _lion_fake(
        params, grads, exp_avgs, master_params, lr, lr_tensor, beta1, beta2,
        weight_decay, maximize, grad_scale, found_inf,
    ) -> None:  # fmt: skip
        return None

    @torch.library.register_fake("fastopt::steps_add_")
    def _steps_add_fake(steps, value) -> None:
        return None

    @torch.library.register_fake("fastopt::grad_sumsq")
    def _grad_sumsq_fake(grads: list[Tensor]) -> Tensor:
        device = grads[0].device if grads else torch.device("cpu")
        return torch.empty((), dtype=torch.float32, device=device)
