"""``capturable=True``: the whole step is device work, with no host read.

On a GPU the step (norm, clip, skip, update, step counters, the GradScaler
protocol) is captured into a CUDA graph and replayed, and must equal eager
steps bit for bit; under ``torch.cuda.set_sync_debug_mode("error")`` an eager
step raises nothing. On the CPU the flag takes the same path (the skip flag
goes to the kernels as a tensor instead of being read for an early return),
checked with the patched-method guard of tests/host_sync.py and against
``capturable=False`` bit for bit, skipped steps included.
"""

from __future__ import annotations

import pytest
import torch
from host_sync import forbid_host_sync

import fastopt

SIZES = (0, 1, 3, 1025, 4099)
SKIP_AT = (2, 5)

OPTIMIZERS = {
    "adamw": lambda ps, **kw: fastopt.AdamW(ps, weight_decay=0.1, **kw),
    "lion": lambda ps, **kw: fastopt.Lion(ps, weight_decay=0.1, **kw),
    "ademamix": lambda ps, **kw: fastopt.AdEMAMix(ps, t_alpha=5, t_beta3=5, **kw),
}


def _grads(steps: int, device) -> list[list[torch.Tensor]]:
    gen = torch.Generator().manual_seed(3)
    out = []
    for i in range(steps):
        gs = [torch.randn(n, generator=gen) * 64.0 for n in SIZES]  # "scaled" by 64
        if i in SKIP_AT:
            gs[-2][7] = float("inf")
        out.append([g.to(device) for g in gs])
    return out


def _make(name, device, backend, capturable):
    gen = torch.Generator().manual_seed(0)
    params = [torch.randn(n, generator=gen).to(device).requires_grad_() for n in SIZES]
    lr = torch.tensor(1e-2, device=device)
    opt = OPTIMIZERS[name](params, lr=lr, backend=backend, max_grad_norm=1.0,
                           capturable=capturable)  # fmt: skip
    # GradScaler's protocol for fused optimizers: the loss scale and a fresh
    # found_inf flag set on the optimizer before each step
    opt.grad_scale = torch.tensor(64.0, device=device)
    opt.found_inf = torch.zeros((), device=device)
    return params, opt


def _assert_same(pa, oa, pb, ob):
    for x, y in zip(pa, pb):
        assert torch.equal(x, y)
        assert oa.state[x].keys() == ob.state[y].keys()
        for key in oa.state[x]:
            assert torch.equal(oa.state[x][key], ob.state[y][key]), key
    assert (oa.applied_steps, oa.skipped_steps) == (ob.applied_steps, ob.skipped_steps)
    assert ob.skipped_steps == len(SKIP_AT)


def _cpu_backends():
    return [b for b in ("cpu", "triton") if b in fastopt.available_backends()
            and fastopt.backends._module(b).supports(torch.device("cpu"))]  # fmt: skip


@pytest.mark.parametrize("backend", _cpu_backends())
@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_capturable_cpu_step_reads_nothing_on_the_host_and_matches(name, backend):
    grads = _grads(8, "cpu")
    ref_params, ref = _make(name, "cpu", backend, capturable=False)
    params, opt = _make(name, "cpu", backend, capturable=True)
    for gs in grads:
        for p, q, g in zip(ref_params, params, gs):
            p.grad, q.grad = g.clone(), g.clone()
        ref.found_inf.zero_()
        ref.step()
        opt.found_inf.zero_()
        with forbid_host_sync():
            opt.step()
    _assert_same(ref_params, ref, params, opt)


def test_capturable_flag_is_what_keeps_the_host_read_out():
    """The guard above can fail: without capturable the eager CPU step reads the
    skip flag (``.item()``) to return early."""
    params, opt = _make("adamw", "cpu", "cpu", capturable=False)
    for p, g in zip(params, _grads(1, "cpu")[0]):
        p.grad = g
    with pytest.raises(AssertionError, match="host sync"), forbid_host_sync():
        opt.step()


def _gpu_backends():
    if not torch.cuda.is_available():
        return ["cuda"]  # (skipped below)
    return [b for b in ("cuda", "triton") if b in fastopt.available_backends()]


@pytest.mark.gpu
@pytest.mark.parametrize("backend", _gpu_backends())
@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_cuda_graph_capture_and_replay_equal_eager(name, backend):
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    dev = torch.device("cuda")
    grads = _grads(10, dev)
    eager_params, eager = _make(name, dev, backend, capturable=True)
    for gs in grads:
        for p, g in zip(eager_params, gs):
            p.grad = g.clone()
        eager.found_inf.zero_()
        eager.step()

    params, opt = _make(name, dev, backend, capturable=True)
    static = [torch.zeros(n, device=dev) for n in SIZES]
    for p, s in zip(params, static):
        p.grad = s

    def load(gs):
        for s, g in zip(static, gs):
            s.copy_(g)
        opt.found_inf.zero_()  # the scaler's fresh flag of this step

    # warm-up steps (real steps: the first two of the run) on a side stream
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for gs in grads[:2]:
            load(gs)
            opt.step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    load(grads[2])
    with torch.cuda.graph(graph):
        opt.step()  # captured, not run
    for gs in grads[2:]:
        load(gs)
        graph.replay()
    torch.cuda.synchronize()
    _assert_same(eager_params, eager, params, opt)


@pytest.mark.gpu
@pytest.mark.parametrize("backend", _gpu_backends())
def test_eager_gpu_step_never_synchronises(backend):
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    dev = torch.device("cuda")
    params, opt = _make("adamw", dev, backend, capturable=True)
    grads = _grads(4, dev)
    for p, g in zip(params, grads[0]):
        p.grad = g
    opt.step()  # builds the plan and the launch tables
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for gs in grads[1:]:
            for p, g in zip(params, gs):
                p.grad = g
            opt.found_inf.zero_()
            opt.step()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    torch.cuda.synchronize()
    assert opt.skipped_steps == 1  # SKIP_AT[0] == 2 is among grads[1:]
