"""The functional API: one function per optimizer over lists of tensors, in torch's shape.

The optimizer classes gather their tensors into these lists and call these
functions; a script may call them directly. Every list is parallel to
``params``; all tensors of one call live on one device. Each call resolves
one backend (:func:`fastopt.backends.resolve`) and makes one call into it,
which is a fixed, small number of kernel launches whatever the number of
tensors.

Arguments every function takes:

* ``params`` and ``grads``: the parameters (updated in place) and their
  gradients (read only).
* ``master_params``: fp32 masters of bf16/fp16 params (empty list or None: no
  master weights); the parameter is written as the master rounded to nearest
  even. Or int16 remainders of bf16 params (``master_weights="remainder"``):
  param and remainder hold the fp32 master exactly and the parameter is
  written as the master rounded to nearest, ties away from zero (NOTE [master
  remainder] in csrc/include/fastopt/update_math.h); a remainder whose
  parameter was overwritten since the last call is reset (NOTE [stale
  remainder] in fastopt/_compressed.py).
* the moment lists share one dtype: float32, bfloat16 or the params' dtype
  (the optimizers' ``state_dtype``); every store rounds to nearest even.
* ``state_steps`` (AdamW, AdEMAMix): float32 0-dim tensors holding each
  tensor's step count ``t``, already incremented for this step.
* ``lr``: a float or a 0-dim tensor (a tensor lr stays on the device: no sync).
* the gradient transform, in this order (SPEC §3; NOTE [gradient transform] in
  csrc/include/fastopt/update_math.h):
  ``g <- clamp(g * grad_mul, -max_grad_value, max_grad_value) * clip_coef``,
  then ``-g`` if ``maximize``. ``grad_mul`` is the gradient multiplier (the
  loss-scale reciprocal, and the clip coefficient too when there is no value
  clipping); ``clip_coef`` is the global-norm clip coefficient when value
  clipping sits between the two. Both are float32 0-dim tensors or None (1).
* ``skip``: None or a float32 0-dim tensor; non-zero skips the whole call
  (nothing is written). The optimizers pass the combined skip flag: a
  non-finite global norm or the scaler's ``found_inf``.
* ``backend``: ``"auto"``, ``"reference"``, ``"cpu"``, ``"triton"`` or ``"cuda"``.
"""

from __future__ import annotations

from fastopt._norm import grad_sumsq
from fastopt.adamw import adamw
from fastopt.ademamix import ademamix
from fastopt.lion import lion

__all__ = ["adamw", "lion", "ademamix", "grad_sumsq"]
