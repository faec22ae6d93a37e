"""pytest-benchmark cases for the CPU workloads of bench_cpu.py, and smoke tests of the harness.

Not part of the normal suite (pyproject's testpaths is ``tests``); run explicitly:

    PYTHONPATH=. pytest benchmarks/                               # full sizes, 7 rounds per case
    FASTOPT_BENCH_QUICK=1 PYTHONPATH=. pytest benchmarks/         # quick sizes
    PYTHONPATH=. pytest benchmarks/ -k "not test_step"            # only the smoke tests

Every (workload, contender) pair of bench_cpu.WORKLOADS is one case, grouped
by workload so pytest-benchmark's table compares like with like. pytest runs
cases one after another, so these numbers are not interleaved: the
interleaved, side-by-side comparison is ``python -m benchmarks.bench_cpu``.
A case is skipped only when its contender cannot exist here (fastopt's cpu
backend not built, DeepSpeed or lion-pytorch absent), with that reason.
"""

from __future__ import annotations

import json
import math
import os
import time

import pytest
import torch

try:
    from benchmarks import bench_cpu, harness
except ImportError:  # benchmarks/ itself on sys.path
    import bench_cpu  # type: ignore[no-redef]
    import harness  # type: ignore[no-redef]

QUICK = os.environ.get("FASTOPT_BENCH_QUICK", "") not in ("", "0")
CASES = [
    pytest.param(wl, name, factory, id=f"{wl.key}-{name.replace(' ', '_')}")
    for wl in bench_cpu.WORKLOADS
    for name, factory in wl.contenders
]


@pytest.mark.parametrize(("wl", "name", "factory"), CASES)
def test_step(benchmark, wl, name, factory):
    torch.set_num_threads(bench_cpu.THREADS)
    sizes = bench_cpu.quick_sizes() if QUICK else bench_cpu.full_sizes()
    data = bench_cpu.make_data(getattr(sizes, wl.shapes), wl.dtype)
    n_params = data.numel
    try:
        contender = bench_cpu.build_contender(name, factory, data)
    except harness.Unavailable as exc:
        pytest.skip(str(exc))
    del data
    benchmark.group = f"({wl.key}) {wl.title}"
    benchmark.extra_info.update(
        n_params=n_params, bytes_per_param=wl.bytes_per_param, baseline=wl.baseline, quick=QUICK
    )
    benchmark.pedantic(
        contender.step, setup=contender.prepare, rounds=7, warmup_rounds=1, iterations=1
    )
    median = benchmark.stats.stats.median
    benchmark.extra_info["gbps_at_median"] = wl.bytes_per_param * n_params / median / 1e9


# ---------------------------------------------------------------------------
# Smoke tests of the harness itself
# ---------------------------------------------------------------------------


def test_min_bytes_match_spec_table():
    # SPEC §5, row by row.
    assert harness.min_bytes_per_param("adamw") == 28
    assert (
        harness.min_bytes_per_param("adamw", param_dtype=torch.bfloat16, master_weights=True) == 28
    )
    assert harness.min_bytes_per_param("lion") == 20
    assert harness.min_bytes_per_param("adamw", extra_grad_read=True) == 28 + 4
    bf16_clip = harness.min_bytes_per_param(
        "adamw", param_dtype=torch.bfloat16, master_weights=True, extra_grad_read=True
    )
    assert bf16_clip == 28 + 2
    # fp32 params ignore master_weights (SPEC §3), so the bytes do too.
    assert harness.min_bytes_per_param("adamw", master_weights=True) == 28


def test_interleaved_rounds_rotate_and_rank():
    calls: list[str] = []

    def sleeper(name, seconds):
        def step():
            calls.append(name)
            time.sleep(seconds)

        return harness.Contender(name, step)

    contenders = [sleeper("slow", 0.03), sleeper("fast", 0.003), sleeper("mid", 0.01)]
    res = harness.time_interleaved(contenders, rounds=7, warmup_rounds=1, min_round_seconds=0.0)
    assert {k: len(v.seconds) for k, v in res.items()} == {"slow": 7, "fast": 7, "mid": 7}
    timed = calls[3:]  # after one warm-up call each
    firsts = [timed[3 * r] for r in range(7)]
    assert firsts[:3] == ["slow", "fast", "mid"]  # each round starts one contender later
    # sleep can overshoot on a loaded machine but never undershoot
    assert res["slow"].median >= 0.03
    assert res["slow"].median > 2 * res["fast"].median


def test_prepare_runs_untimed_before_every_step():
    log: list[str] = []
    c = harness.Contender(
        "c",
        step=lambda: log.append("step"),
        prepare=lambda: (log.append("prepare"), time.sleep(0.02)),
    )
    res = harness.time_interleaved([c], rounds=3, warmup_rounds=1, min_round_seconds=0.0)
    assert log == ["prepare", "step"] * 4
    assert res["c"].median < 0.01  # the 20 ms of prepare is not in the step time


def test_peak_rss_sees_a_freed_transient():
    n = 64 * 2**20  # 256 MiB of fp32: far above glibc's mmap threshold, so fresh pages

    def transient():
        t = torch.empty(n, dtype=torch.float32)
        t.fill_(1.0)
        del t

    assert harness.peak_extra_rss_mb(transient) >= 0.95 * 4 * n / 1e6
    assert harness.peak_extra_rss_mb(lambda: None) < 16


def test_quick_mode_end_to_end(tmp_path, capsys):
    out = tmp_path / "bench.json"
    md = tmp_path / "bench.md"
    result = bench_cpu.main(["--quick", "--json", str(out), "--markdown", str(md)])
    printed = capsys.readouterr().out
    assert json.loads(out.read_text())["stamp"]["torch"] == torch.__version__
    assert md.read_text() == printed.rstrip("\n") + "\n"

    assert result["complete"]
    stamp = result["stamp"]
    for key in ("cpu_model", "torch_cpu_capability", "python", "torch", "git_commit", "date_utc"):
        assert stamp[key], key
    assert result["rounds"] == 3
    assert result["bandwidth"]["gbps_median"] > 0

    assert [w["key"] for w in result["workloads"]] == [w.key for w in bench_cpu.WORKLOADS]
    for w in result["workloads"]:
        spec = bench_cpu.WORKLOADS_BY_KEY[w["key"]]
        names = [r["contender"] for r in w["rows"]]
        # Stock torch contenders never go missing; optional ones (lion-pytorch is
        # (h)'s baseline) may, and are then listed with a reason.
        missing = {m["contender"] for m in w["missing"]}
        assert spec.baseline in names or (
            spec.baseline in missing and not spec.baseline.startswith("torch")
        )
        assert {m["contender"] for m in w["missing"]} | set(names) == {
            n for n, _ in spec.contenders
        }
        assert all(m["reason"] for m in w["missing"])
        assert not any(m["reason"].startswith("FAILED") for m in w["missing"]), w["missing"]
        for r in w["rows"]:
            assert len(r["seconds"]) == 3 and all(s > 0 for s in r["seconds"])
            assert math.isclose(
                r["gbps"], w["bytes_per_param"] * w["n_params"] / r["median_s"] / 1e9
            )
            if r["contender"] == spec.baseline:
                assert r["speedup_vs_baseline"] == 1.0
            assert f"| {r['median_s'] * 1e3:.1f} |" in printed
        assert f"({w['key']}) {w['title']}" in printed

    probes = {m["contender"]: m for m in result["memory"]}
    assert set(probes) == {n for n, _ in bench_cpu.WORKLOADS_BY_KEY["a"].contenders}
    # torch's fused step allocates nothing proportional to the model.
    assert probes["torch AdamW fused"]["peak_extra_mb"] < 4
    assert len(result["targets"]) == sum(len(w.targets) for w in bench_cpu.WORKLOADS)


def test_gpt2_small_shapes_are_the_real_model():
    shapes = bench_cpu.gpt2_small_shapes()
    # GPT2LMHeadModel("gpt2"): 148 parameter tensors, 124,439,808 parameters (lm_head tied).
    assert len(shapes) == 148
    assert sum(math.prod(s) for s in shapes) == 124_439_808
    named = dict(bench_cpu.gpt2_small_named_shapes())
    assert named["wte.weight"] == (50257, 768)
    assert named["h.11.mlp.c_proj.weight"] == (3072, 768)
