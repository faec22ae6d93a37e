"""LAWA on a known sequence of snapshots."""

import pytest
import torch

from fastopt.averaging import LAWA


class _Two(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.a = torch.nn.Parameter(torch.zeros(3))
        self.b = torch.nn.Parameter(torch.zeros(2, 2))


def _set(model, v):
    with torch.no_grad():
        model.a.fill_(v)
        model.b.fill_(10 * v)


def test_mean_of_last_window_snapshots():
    model = _Two()
    lawa = LAWA(window=3)
    # the weights reach 1, 2, 4, 8, 16 before each update; the window holds the raw
    # weights seen at each update (not the averages written back)
    expected = [1.0, (1 + 2) / 2, (1 + 2 + 4) / 3, (2 + 4 + 8) / 3, (4 + 8 + 16) / 3]
    for v, want in zip([1.0, 2.0, 4.0, 8.0, 16.0], expected, strict=True):
        _set(model, v)
        lawa.update(model)
        assert torch.equal(model.a, torch.full((3,), want))
        assert model.b.detach() == pytest.approx(torch.full((2, 2), 10 * want))
    assert len(lawa.snapshots) == 3


def test_window_one_is_identity():
    model = _Two()
    lawa = LAWA(window=1)
    _set(model, 3.0)
    lawa.update(model)
    assert torch.equal(model.a, torch.full((3,), 3.0))


def test_master_weights_are_averaged_and_written():
    model = _Two().to(torch.bfloat16)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    masters = {p: torch.zeros(p.shape) for p in model.parameters()}
    for p, m in masters.items():
        opt.state[p]["master_param"] = m
    lawa = LAWA(window=2)
    for v in (
        1.0,
        1.0 + 2**-12,
    ):  # second value is not representable in bf16, only in the master
        for m in masters.values():
            m.fill_(v)
        lawa.update(model, opt)
    want = (2.0 + 2**-12) / 2
    assert torch.equal(masters[model.a], torch.full((3,), want))
    assert torch.equal(model.a, torch.full((3,), want).to(torch.bfloat16))


def test_state_dict_round_trip_continues_identically():
    model, other = _Two(), _Two()
    lawa = LAWA(window=2)
    _set(model, 1.0)
    lawa.update(model)
    restored = LAWA(window=5)
    restored.load_state_dict(lawa.state_dict())
    _set(model, 3.0)
    _set(other, 3.0)
    lawa.update(model)
    restored.update(other)
    assert torch.equal(model.a, other.a) and torch.equal(model.a, torch.full((3,), 2.0))


def test_bad_window():
    with pytest.raises(ValueError):
        LAWA(window=0)
