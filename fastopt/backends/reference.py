"""The reference backend: plain PyTorch, one tensor at a time, in fp32 (fp64 for fp64).

This is the specification in code and the oracle of every test. It follows the
order of operations of torch's single-tensor AdamW (``lerp_`` for the first
moment, ``addcmul_`` for the second, ``addcdiv_`` for the step) so that fp32
results agree with ``torch.optim.AdamW(foreach=False)``, and computes every
element in fp32 whatever the storage dtype, narrowing once on the store
(``Tensor.copy_`` rounds to nearest even). Each function has the signature of
the compiled op of the same name (csrc/ops.cpp); the arguments and their types
are explained in fastopt/functional.py.

It reads ``skip``, ``lr_tensor`` and the steps on the host: it is written for
clarity, and runs the few tensors the fast backends do not take (float64,
non-contiguous layouts).
"""

from __future__ import annotations

import math
import sys
from types import ModuleType

import torch
from torch import Tensor

from fastopt import _compressed


def _value(x: Tensor | None, default: float) -> float:
    return default if x is None else float(x.item())


def _opmath(t: Tensor) -> torch.dtype:
    # fp32 in registers for fp32/bf16/fp16 storage (SPEC §2); float64 storage is
    # computed in float64, as torch does, since narrowing it would lose precision.
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def _transform(
    g: Tensor,
    grad_mul: Tensor | None,
    max_grad_value: float | None,
    clip_coef: Tensor | None,
    maximize: bool = False,
) -> Tensor:
    """NOTE [gradient transform] (update_math.h): unscale, clamp by value, clip by norm."""
    g = g.detach().to(_opmath(g))
    if grad_mul is not None:
        g = g * grad_mul.to(device=g.device, dtype=torch.float32).to(g.dtype)
    if max_grad_value is not None:
        g = g.clamp(-max_grad_value, max_grad_value)  # clamp keeps NaN a NaN
    if clip_coef is not None:
        g = g * clip_coef.to(device=g.device, dtype=torch.float32).to(g.dtype)
    return -g if maximize else g


def grad_sumsq(
    grads: list[Tensor], *, grad_mul: Tensor | None = None, max_grad_value: float | None = None
) -> Tensor:
    """sum of clamp(g * grad_mul, -c, c)^2 over all elements, accumulated in float64, as fp32."""
    if not grads:
        return torch.zeros((), dtype=torch.float32)
    total = torch.zeros((), dtype=torch.float64, device=grads[0].device)
    for g in grads:
        if g.numel():
            total += _transform(g, grad_mul, max_grad_value, None).double().square().sum()
    return total.float()


def _check(op: str, params: list[Tensor], **lists: list[Tensor]) -> None:
    """The ops' rule that a call that fails writes nothing: every list checked
    (length, per tensor numel and device) before the first write."""
    for name, tensors in lists.items():
        if not tensors:
            continue
        if len(tensors) != len(params):
            raise RuntimeError(f"{op}: {name} has {len(tensors)} tensors, params {len(params)}")
        for i, (t, p) in enumerate(zip(tensors, params)):
            # an 8-bit moment holds its codes and scales (NOTE [int8 moments])
            size = _compressed.q8_bytes(p.numel()) if _compressed.is_q8(t) else p.numel()
            if t.numel() != size or t.device != p.device:
                raise RuntimeError(
                    f"{op}: {name}[{i}] has {t.numel()} elements on {t.device}, "
                    f"params[{i}] {p.numel()} on {p.device}"
                )


def _weight(master_params: list[Tensor], i: int, p: Tensor, dtype: torch.dtype) -> Tensor:
    """The value the update runs on: the fp32 master (stored, or joined from p and its
    remainder: NOTE [master remainder]), else an fp32 copy of p."""
    if not master_params:
        return p.detach().to(dtype)
    master = master_params[i]
    return _compressed.join(p, master) if master.dtype == torch.int16 else master


def _store_weight(master_params: list[Tensor], i: int, p: Tensor, w: Tensor) -> None:
    """Write the updated weight: into p (rounded to nearest even) after the fp32 master
    was updated in place, or split into p and its remainder."""
    if master_params and master_params[i].dtype == torch.int16:
        _compressed.store(p, master_params[i], w)
    else:
        p.detach().copy_(w)


def _load_moment(t: Tensor, p: Tensor, dtype: torch.dtype, signed: bool = True) -> Tensor:
    """A moment in fp32 (a fresh tensor shaped like p), decoded when 8-bit."""
    if _compressed.is_q8(t):
        return _compressed.q8_decode(t, p.numel(), signed).to(dtype).view(p.shape)
    return t.to(dtype)


def _store_moment(t: Tensor, x: Tensor, signed: bool = True) -> None:
    """Store moment ``x``: rounded to nearest even, or coded (NOTE [int8 moments])."""
    if _compressed.is_q8(t):
        _compressed.q8_encode_into(t, x, signed)
    else:
        t.copy_(x)


def adamw_(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, master_params, state_steps, *,
           lr, lr_tensor, beta1, beta2, eps, weight_decay, amsgrad, maximize,
           grad_mul, max_grad_value, clip_coef, skip) -> None:  # fmt: skip
    r"""AdamW, per tensor, in fp32.

    .. math::
        \theta \gets \theta(1-\eta\lambda);\quad
        m \gets \mathrm{lerp}(m, g, 1-\beta_1);\quad v \gets \beta_2 v + (1-\beta_2) g^2 \\
        \hat v = \max(\hat v, v) \text{ (amsgrad) else } v;\quad
        \theta \gets \theta - \frac{\eta}{1-\beta_1^t}\,
            \frac{m}{\sqrt{\hat v}/\sqrt{1-\beta_2^t} + \epsilon}
    """
    if _value(skip, 0.0) != 0.0:
        return
    _check("adamw_", params, grads=grads, exp_avgs=exp_avgs, exp_avg_sqs=exp_avg_sqs,
           max_exp_avg_sqs=max_exp_avg_sqs, master_params=master_params)  # fmt: skip
    lr = _value(lr_tensor, lr)
    for i, p in enumerate(params):
        step = float(state_steps[i].item())
        g = _transform(grads[i], grad_mul, max_grad_value, clip_coef, maximize)
        w = _weight(master_params, i, p, g.dtype)
        m = _load_moment(exp_avgs[i], p, g.dtype)
        v = _load_moment(exp_avg_sqs[i], p, g.dtype, signed=False)

        w.mul_(1 - lr * weight_decay)
        m.lerp_(g, 1 - beta1)
        v.mul_(beta2).addcmul_(g, g, value=1 - beta2)
        if amsgrad:
            vmax = torch.maximum(_load_moment(max_exp_avg_sqs[i], p, g.dtype, signed=False), v)
            _store_moment(max_exp_avg_sqs[i], vmax, signed=False)
            v_used = vmax
        else:
            v_used = v
        step_size = lr / (1 - beta1**step)
        denom = (v_used.sqrt() / math.sqrt(1 - beta2**step)).add_(eps)
        w.addcdiv_(m, denom, value=-step_size)

        _store_moment(exp_avgs[i], m)
        _store_moment(exp_avg_sqs[i], v, signed=False)
        _store_weight(master_params, i, p, w)


def lion_(params, grads, exp_avgs, master_params, *,
          lr, lr_tensor, beta1, beta2, weight_decay, maximize, grad_mul, max_grad_value, clip_coef,
          skip) -> None:  # fmt: skip
    r"""Lion (Chen et al. 2023), per tensor, in fp32.

    .. math::
        c = \mathrm{lerp}(m, g, 1-\beta_1);\quad \theta \gets \theta(1-\eta\lambda)
            - \eta\,\mathrm{sign}(c);\quad m \gets \mathrm{lerp}(m, g, 1-\beta_2)
    """
    if _value(skip, 0.0) != 0.0:
        return
    _check("lion_", params, grads=grads, exp_avgs=exp_avgs, master_params=master_params)
    lr = _value(lr_tensor, lr)
    for i, p in enumerate(params):
        g = _transform(grads[i], grad_mul, max_grad_value, clip_coef, maximize)
        w = _weight(master_params, i, p, g.dtype)
        m = _load_moment(exp_avgs[i], p, g.dtype)

        c = m.lerp(g, 1 - beta1)
        # sign(0) = 0; a NaN stays NaN (torch.sign maps it to 0, which would hide it).
        update = torch.where(c.isnan(), c, c.sign())
        w.mul_(1 - lr * weight_decay).add_(update, alpha=-lr)
        m.lerp_(g, 1 - beta2)

        _store_moment(exp_avgs[i], m)
        _store_weight(master_params, i, p, w)


def ademamix_schedules(
    step: float, alpha: float, beta1: float, beta3: float, t_alpha: float | None, t_beta3: float | None
) -> tuple[float, float]:
    """(alpha_t, beta3_t) of AdEMAMix's warm-up schedulers at step t (SPEC §2), in double."""
    alpha_t = alpha if t_alpha is None else min(step * alpha / t_alpha, alpha)
    if t_beta3 is None:
        return alpha_t, beta3
    frac = step / t_beta3
    log1, log3 = math.log(beta1), math.log(beta3)
    beta3_t = min(math.exp(log1 * log3 / ((1 - frac) * log3 + frac * log1)), beta3)
    return alpha_t, beta3_t


def ademamix_(params, grads, exp_avgs, exp_avgs_slow, exp_avg_sqs, master_params, state_steps, *,
              lr, lr_tensor, beta1, beta2, beta3, alpha, t_alpha, t_beta3, eps, weight_decay,
              maximize, grad_mul, max_grad_value, clip_coef, skip) -> None:  # fmt: skip
    r"""AdEMAMix (Pagliardini et al. 2024, Algorithm 1), per tensor, in fp32.

    .. math::
        m_1 \gets \mathrm{lerp}(m_1, g, 1-\beta_1);\quad
        m_2 \gets \mathrm{lerp}(m_2, g, 1-\beta_{3,t});\quad v \gets \beta_2 v + (1-\beta_2) g^2 \\
        \theta \gets \theta - \eta\left(\frac{m_1/(1-\beta_1^t) + \alpha_t m_2}
            {\sqrt{v}/\sqrt{1-\beta_2^t} + \epsilon} + \lambda\theta\right)
    """
    if _value(skip, 0.0) != 0.0:
        return
    _check("ademamix_", params, grads=grads, exp_avgs=exp_avgs, exp_avgs_slow=exp_avgs_slow,
           exp_avg_sqs=exp_avg_sqs, master_params=master_params)  # fmt: skip
    lr = _value(lr_tensor, lr)
    for i, p in enumerate(params):
        step = float(state_steps[i].item())
        alpha_t, beta3_t = ademamix_schedules(step, alpha, beta1, beta3, t_alpha, t_beta3)
        g = _transform(grads[i], grad_mul, max_grad_value, clip_coef, maximize)
        w = _weight(master_params, i, p, g.dtype)
        m1 = _load_moment(exp_avgs[i], p, g.dtype)
        m2 = _load_moment(exp_avgs_slow[i], p, g.dtype)
        v = _load_moment(exp_avg_sqs[i], p, g.dtype, signed=False)

        m1.lerp_(g, 1 - beta1)
        m2.lerp_(g, 1 - beta3_t)
        v.mul_(beta2).addcmul_(g, g, value=1 - beta2)
        denom = (v.sqrt() / math.sqrt(1 - beta2**step)).add_(eps)
        update = (m1 / (1 - beta1**step) + alpha_t * m2) / denom + weight_decay * w
        w.add_(update, alpha=-lr)

        _store_moment(exp_avgs[i], m1)
        _store_moment(exp_avgs_slow[i], m2)
        _store_moment(exp_avg_sqs[i], v, signed=False)
        _store_weight(master_params, i, p, w)


def unavailable(device_type: str | None) -> str | None:
    return None


def supports(device: torch.device) -> bool:
    return True


def functions() -> ModuleType:
    """The update functions: this module's own (they have the ops' signatures)."""
    return sys.modules[__name__]
