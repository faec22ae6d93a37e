"""Launch structure of the Triton backend: launch count, host syncs, the chunk table.

All on CPU tensors under TRITON_INTERPRET=1.
"""

import contextlib

import pytest
import torch
from triton.runtime.interpreter import InterpretedFunction

import fastopt
from fastopt.backends import reference as ref_backend
from fastopt.backends import triton as triton_backend

pytestmark = pytest.mark.skipif(
    not triton_backend.supports(torch.device("cpu")), reason="needs TRITON_INTERPRET=1"
)

mt = triton_backend.kernels().multi_tensor if triton_backend.available() is None else None


@contextlib.contextmanager
def count_launches():
    """Count every Triton kernel launch (each ``kernel[grid](...)`` is one ``run``)."""
    launches = []
    original = InterpretedFunction.run

    def counting_run(self, *args, **kwargs):
        launches.append(self.fn.__name__)
        return original(self, *args, **kwargs)

    InterpretedFunction.run = counting_run
    try:
        yield launches
    finally:
        InterpretedFunction.run = original


def model_params(n_tensors, dtype=torch.float32):
    gen = torch.Generator().manual_seed(n_tensors)
    params = [
        torch.randn(1 + (i * 7) % 40, generator=gen, dtype=torch.float32).to(dtype).requires_grad_()
        for i in range(n_tensors)
    ]
    for p in params:
        p.grad = torch.randn(p.shape, generator=gen).to(dtype)
    return params


@pytest.mark.parametrize("opt_cls", [fastopt.AdamW, fastopt.Lion])
def test_launches_per_step_do_not_grow_with_tensor_count(opt_cls):
    counts = {}
    for n in (1, 10, 1000):
        opt = opt_cls(model_params(n), lr=1e-3, max_grad_norm=1.0, backend="triton")
        with count_launches() as launches:
            opt.step()
        counts[n] = list(launches)
    # One norm launch and one update launch per (device, dtype) group.
    assert counts[1] == counts[10] == counts[1000], counts
    assert len(counts[1]) == 2, counts


def test_one_update_launch_per_dtype_group():
    params = model_params(30, torch.float32) + model_params(20, torch.bfloat16)
    opt = fastopt.AdamW(params, lr=1e-3, backend="triton")
    with count_launches() as launches:
        opt.step()
    assert launches == ["_adamw_kernel", "_adamw_kernel"], launches


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


def test_backend_calls_never_read_device_tensors():
    """lr, steps, grad_scale and found_inf as tensors: all read by the kernels only."""
    params = model_params(12)
    grads = [p.grad.detach() for p in params]
    ps = [p.detach() for p in params]
    m = [torch.zeros_like(p) for p in ps]
    v = [torch.zeros_like(p) for p in ps]
    vmax = [torch.zeros_like(p) for p in ps]
    steps = [torch.tensor(1.0 + i % 3) for i in range(len(ps))]
    common = dict(lr=torch.tensor(1e-3), beta1=0.9, beta2=0.999, weight_decay=0.1, maximize=False,
                  grad_scale=torch.tensor(0.5), found_inf=torch.tensor(0.0))  # fmt: skip
    with forbid_host_sync():
        triton_backend.grad_sumsq(grads)
        triton_backend.adamw_(ps, grads, m, v, vmax, [], steps, eps=1e-8, amsgrad=True, **common)
        triton_backend.lion_(ps, grads, m, [], **common)
        # And again, now hitting the table cache.
        triton_backend.adamw_(ps, grads, m, v, vmax, [], steps, eps=1e-8, amsgrad=True, **common)


@pytest.mark.parametrize("opt_cls", [fastopt.AdamW, fastopt.Lion])
def test_optimizer_step_on_triton_path_does_not_sync(opt_cls):
    params = model_params(8)
    opt = opt_cls(params, lr=torch.tensor(1e-3), backend="triton")
    opt.step()
    with forbid_host_sync():
        opt.step()
        opt.step()


def test_table_cache_hits_when_addresses_repeat_and_rebuilds_when_they_change():
    mt.clear_cache()
    ps = [torch.randn(n) for n in (5, 9000)]
    gs = [torch.randn_like(p) for p in ps]
    triton_backend.grad_sumsq(gs)
    triton_backend.grad_sumsq(gs)
    assert len(mt._tables) == 1
    gs2 = [g.clone() for g in gs]
    torch.testing.assert_close(triton_backend.grad_sumsq(gs2), ref_backend.grad_sumsq(gs2))
    assert len(mt._tables) == 2


# ---- 64-bit offsets -----------------------------------------------------------------

BIG = 2**31 + 5


def test_chunk_table_covers_a_tensor_beyond_2_pow_31_elements():
    """The launch metadata for a 2^31+5-element tensor (built from sizes alone)."""
    numels = [3, BIG, 1]
    entries = mt.chunk_entries(numels)
    assert entries.dtype == torch.int64
    n_big = -(-BIG // mt.CHUNK)
    assert entries.numel() == 1 + n_big + 1
    decoded = [mt.decode_chunk(int(e)) for e in entries[[0, 1, n_big - 1, n_big, n_big + 1]]]
    assert decoded[0] == (0, 0)
    assert decoded[1] == (1, 0)
    # The last chunks of the big tensor start past 2^31 and end exactly at its size.
    t, start = decoded[3]
    assert t == 1 and start == (n_big - 1) * mt.CHUNK and start >= 2**31 - mt.CHUNK
    assert start < BIG <= start + mt.CHUNK
    assert decoded[2][1] == (n_big - 2) * mt.CHUNK
    assert decoded[4] == (2, 0)
    # Every element of the big tensor is covered exactly once.
    big = entries[(entries >> 32) == 1]
    starts = (big & 0xFFFFFFFF) * mt.CHUNK
    assert torch.equal(starts, torch.arange(n_big, dtype=torch.int64) * mt.CHUNK)


def test_kernel_offsets_are_64_bit_for_a_tensor_beyond_2_pow_31_elements():
    """Run the AdamW kernel on the last chunk of a fake 2^31+5-element tensor.

    The table row claims BIG elements at a base address placed so that the
    chunk's elements [start, BIG) land in small real buffers. With 32-bit
    offset arithmetic the kernel would address ~2^31 elements below the
    buffers and fail or write elsewhere; with 64-bit it updates exactly the
    tail, which must match the reference.
    """
    n_big = -(-BIG // mt.CHUNK)
    start = (n_big - 1) * mt.CHUNK
    assert start >= 2**31  # int32 arithmetic would wrap this to a negative offset
    tail = BIG - start
    gen = torch.Generator().manual_seed(0)
    p, g = torch.randn(tail, generator=gen), torch.randn(tail, generator=gen)
    m, v = torch.randn(tail, generator=gen) * 0.1, torch.rand(tail, generator=gen) * 0.01
    step = torch.tensor(3.0)
    want = [t.clone() for t in (p, g, m, v)]
    ref_backend.adamw_([want[0]], [want[1]], [want[2]], [want[3]], [], [], [step.clone()],
                       lr=1e-3, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.1,
                       amsgrad=False, maximize=False, grad_scale=None, found_inf=None)  # fmt: skip

    def fake_base(t):
        return t.data_ptr() - start * t.element_size()

    rows = torch.zeros(1, mt.ROW_WIDTH, dtype=torch.int64)
    rows[0, mt.ROW_NUMEL] = BIG
    rows[0, mt.ROW_STEP] = step.data_ptr()
    for k, t in enumerate((p, g, m, v, p, p)):
        rows[0, mt.ROW_ARRAYS + k] = fake_base(t)
    chunks = torch.tensor([(0 << 32) | (n_big - 1)], dtype=torch.int64)
    table = mt.LaunchTable(chunks=chunks, rows=rows, n_chunks=1, aligned=False, host=rows)
    original = mt.launch_table
    mt.launch_table = lambda arrays, steps=None: table
    try:
        triton_backend.adamw_([torch.empty(1)], [torch.empty(1)], [torch.empty(1)], [torch.empty(1)], [], [],
                              [step], lr=1e-3, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.1,
                              amsgrad=False, maximize=False, grad_scale=None, found_inf=None)  # fmt: skip
    finally:
        mt.launch_table = original
    for got, exp in zip((p, m, v), (want[0], want[2], want[3]), strict=False):
        torch.testing.assert_close(got, exp)


def test_rejects_tensors_the_kernels_cannot_address():
    mt.clear_cache()
    p = torch.randn(4, 6)
    common = dict(lr=1e-3, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.0, amsgrad=False,
                  maximize=False, grad_scale=None, found_inf=None)  # fmt: skip
    g_t = torch.randn(6, 4).t()  # same shape, not contiguous
    with pytest.raises(ValueError, match="contiguous"):
        triton_backend.adamw_([p], [g_t], [torch.zeros_like(p)], [torch.zeros_like(p)], [], [],
                              [torch.tensor(1.0)], **common)  # fmt: skip
    with pytest.raises(ValueError, match="step"):
        triton_backend.adamw_([p], [torch.randn(4, 6)], [torch.zeros_like(p)], [torch.zeros_like(p)],
                              [], [], [torch.tensor(1.0, dtype=torch.float64)], **common)  # fmt: skip
