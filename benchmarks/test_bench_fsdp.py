"""Smoke test of benchmarks/bench_fsdp.py: two gloo ranks, tiny shapes, one round.

Not part of the normal suite (pyproject's testpaths is ``tests``); run explicitly:

    PYTHONPATH=. pytest benchmarks/test_bench_fsdp.py
"""

from __future__ import annotations

import json
import math

import pytest
import torch

try:
    from benchmarks import bench_fsdp
except ImportError:  # benchmarks/ itself on sys.path
    import bench_fsdp  # type: ignore[no-redef]

pytestmark = pytest.mark.skipif(
    not torch.distributed.is_available(), reason="torch built without distributed support"
)


def test_smoke_end_to_end(tmp_path, capsys):
    out = tmp_path / "fsdp.json"
    result = bench_fsdp.main(["--smoke", "--json", str(out)])
    table = capsys.readouterr().out
    assert json.loads(out.read_text())["size"] == "smoke"
    assert [m["key"] for m in result["models"]] == ["gpt2", "many"]
    for m in result["models"]:
        assert set(m["timings"]) == set(bench_fsdp.CONTENDERS)
        assert all(t["median_s"] > 0 for t in m["timings"].values())
        assert all(math.isfinite(v) and v > 0 for v in bench_fsdp.ratios(m).values())
        for name in bench_fsdp.CONTENDERS:
            assert f"| {m['key']} | {name} |" in table
    assert "fastopt sharded / local" in table


def test_gpt2_units_cover_the_model():
    units = bench_fsdp.gpt2_units()
    assert len(units) == 12 + 2  # one per layer, the embeddings, the final norm
    shapes = [s for u in units for _, s in u]
    assert sum(math.prod(s) for s in shapes) == 124_439_808
    assert sum(len(u) for u in bench_fsdp.many_units(4000)) == 4000
