"""Launch structure of the Triton backend: launch count, host syncs, the chunk table.

All on CPU tensors under TRITON_INTERPRET=1.
"""

import contextlib

import pytest
import torch
from host_sync import forbid_host_sync
from triton.runtime.interpreter import InterpretedFunction

import fastopt
from fastopt.backends import reference as ref_backend
from fastopt.backends import triton as triton_backend

pytestmark = pytest.mark.skipif(
    not triton_backend.supports(torch.device("cpu")), reason="needs TRITON_INTERPRET=1"
)

K = triton_backend.functions() if triton_backend.unavailable() is None else None
mt = K.multi_tensor if K is not None else None

OPTIMIZERS = [fastopt.AdamW, fastopt.Lion, fastopt.AdEMAMix]


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


def transform(**over):
    """The gradient-transform and skip arguments every update op takes."""
    kw = dict(maximize=False, grad_mul=None, max_grad_value=None, clip_coef=None, skip=None)
    kw.update(over)
    return kw


def adamw_kw(**over):
    kw = dict(lr=1e-3, lr_tensor=None, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.1,
              amsgrad=False, **transform())  # fmt: skip
    kw.update(over)
    return kw


def ademamix_kw(**over):
    kw = dict(lr=1e-3, lr_tensor=None, beta1=0.9, beta2=0.999, beta3=0.9999, alpha=5.0,
              t_alpha=100.0, t_beta3=100.0, eps=1e-8, weight_decay=0.01, **transform())  # fmt: skip
    kw.update(over)
    return kw


def lion_kw(**over):
    kw = dict(lr=1e-4, lr_tensor=None, beta1=0.9, beta2=0.99, weight_decay=0.1, **transform())
    kw.update(over)
    return kw


@pytest.mark.parametrize("opt_cls", OPTIMIZERS)
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


@pytest.mark.parametrize("op", ["adamw", "lion", "ademamix"])
def test_fp32_grads_of_bf16_params_are_one_launch(op):
    """The mixed grad dtype (torch's ``Tensor.grad_dtype``): G_DTYPE=fp32, one launch per call."""
    gen = torch.Generator().manual_seed(3)
    params = [torch.randn(n, generator=gen).bfloat16() for n in (5, 9000)]
    grads = [torch.randn(p.shape, generator=gen) for p in params]
    masters = [p.float() for p in params]
    zeros = lambda: [torch.zeros_like(w) for w in masters]  # noqa: E731
    steps = [torch.tensor(1.0) for _ in params]
    with count_launches() as launches:
        if op == "adamw":
            fastopt.functional.adamw(params, grads, zeros(), zeros(), None, masters, steps, lr=1e-3,
                                     beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.0,
                                     amsgrad=False, maximize=False, backend="triton")  # fmt: skip
        elif op == "lion":
            fastopt.functional.lion(params, grads, zeros(), masters, lr=1e-4, beta1=0.9, beta2=0.99,
                                    weight_decay=0.0, maximize=False, backend="triton")  # fmt: skip
        else:
            fastopt.functional.ademamix(params, grads, zeros(), zeros(), zeros(), masters, steps,
                                        lr=1e-3, beta1=0.9, beta2=0.999, beta3=0.9999, alpha=5.0,
                                        t_alpha=None, t_beta3=None, eps=1e-8, weight_decay=0.0,
                                        maximize=False, backend="triton")  # fmt: skip
    assert launches == [f"_{op}_kernel"], launches
    for w, p in zip(masters, params, strict=True):
        assert torch.equal(p.view(torch.int16), w.bfloat16().view(torch.int16))


def test_one_gradient_dtype_per_call():
    """Grads of one call share a dtype (one launch, one G_DTYPE); a mix is refused."""
    mt.clear_cache()
    params = [torch.randn(4).bfloat16() for _ in range(2)]
    grads = [torch.randn(4), torch.randn(4).bfloat16()]
    masters = [p.float() for p in params]
    with pytest.raises(ValueError, match="gradient"):
        K.lion_(params, grads, [torch.zeros(4) for _ in params], masters, **lion_kw())


def test_backend_calls_never_read_device_tensors():
    """lr_tensor, steps, grad_mul, clip_coef and skip as tensors: all read by the kernels only."""
    params = model_params(12)
    grads = [p.grad.detach() for p in params]
    ps = [p.detach() for p in params]
    zeros = lambda: [torch.zeros_like(p) for p in ps]  # noqa: E731
    m, v, vmax, m2 = zeros(), zeros(), zeros(), zeros()
    steps = [torch.tensor(1.0 + i % 3) for i in range(len(ps))]
    scalars = dict(lr_tensor=torch.tensor(1e-3), grad_mul=torch.tensor(0.5), max_grad_value=2.0,
                   clip_coef=torch.tensor(0.9), skip=torch.tensor(0.0))  # fmt: skip
    with forbid_host_sync():
        K.grad_sumsq(grads, grad_mul=scalars["grad_mul"], max_grad_value=2.0)
        K.adamw_(ps, grads, m, v, vmax, [], steps, **adamw_kw(amsgrad=True, **scalars))
        K.lion_(ps, grads, m, [], **lion_kw(**scalars))
        K.ademamix_(ps, grads, m, m2, v, [], steps, **ademamix_kw(**scalars))
        # And again, now hitting the table cache.
        K.adamw_(ps, grads, m, v, vmax, [], steps, **adamw_kw(amsgrad=True, **scalars))


@pytest.mark.parametrize("opt_cls", OPTIMIZERS)
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
    K.grad_sumsq(gs)
    K.grad_sumsq(gs)
    assert len(mt._tables) == 1
    gs2 = [g.clone() for g in gs]
    torch.testing.assert_close(K.grad_sumsq(gs2), ref_backend.grad_sumsq(gs2))
    assert len(mt._tables) == 2


# ---- 64-bit offsets -----------------------------------------------------------------

BIG = 2**31 + 5


def test_chunk_table_covers_a_tensor_beyond_2_pow_31_elements():
    """The launch metadata for a 2^31+5-element tensor (built from sizes alone)."""
    chunk = mt.CHUNK.value
    numels = [3, BIG, 1]
    entries = mt.chunk_entries(numels)
    assert entries.dtype == torch.int64
    n_big = -(-BIG // chunk)
    assert entries.numel() == 1 + n_big + 1
    decoded = [mt.decode_chunk(int(e)) for e in entries[[0, 1, n_big - 1, n_big, n_big + 1]]]
    assert decoded[0] == (0, 0)
    assert decoded[1] == (1, 0)
    # The last chunks of the big tensor start past 2^31 and end exactly at its size.
    t, start = decoded[3]
    assert t == 1 and start == (n_big - 1) * chunk and start >= 2**31 - chunk
    assert start < BIG <= start + chunk
    assert decoded[2][1] == (n_big - 2) * chunk
    assert decoded[4] == (2, 0)
    # Every element of the big tensor is covered exactly once.
    big = entries[(entries >> 32) == 1]
    starts = (big & 0xFFFFFFFF) * chunk
    assert torch.equal(starts, torch.arange(n_big, dtype=torch.int64) * chunk)


@pytest.mark.parametrize("op", ["adamw", "lion", "ademamix"])
def test_kernel_offsets_are_64_bit_for_a_tensor_beyond_2_pow_31_elements(op):
    """Run an update kernel on the last chunk of a fake 2^31+5-element tensor.

    The table row claims BIG elements at base addresses placed so that the
    chunk's elements [start, BIG) land in small real buffers. With 32-bit
    offset arithmetic the kernel would address ~2^31 elements below the
    buffers and fail or write elsewhere; with 64-bit it updates exactly the
    tail, which must match the reference.
    """
    chunk = mt.CHUNK.value
    n_big = -(-BIG // chunk)
    start = (n_big - 1) * chunk
    assert start >= 2**31  # int32 arithmetic would wrap this to a negative offset
    tail = BIG - start
    gen = torch.Generator().manual_seed(0)
    p, g = torch.randn(tail, generator=gen), torch.randn(tail, generator=gen)
    m1, m2 = torch.randn(tail, generator=gen) * 0.1, torch.randn(tail, generator=gen) * 0.1
    v = torch.rand(tail, generator=gen) * 0.01
    step = torch.tensor(3.0)
    # The arrays in the kernel's slot order: param, grad, master (the param again), states.
    arrays = {"adamw": (p, g, p, m1, v), "lion": (p, g, p, m1), "ademamix": (p, g, p, m1, m2, v)}[
        op
    ]
    want = [t.clone() for t in arrays]

    def run(impl, a, steps):
        one = lambda t: [t]  # noqa: E731
        if op == "adamw":
            impl.adamw_(one(a[0]), one(a[1]), one(a[3]), one(a[4]), [], [], steps, **adamw_kw())
        elif op == "lion":
            impl.lion_(one(a[0]), one(a[1]), one(a[3]), [], **lion_kw())
        else:
            impl.ademamix_(one(a[0]), one(a[1]), one(a[3]), one(a[4]), one(a[5]), [], steps,
                           **ademamix_kw())  # fmt: skip

    run(ref_backend, want, [step.clone()])

    rows = torch.zeros(1, mt.ROW_WIDTH.value, dtype=torch.int64)
    rows[0, mt.ROW_NUMEL.value] = BIG
    rows[0, mt.ROW_STEP.value] = step.data_ptr()
    for k, t in enumerate(arrays):
        rows[0, mt.ROW_ARRAYS.value + k] = t.data_ptr() - start * t.element_size()
    chunks = torch.tensor([(0 << 32) | (n_big - 1)], dtype=torch.int64)
    table = mt.LaunchTable(chunks=chunks, rows=rows, n_chunks=1, aligned=False, host=rows)
    original = mt.launch_table
    mt.launch_table = lambda arrays, dtypes, steps=None: table
    try:
        run(K, [torch.empty(1)] * len(arrays), [step])
    finally:
        mt.launch_table = original
    for k, (got, exp) in enumerate(zip(arrays, want, strict=True)):
        if k != 2:  # slot 2 (master) repeats the param without master weights
            torch.testing.assert_close(got, exp)


def test_rejects_tensors_the_kernels_cannot_address():
    mt.clear_cache()
    p = torch.randn(4, 6)
    zeros = torch.zeros_like
    g_t = torch.randn(6, 4).t()  # same shape, not contiguous
    with pytest.raises(ValueError, match="contiguous"):
        K.adamw_([p], [g_t], [zeros(p)], [zeros(p)], [], [], [torch.tensor(1.0)], **adamw_kw())
    with pytest.raises(ValueError, match="step"):
        K.adamw_([p], [torch.randn(4, 6)], [zeros(p)], [zeros(p)], [], [],
                 [torch.tensor(1.0, dtype=torch.float64)], **adamw_kw())  # fmt: skip
    # Every moment list of a call has the dtype of exp_avgs (the kernel reads them as
    # one storage type: state_dtype), masters or not.
    pb = p.bfloat16()
    with pytest.raises(ValueError, match="array"):
        K.adamw_([pb], [pb.clone()], [zeros(pb)], [zeros(p)], [], [p.clone()],
                 [torch.tensor(1.0)], **adamw_kw())  # fmt: skip
    # Moments in fp16 for bf16 params are no storage the kernels have.
    with pytest.raises(ValueError, match="moments"):
        K.adamw_([pb], [pb.clone()], [zeros(p).half()], [zeros(p).half()], [], [],
                 [torch.tensor(1.0)], **adamw_kw())  # fmt: skip
