"""A test helper: make every host-synchronising Tensor method raise.

On a CPU nothing synchronises, but the same Python calls (``.item()``,
``bool(t)``, ``.cpu()``, ...) are what would read a device tensor on a GPU;
forbidding them while a step runs shows the step's host code reads no tensor.
(The compiled CPU ops read their 0-dim arguments in C++, as the CUDA ops pass
them to the kernels by pointer; that is below this check.)
"""

from __future__ import annotations

import contextlib

import torch


@contextlib.contextmanager
def forbid_host_sync():
    """Make every host-synchronising Tensor method raise while active."""
    names = ("item", "__bool__", "cpu", "tolist", "__float__", "__int__", "numpy")
    saved = {name: getattr(torch.Tensor, name) for name in names}

    def make(name):
        def forbidden(self, *args, **kwargs):
            raise AssertionError(f"host sync: Tensor.{name} called during the step")

        return forbidden

    for name in names:
        setattr(torch.Tensor, name, make(name))
    try:
        yield
    finally:
        for name, fn in saved.items():
            setattr(torch.Tensor, name, fn)
