"""The GPU benchmark's code path and scripts/gpu_check.py, tested without a GPU.

    PYTHONPATH=. pytest benchmarks/test_bench_gpu.py

Everything but timing on a device: the workloads against bench_cpu's
definitions and SPEC §5's bytes, every contender built and stepped on CPU
tensors (the triton backend under the interpreter, the cuda backend reported
unavailable), the stock-torch baselines checked against fastopt's reference,
the launch counter on CPU and on synthetic CUDA profiler events, the result
and table through a stubbed timer (``run(timer=...)``), the CLI, and
gpu_check's budget, timeouts, parsers and report. The gpu-marked cases at the
end run only on a GPU (scripts/gpu_check.sh includes them).
"""

from __future__ import annotations

import os

# The triton contenders run CPU tensors under the interpreter; set before triton loads.
os.environ.setdefault("TRITON_INTERPRET", "1")

import importlib.util  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402
from types import SimpleNamespace  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402
from torch.autograd import DeviceType  # noqa: E402

try:
    from benchmarks import bench_cpu, bench_gpu, harness
except ImportError:  # benchmarks/ itself on sys.path
    import bench_cpu  # type: ignore[no-redef]
    import bench_gpu  # type: ignore[no-redef]
    import harness  # type: ignore[no-redef]

ROOT = Path(__file__).resolve().parent.parent
CPU = torch.device("cpu")
TINY = bench_gpu.tiny_sizes()
# Contenders allowed to be missing on a CPU-only machine, with the reason's start.
MAY_BE_MISSING = {"cuda": "fastopt backend 'cuda' unavailable", "lion-pytorch": "lion-pytorch"}


def _load_gpu_check():
    spec = importlib.util.spec_from_file_location("gpu_check", ROOT / "scripts" / "gpu_check.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod
    spec.loader.exec_module(mod)
    return mod


gpu_check = _load_gpu_check()


# ---------------------------------------------------------------------------
# Workloads and bytes
# ---------------------------------------------------------------------------


def test_workloads_are_bench_cpus_with_gpu_contenders():
    assert [w.key for w in bench_gpu.WORKLOADS] == list("abcdefgh")  # issue 13: (a)-(h)
    for w in bench_gpu.WORKLOADS:
        cpu = bench_cpu.WORKLOADS_BY_KEY[w.key]
        assert (w.title, w.shapes, w.dtype, w.bytes_per_param) == (
            cpu.title,
            cpu.shapes,
            cpu.dtype,
            cpu.bytes_per_param,
        )
        names = [n for n, _ in w.contenders]
        assert len(set(names)) == len(names)
        assert w.baseline in names and w.baseline.startswith(("torch", "clip_grad_norm_")), (
            w.baseline
        )
        for backend in bench_gpu.FASTOPT_BACKENDS:  # both fastopt GPU backends in every workload
            assert sum(n.startswith("fastopt") and n.endswith(backend) for n in names) == 1
        if w.key != "h":  # torch's two AdamW implementations (torch has no Lion)
            assert sum("fused" in n for n in names) == 1 and sum("foreach" in n for n in names) == 1


def test_bytes_per_param_are_spec_section_5():
    # SPEC §5: AdamW 28; + clipping or the loss-scaling norm pass +4 (fp32 g) / +2 (bf16 g); Lion 20.
    expected = {"a": 28, "b": 28, "c": 28, "d": 32, "e": 32, "f": 28, "g": 30, "h": 20}
    assert {w.key: w.bytes_per_param for w in bench_gpu.WORKLOADS} == expected


def test_full_sizes_are_the_cpu_tables_and_the_copy_outgrows_any_l2():
    full, cpu = bench_gpu.full_sizes(), bench_cpu.full_sizes()
    assert (full.big, full.many, full.gpt2) == (cpu.big, cpu.many, cpu.gpt2)
    assert 4 * full.bandwidth_elements >= 2**30  # each copy buffer 1 GiB: H100 L2 is 50 MB


def test_make_data_is_seeded_and_has_bench_cpus_scale():
    a = bench_gpu.make_data([(64, 64), (100,)], torch.bfloat16, CPU, seed=1)
    b = bench_gpu.make_data([(64, 64), (100,)], torch.bfloat16, CPU, seed=1)
    assert a.numel == 64 * 64 + 100
    assert [p.shape for p in a.params] == [torch.Size([64, 64]), torch.Size([100])]
    assert all(p.dtype == torch.bfloat16 and p.device == CPU for p in a.params + a.grads)
    assert all(torch.equal(x, y) for x, y in zip(a.params + a.grads, b.params + b.grads))
    assert 0.015 < a.params[0].float().std() < 0.025 and 0.007 < a.grads[0].float().std() < 0.013


# ---------------------------------------------------------------------------
# Every contender on CPU tensors
# ---------------------------------------------------------------------------

CASES = [
    pytest.param(w, name, factory, id=f"{w.key}-{name.replace(' ', '_')}")
    for w in bench_gpu.WORKLOADS
    for name, factory in w.contenders
]


@pytest.mark.parametrize(("wl", "name", "factory"), CASES)
def test_every_contender_builds_and_steps_on_cpu(wl, name, factory):
    data = bench_gpu.make_data(getattr(TINY, wl.shapes), wl.dtype, CPU)
    before = [p.clone() for p in data.params]
    try:
        c = bench_cpu.build_contender(name, factory, data)  # runs prepare and one step
    except harness.Unavailable as exc:
        allowed = [v for k, v in MAY_BE_MISSING.items() if k in name]
        assert allowed and str(exc).startswith(allowed[0]), (name, str(exc))
        pytest.skip(str(exc))
    if c.prepare is not None:
        c.prepare()
    c.step()
    params = [t for t in c.keep[0]]
    assert len(params) == len(data.params)
    assert all(torch.isfinite(p).all() for p in params)
    assert any(not torch.equal(p, b) for p, b in zip(params, before)), "the step changed nothing"
    assert all(torch.equal(p, b) for p, b in zip(data.params, before)), "the source was written"


def _one_step(factory, data):
    c = bench_cpu.build_contender("x", factory, data)
    return c.keep[0]


def test_torch_foreach_lion_is_lion():
    # (h)'s stock baseline must compute the update it is compared against (SPEC §2).
    import fastopt

    data = bench_gpu.make_data(TINY.big, torch.float32, CPU)
    got = _one_step(bench_gpu.torch_foreach_lion, data)
    ref = bench_cpu.fresh_params(data)
    fastopt.Lion(ref, **bench_gpu.LION_HP, backend="reference").step()
    for g, r in zip(got, ref):
        torch.testing.assert_close(g, r, rtol=0, atol=1e-7)


@pytest.mark.parametrize("clip", [False, True], ids=["f", "g"])
def test_torch_master_recipe_is_adamw_with_masters(clip):
    # (f)/(g)'s baseline: the fp32 master step rounded into bf16, as fastopt's reference does it.
    import fastopt

    data = bench_gpu.make_data(TINY.big, torch.bfloat16, CPU)
    got = _one_step(bench_gpu.torch_master_recipe("foreach", clip=clip), data)
    ref = bench_cpu.fresh_params(data)
    opt = fastopt.AdamW(
        ref,
        **bench_gpu.ADAMW_HP,
        master_weights=True,
        max_grad_norm=bench_gpu.MAX_GRAD_NORM if clip else None,
        backend="reference",
    )
    opt.step()
    # fp32 math in both, rounded once to bf16; reduction orders differ: one bf16 ulp at most
    for g, r in zip(got, ref):
        torch.testing.assert_close(g.float(), r.float(), rtol=2**-7, atol=1e-6)


# ---------------------------------------------------------------------------
# Launch counting
# ---------------------------------------------------------------------------


def _adamw_contender(n_tensors: int, **flags) -> harness.Contender:
    data = bench_gpu.make_data([(32,)] * n_tensors, torch.float32, CPU)
    params = bench_cpu.fresh_params(data)
    opt = torch.optim.AdamW(params, **flags)
    opt.step()
    return harness.Contender("x", opt.step, keep=[params, opt])


def test_launch_counter_on_cpu_sees_per_tensor_and_fused_steps():
    fused = [bench_gpu.count_launches(_adamw_contender(n, fused=True), CPU) for n in (4, 16)]
    loop = [bench_gpu.count_launches(_adamw_contender(n, foreach=False), CPU) for n in (4, 16)]
    assert fused[0]["kernels"] == fused[1]["kernels"] >= 1  # one fused op, whatever the count
    assert loop[1]["kernels"] > loop[0]["kernels"] + 12 * 2  # several ops per tensor
    assert "aten::_fused_adamw_" in fused[0]["by_name"]
    assert fused[0]["what"].startswith("top-level aten ops")


def _event(name, device_type, parent=None):
    return SimpleNamespace(name=name, device_type=device_type, cpu_parent=parent)


def test_launch_counts_of_cuda_profiler_events():
    top = _event("aten::_fused_adamw_", DeviceType.CPU)
    events = [
        top,
        _event("aten::empty", DeviceType.CPU, parent=top),  # CPU-side: never a launch
        _event("void fused_adamw_kernel<float>(...)", DeviceType.CUDA),
        _event("void fused_adamw_kernel<float>(...)", DeviceType.CUDA),
        _event("_adamw_kernel", DeviceType.CUDA),  # a Triton kernel: just a name
        _event("Memcpy HtoD (Pageable -> Device)", DeviceType.CUDA),
        _event("Memset (Device)", DeviceType.CUDA),
    ]
    got = bench_gpu.launch_counts(events, "cuda")
    assert (got["kernels"], got["memcpy"], got["memset"]) == (3, 1, 1)
    assert got["by_name"]["void fused_adamw_kernel<float>(...)"] == 2
    with pytest.raises(RuntimeError, match="no GPU activity"):  # CUPTI missing: not "0 launches"
        bench_gpu.launch_counts(events[:2], "cuda")
    cpu = bench_gpu.launch_counts(events, "cpu")
    assert (cpu["kernels"], cpu["by_name"]) == (1, {"aten::_fused_adamw_": 1})


# ---------------------------------------------------------------------------
# The run and the table, through the timer hook
# ---------------------------------------------------------------------------


def stub_timer(contenders, *, rounds):
    """The documented test hook: every step still runs once, the seconds are fixed."""
    out = {}
    for i, c in enumerate(contenders):
        if c.prepare is not None:
            c.prepare()
        c.step()
        base = 1e-3 * (i + 1)
        out[c.name] = harness.Timing(c.name, [base * (1 + 0.1 * r) for r in range(rounds)])
    return out


def test_run_with_a_stub_timer_fills_every_field(tmp_path):
    updates = []
    result = bench_gpu.run(
        device="cpu",
        sizes="tiny",
        only="a,e,h",
        timer=stub_timer,
        log=lambda msg: None,
        on_update=lambda r: updates.append(len(r["workloads"])),
    )
    assert result["complete"] and not result["errors"]
    assert updates == [0, 1, 2, 3, 3]  # after the copy, each workload, and at the end
    assert result["timer"].endswith("stub_timer")
    assert result["device"]["type"] == "cpu"
    copy = result["copy"]
    assert copy["bytes_per_pass"] == 8 * TINY.bandwidth_elements
    assert math.isclose(copy["gbps_median"], copy["bytes_per_pass"] / copy["median_s"] / 1e9)
    for w in result["workloads"]:
        spec = bench_gpu.WORKLOADS_BY_KEY[w["key"]]
        assert w["n_params"] == sum(math.prod(s) for s in getattr(TINY, spec.shapes))
        names = [r["contender"] for r in w["rows"]]
        assert {m["contender"] for m in w["missing"]} | set(names) == {
            n for n, _ in spec.contenders
        }
        assert not any(m["reason"].startswith("FAILED") for m in w["missing"]), w["missing"]
        assert any(n.endswith("triton") for n in names)  # runs here, under the interpreter
        for r in w["rows"]:
            assert math.isclose(
                r["gbps"], w["bytes_per_param"] * w["n_params"] / r["median_s"] / 1e9
            )
            assert math.isclose(r["fraction_of_copy_bw"], r["gbps"] / copy["gbps_median"])
            assert r["launches"]["kernels"] >= 1
            assert r["extra_device_mb"] is None  # CPU: not measured
            if r["contender"] == w["baseline"]:
                assert r["speedup_vs_baseline"] == 1.0
    json.loads(json.dumps(result))  # results.json-ready

    md = bench_gpu.render_markdown(result)
    assert "CPU CODE-PATH RUN: no GPU, not GPU numbers" in md.splitlines()[0]
    for w in result["workloads"]:
        assert f"({w['key']}) {w['title']}" in md
        for r in w["rows"]:
            assert f"| {r['median_s'] * 1e3:.3f} |" in md
    assert "fastopt AdamW cuda: fastopt backend 'cuda' unavailable" in md


def test_a_failing_workload_is_recorded_and_the_rest_run(monkeypatch):
    def explode(*args, **kwargs):
        raise RuntimeError("CUDA out of memory (simulated)")

    real = bench_gpu.run_workload
    monkeypatch.setattr(
        bench_gpu,
        "run_workload",
        lambda wl, *a, **k: explode() if wl.key == "a" else real(wl, *a, **k),
    )
    result = bench_gpu.run(device="cpu", sizes="tiny", only="a,h", timer=stub_timer, log=print)
    assert [w["key"] for w in result["workloads"]] == ["h"]
    assert (
        result["errors"][0]["workload"] == "a" and "out of memory" in result["errors"][0]["error"]
    )
    assert "Failed workloads:" in bench_gpu.render_markdown(result)


def test_cli_on_cpu_writes_json_and_markdown(tmp_path, capsys):
    js, md = tmp_path / "b.json", tmp_path / "b.md"
    rc = bench_gpu.main(
        ["--device", "cpu", "--tiny", "--only", "h", "--rounds", "2", "--json", str(js),
         "--markdown", str(md)]
    )  # fmt: skip
    assert rc == 0
    result = json.loads(js.read_text())
    assert result["rounds"] == 2 and result["timer"].endswith("time_interleaved")
    assert all(len(r["seconds"]) == 2 for r in result["workloads"][0]["rows"])
    assert md.read_text() == capsys.readouterr().out.rstrip("\n") + "\n"


def test_cli_without_a_gpu_says_skipped(capsys):
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    assert bench_gpu.main(["--only", "a"]) == 0
    assert "skipped: no CUDA device" in capsys.readouterr().out


# ---------------------------------------------------------------------------
# scripts/gpu_check.py: budget, timeouts, parsers, report
# ---------------------------------------------------------------------------


def test_budget_reserves_the_later_stages_minimum():
    now = [0.0]
    budget = gpu_check.Budget(100, clock=lambda: now[0])
    stages = [gpu_check.Stage(f"s{i}", "", cap_s=60, min_s=20) for i in range(3)]
    assert budget.timeout_for(stages, 0) == 60  # cap; 100 - 2 * 20 reserved = 60
    now[0] = 30.0
    stages[0].status = "PASS"
    assert budget.timeout_for(stages, 1) == 50  # 100 - 30 - 20 reserved for s2
    now[0] = 75.0
    stages[1].status = "FAIL"
    assert budget.timeout_for(stages, 2) == 25
    now[0] = 85.0
    assert budget.timeout_for(stages, 2) is None  # 15 s left < its 20 s minimum: skipped


def test_run_command_kills_the_whole_process_group_on_timeout(tmp_path):
    pid_file = tmp_path / "child.pid"
    cmd = ["bash", "-c", f"sleep 60 & echo $! > {pid_file}; wait"]
    t0 = time.monotonic()
    rc, secs, timed_out = gpu_check.run_command(
        cmd, log_path=tmp_path / "log", timeout_s=1, env=dict(os.environ)
    )
    assert timed_out and time.monotonic() - t0 < 15
    assert "timed out after 1 s" in (tmp_path / "log").read_text()
    child = int(pid_file.read_text())
    time.sleep(0.2)
    assert not Path(f"/proc/{child}").exists() or "Z" in Path(f"/proc/{child}/stat").read_text()
    rc, _, timed_out = gpu_check.run_command(
        ["bash", "-c", "echo hi; exit 3"], log_path=tmp_path / "log2", timeout_s=10, env={}
    )
    assert (rc, timed_out) == (3, False) and "hi" in (tmp_path / "log2").read_text()


def test_parse_junit(tmp_path):
    xml = tmp_path / "j.xml"
    xml.write_text(
        '<testsuites><testsuite name="pytest">'
        '<testcase classname="tests.test_a" name="test_ok"/>'
        '<testcase classname="tests.test_a" name="test_bad"><failure message="assert 1 == 2"/></testcase>'
        '<testcase classname="tests.test_b" name="test_s1"><skipped message="needs a CUDA device"/></testcase>'
        '<testcase classname="tests.test_b" name="test_s2"><skipped message="needs a CUDA device"/></testcase>'
        '<testcase classname="" name="tests.test_c"><error message="collection failure"/></testcase>'
        "</testsuite></testsuites>"
    )
    got = gpu_check.parse_junit(xml)
    assert got["counts"] == {"passed": 1, "failed": 1, "errors": 1, "skipped": 2}
    assert got["failed"][0] == {"test": "tests.test_a::test_bad", "message": "assert 1 == 2"}
    assert got["skip_reasons"] == {"needs a CUDA device": 2}
    assert "error" in gpu_check.parse_junit(tmp_path / "missing.xml")


def test_train_flags_and_metrics(tmp_path):
    help_text = "usage: fastopt-train [--steps STEPS] [--out OUT] [--device {auto,cpu,cuda}]\n  --optimizer X\n  --backend B\n"
    assert gpu_check.missing_train_flags(help_text) == ["--precision"]
    assert gpu_check.missing_train_flags(help_text + "  --precision {fp32,bf16}\n") == []
    cmd = gpu_check.train_command("train-torch", tmp_path, dry_run=False)
    assert cmd[cmd.index("--device") + 1] == "cuda" and cmd[cmd.index("--steps") + 1] == "200"
    assert cmd[cmd.index("--precision") + 1] == "bf16" and "torch-adamw" in cmd

    recs = [
        {"step": i + 1, "loss": 5.0 - i / 100, "step_time": 0.01, "opt_time": 0.002,
         "tokens_step": 2048, "skipped": i == 3}
        for i in range(30)
    ] + [{"step": 30, "val_loss": 4.5}]  # fmt: skip
    path = tmp_path / "metrics.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in recs) + "\n")
    got = gpu_check.summarize_metrics(path)
    assert got["steps"] == 30 and got["last_step"] == 30 and got["val_loss"] == 4.5
    assert got["skipped_steps"] == 1 and got["steps_excluded_as_warmup"] == 10
    assert math.isclose(got["median_step_ms"], 10.0) and math.isclose(got["median_opt_ms"], 2.0)
    assert math.isclose(got["tokens_per_s"], 2048 / 0.01)
    assert math.isclose(got["train_loss_last20"], sum(5.0 - i / 100 for i in range(10, 30)) / 20)


def test_build_fallbacks_follow_where_the_editable_install_failed():
    # NOTE [build fallbacks]
    before_compile = "error: externally-managed-environment\n"
    after_compile = "  [1/6] /usr/local/cuda/bin/nvcc -c adamw.cu\nerror: command failed\n"
    assert [a[0] for a in gpu_check.build_attempts(before_compile)] == [
        "setup.py build_ext --inplace",
        "CPU-only editable install",
    ]
    (only,) = gpu_check.build_attempts(after_compile)  # the CUDA compile would fail again
    assert only[0] == "CPU-only editable install" and only[2] == {"FASTOPT_BUILD_CUDA": "0"}


def test_without_a_gpu_the_real_run_stops_after_the_environment(tmp_path):
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    assert gpu_check.main([str(tmp_path / "out")]) == 1
    res = json.loads((tmp_path / "out" / "results.json").read_text())
    statuses = [s["status"] for s in res["stages"]]
    assert statuses[0] == "FAIL" and set(statuses[1:]) == {"SKIPPED"}
    assert "no CUDA device" in res["stages"][0]["reason"]
    assert (tmp_path / "out" / "report.md").read_text().startswith("# fastopt GPU check: FAIL\n")


def _bench_result(missing, complete=True):
    return {"complete": complete, "errors": [], "workloads": [
        {"key": "a", "baseline": "torch AdamW fused", "rows": [{}], "missing": missing}]}  # fmt: skip


def test_bench_verdict():
    unavailable = {
        "contender": "fastopt AdamW cuda",
        "reason": "fastopt backend 'cuda' unavailable",
    }
    optional = {"contender": "lion-pytorch Lion", "reason": "lion-pytorch not importable"}
    broken = {"contender": "fastopt AdamW triton", "reason": "FAILED: TypeError: boom"}
    assert gpu_check.bench_verdict(_bench_result([unavailable, optional]), True)[0] == "SKIPPED"
    assert gpu_check.bench_verdict(_bench_result([optional]), False)[0] == "PASS"
    # on the GPU every fastopt contender must run; a crash fails in either mode
    assert gpu_check.bench_verdict(_bench_result([unavailable]), False)[0] == "FAIL"
    status, reason = gpu_check.bench_verdict(_bench_result([broken]), True)
    assert status == "FAIL" and "TypeError: boom" in reason
    assert gpu_check.bench_verdict(_bench_result([], complete=False), False)[0] == "FAIL"
    assert gpu_check.bench_verdict(None, False)[0] == "FAIL"


def test_report_says_what_was_skipped_and_shows_failures(tmp_path):
    stages = gpu_check.make_stages()
    for s in stages:
        s.status, s.reason, s.seconds, s.timeout_s = "SKIPPED", f"dry run: {s.name}", 0.5, 60
    stages[0].status = "PASS"
    stages[2].status, stages[2].reason = "FAIL", "1 failed"
    stages[2].log_tail = ["E   assert 1 == 2"]
    stages[2].details = {"counts": {"passed": 0, "failed": 1, "errors": 0, "skipped": 0},
                         "failed": [{"test": "tests.t::test_x", "message": "assert 1 == 2"}]}  # fmt: skip
    stages[4].details = {"steps": 3, "val_loss": 5.25, "tokens_per_s": 1234.0}
    results = {
        "dry_run": True,
        "argv": ["scripts/gpu_check.sh", "out", "--dry-run"],
        "started_utc": "2026-01-01T00:00:00Z",
        "budget_s": 450,
        "total_s": 12.0,
        "stages": [gpu_check.asdict(s) for s in stages],
        "overall": gpu_check.overall(stages),
        "environment": {"probe": {"torch": "2.11.0", "packages": {"triton": "3.6.0"}}},
        "bench_markdown": "## fastopt GPU optimizer-step benchmark (CPU CODE-PATH RUN)\n| x |\n",
    }
    gpu_check.write_outputs(tmp_path, results)
    md = (tmp_path / "report.md").read_text()
    assert md.startswith("# fastopt GPU check: FAIL (DRY RUN)")
    assert "nothing below is a GPU number" in md
    for s in stages:
        assert f"| {s.name}: {s.title} | **{s.status}** |" in md
    assert "dry run: build" in md and "FAILED `tests.t::test_x`" in md
    assert "### fastopt GPU optimizer-step benchmark (CPU CODE-PATH RUN)" in md
    assert "E   assert 1 == 2" in md and "| 5.2500 |" in md and "1,234" in md
    assert "torch 2.11.0" in md and "triton 3.6.0" in md and "pytest MISSING" in md
    assert json.loads((tmp_path / "results.json").read_text())["overall"] == "FAIL"


# ---------------------------------------------------------------------------
# On a GPU (scripts/gpu_check.sh runs these): the CUDA timer and launch counter
# ---------------------------------------------------------------------------


def _need_gpu():
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")


@pytest.mark.gpu
def test_gpu_cuda_timer_measures_a_copy():
    _need_gpu()
    bw = bench_gpu.copy_bandwidth(
        64 * 2**20, torch.device("cuda"), rounds=5, timer=bench_gpu.cuda_time_interleaved
    )
    assert bw["rounds"] == 5
    assert 50 < bw["gbps_median"] < 20_000  # any datacenter GPU, and no timer that reads zero


@pytest.mark.gpu
def test_gpu_launch_counter_counts_kernels():
    _need_gpu()
    dev = torch.device("cuda")

    def contender(n, **flags):
        params = [torch.nn.Parameter(torch.randn(1024, device=dev)) for _ in range(n)]
        for p in params:
            p.grad = torch.randn_like(p)
        opt = torch.optim.AdamW(params, **flags)
        opt.step()
        return harness.Contender("x", opt.step, keep=[params, opt])

    fused = [bench_gpu.count_launches(contender(n, fused=True), dev)["kernels"] for n in (4, 16)]
    loop = [bench_gpu.count_launches(contender(n, foreach=False), dev)["kernels"] for n in (4, 16)]
    assert 1 <= fused[0] == fused[1] <= 4
    assert loop[1] >= loop[0] + 12
