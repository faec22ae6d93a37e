"""fastopt: fused multi-tensor AdamW, Lion and AdEMAMix as torch.optim drop-ins.

    import fastopt
    opt = fastopt.AdamW(model.parameters(), lr=3e-4, max_grad_norm=1.0)

See SPEC.md for the contract; ``fastopt.available_backends()`` lists what this
install can run; ``fastopt.functional`` has the same updates over tensor lists.
"""

from fastopt import functional, schedules
from fastopt.adamw import AdamW
from fastopt.ademamix import AdEMAMix
from fastopt.backends import available_backends
from fastopt.grad_scaler import GradScaler
from fastopt.lion import Lion

__version__ = "0.1.0"
__all__ = [
    "AdamW", "AdEMAMix", "Lion", "GradScaler", "available_backends", "functional", "schedules",
    "__version__",
]  # fmt: skip
