"""Shared fixtures. TRITON_INTERPRET must be set before triton is first imported:
the triton backend is tested for real on CPU tensors under the interpreter."""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402
from hypothesis import settings  # noqa: E402

import fastopt  # noqa: E402

torch.set_num_threads(min(2, os.cpu_count() or 1))

# CI explores a fixed sequence of examples (reproducible runs); developers' runs
# draw new ones each time, so the search keeps widening.
settings.register_profile("ci", derandomize=True, deadline=None, print_blob=True)
if os.environ.get("CI"):
    settings.load_profile("ci")

# Backends that can run CPU tensors in this process (cuda needs a device).
CPU_BACKENDS = [
    b
    for b in fastopt.available_backends()
    if fastopt.backends._module(b).supports(torch.device("cpu"))
]


@pytest.fixture(params=CPU_BACKENDS)
def backend(request):
    """Every backend that runs CPU tensors here: reference, cpu, triton (interpreter)."""
    return request.param


def clone_params(params):
    """Independent leaf copies (same values, same requires_grad) of a list of tensors."""
    return [p.detach().clone().requires_grad_(True) for p in params]


def set_grads(params, grads):
    for p, g in zip(params, grads):
        p.grad = None if g is None else g.clone()


def assert_state_equal(opt_a, params_a, opt_b, params_b, keys, **tol):
    """Parameters and every listed state tensor of two optimizers agree."""
    for i, (pa, pb) in enumerate(zip(params_a, params_b)):
        torch.testing.assert_close(pa, pb, msg=lambda m, i=i: f"param {i}: {m}", **tol)
        sa, sb = opt_a.state[pa], opt_b.state[pb]
        assert set(keys) <= set(sa) and set(keys) <= set(sb) or (not sa and not sb), (i, sa.keys(), sb.keys())
        for k in keys:
            if k in sa or k in sb:
                torch.testing.assert_close(
                    sa[k].to(sb[k].dtype), sb[k], msg=lambda m, i=i, k=k: f"param {i} state {k}: {m}", **tol
                )
