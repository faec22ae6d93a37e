"""fastopt: fused multi-tensor AdamW and Lion as torch.optim drop-ins.

    import fastopt
    opt = fastopt.AdamW(model.parameters(), lr=3e-4, max_grad_norm=1.0)

See SPEC.md for the contract; ``fastopt.available_backends()`` lists what this
install can run.
"""

from fastopt import _ops  # noqa: F401  (loads the compiled ops when they were built)
from fastopt.adamw import AdamW
from fastopt.backends import available_backends
from fastopt.grad_scaler import GradScaler
from fastopt.lion import Lion

__version__ = "0.1.0"
__all__ = ["AdamW", "Lion", "GradScaler", "available_backends", "__version__"]
