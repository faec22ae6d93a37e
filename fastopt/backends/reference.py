"""The reference backend: plain PyTorch, one tensor at a time, in fp32 (fp64 for fp64).

This is the specification in code and the oracle of every test. It follows the
order of operations of torch's single-tensor AdamW so that fp32 results agree
with ``torch.optim.AdamW(foreach=False)`` to rounding, and computes every
element in fp32 whatever the storage dtype, narrowing once on the store
(``Tensor.copy_`` rounds to nearest even).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor


def available() -> str | None:
    return None


def supports(device: torch.device) -> bool:
    return True


def _scalar(x: float | Tensor) -> float:
    return float(x.item()) if isinstance(x, Tensor) else float(x)


def grad_sumsq(grads: list[Tensor]) -> Tensor:
    """Sum of squares of all elements, accumulated in float64, returned as fp32."""
    if not grads:
        return torch.zeros((), dtype=torch.float32)
    total = torch.zeros((), dtype=torch.float64, device=grads[0].device)
    for g in grads:
        if g.numel():
            total += g.detach().double().square().sum()
    return total.float()


def _skip(found_inf: Tensor | None) -> bool:
    return found_inf is not None and bool(found_inf.item() != 0)


def _opmath(t: Tensor) -> torch.dtype:
    # fp32 in registers for fp32/bf16/fp16 storage (SPEC §2); float64 storage is
    # computed in float64, as torch does, since narrowing it would lose precision.
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def _grad_opmath(g: Tensor, grad_scale: Tensor | None, maximize: bool) -> Tensor:
    g = g.detach().to(_opmath(g))
    if grad_scale is not None:
        g = g * grad_scale.to(device=g.device, dtype=torch.float32).to(g.dtype)
    return -g if maximize else g


def adamw_(
    params: list[Tensor],
    grads: list[Tensor],
    exp_avgs: list[Tensor],
    exp_avg_sqs: list[Tensor],
    max_exp_avg_sqs: list[Tensor],
    master_params: list[Tensor],
    steps: list[Tensor],
    *,
    lr: float | Tensor,
    beta1: float,
    beta2: float,
    eps: float,
    weight_decay: float,
    amsgrad: bool,
    maximize: bool,
    grad_scale: Tensor | None,
    found_inf: Tensor | None,
) -> None:
    r"""AdamW, per tensor, in fp32.

    .. math::
        t \gets t+1;\quad \theta \gets \theta(1-\eta\lambda) \\
        m \gets \beta_1 m + (1-\beta_1) g;\quad v \gets \beta_2 v + (1-\beta_2) g^2 \\
        \hat v = \max(\hat v, v) \text{ (amsgrad) else } v \\
        \theta \gets \theta - \frac{\eta}{1-\beta_1^t}\,
            \frac{m}{\sqrt{\hat v}/\sqrt{1-\beta_2^t} + \epsilon}
    """
    if _skip(found_inf):
        return
    lr = _scalar(lr)
    for i, p in enumerate(params):
        step = _scalar(steps[i])
        g = _grad_opmath(grads[i], grad_scale, maximize)
        master = master_params[i] if master_params else None
        w = master if master is not None else p.detach().to(g.dtype)
        m = exp_avgs[i].to(g.dtype)
        v = exp_avg_sqs[i].to(g.dtype)

        w.mul_(1 - lr * weight_decay)
        m.lerp_(g, 1 - beta1)
        v.mul_(beta2).addcmul_(g, g, value=1 - beta2)
        if amsgrad:
            vmax = torch.maximum(max_exp_avg_sqs[i].to(g.dtype), v)
            max_exp_avg_sqs[i].copy_(vmax)
            v_used = vmax
        else:
            v_used = v
        step_size = lr / (1 - beta1**step)
        denom = (v_used.sqrt() / math.sqrt(1 - beta2**step)).add_(eps)
        w.addcdiv_(m, denom, value=-step_size)

        exp_avgs[i].copy_(m)
        exp_avg_sqs[i].copy_(v)
        p.detach().copy_(w)


def lion_(
    params: list[Tensor],
    grads: list[Tensor],
    exp_avgs: list[Tensor],
    master_params: list[Tensor],
    *,
    lr: float | Tensor,
    beta1: float,
    beta2: float,
    weight_decay: float,
    maximize: bool,
    grad_scale: Tensor | None,
    found_inf: Tensor | None,
) -> None:
    r"""Lion (Chen et al. 2023), per tensor, in fp32.

    .. math::
        c = \beta_1 m + (1-\beta_1) g;\quad \theta \gets \theta(1-\eta\lambda)
            - \eta\,\mathrm{sign}(c);\quad m \gets \beta_2 m + (1-\beta_2) g
    """
    if _skip(found_inf):
        return
    lr = _scalar(lr)
    for i, p in enumerate(params):
        g = _grad_opmath(grads[i], grad_scale, maximize)
        master = master_params[i] if master_params else None
        w = master if master is not None else p.detach().to(g.dtype)
        m = exp_avgs[i].to(g.dtype)

        c = m.lerp(g, 1 - beta1)
        # sign(0) = 0; a NaN stays NaN (torch.sign maps it to 0, which would hide it).
        update = torch.where(c.isnan(), c, c.sign())
        w.mul_(1 - lr * weight_decay).add_(update, alpha=-lr)
        m.lerp_(g, 1 - beta2)

        exp_avgs[i].copy_(m)
        p.detach().copy_(w)
