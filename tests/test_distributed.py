"""Sharded training on 2 and 4 gloo ranks (SPEC §7), each compared with one process.

Each case runs on every rank of a pool of spawned processes (tests/dist_pool.py;
one pool per world size, reused by every case) and is compared with
``dist_cases.reference``: a single-process fastopt run of the same full model on
the same global batches, each rank having read its own slice of them. The
models (tests/dist_cases.py) have uneven shards and shards that are empty on
every rank but the first. Run on the reference backend with
``FASTOPT_TEST_BACKEND=reference``.

Tolerances. ``FP32``: the sharded gradient is a sum of per-rank partial
gradients (FSDP's reduce-scatter, DDP's all-reduce), the single-process one a
single full-batch matmul, so they differ by a few float32 ulps; the optimizer
math is the same, and ten Adam steps keep the parameters within 1e-6 (measured:
~3e-8). Skips, counters and loss scales are exact. A run compared with itself
(resumed on the same ranks) is bitwise.
"""

from __future__ import annotations

import inspect
import math

import dist_cases as C
import pytest
import torch
from dist_pool import Pool

pytestmark = pytest.mark.skipif(
    not torch.distributed.is_available(), reason="torch built without distributed support"
)

FP32 = dict(rtol=1e-5, atol=1e-6)
CLIP = dict(max_grad_norm=0.1)  # below the gradients' norm (~2.2): clipping is active


class Pools:
    """At most one live pool per world size; shared by the fixtures below."""

    def __init__(self) -> None:
        self._pools: dict[int, Pool] = {}

    def get(self, world: int) -> Pool:
        if world not in self._pools:
            self._pools[world] = Pool(world)
        return self._pools[world]

    def release(self, world: int) -> None:
        pool = self._pools.pop(world, None)
        if pool is not None:
            pool.close()

    def close(self) -> None:
        for world in list(self._pools):
            self.release(world)


@pytest.fixture(scope="module")
def pools():
    registry = Pools()
    yield registry
    registry.close()


@pytest.fixture(scope="module", params=[2, 4], ids=lambda w: f"{w}ranks")
def pool(request, pools) -> Pool:
    """Every test taking ``pool`` runs on 2 ranks, then on 4 (pytest groups the
    tests by this module-scoped parameter, so one pool is alive at a time)."""
    yield pools.get(request.param)
    pools.release(request.param)


def assert_params_close(got: dict, want: dict, **tol) -> float:
    """Every tensor of ``got`` close to ``want``; returns the largest difference."""
    assert got.keys() == want.keys()
    for name in want:
        torch.testing.assert_close(
            got[name].float(), want[name].float(), msg=lambda m, n=name: f"{n}: {m}", **tol
        )
    return max((got[n].float() - want[n].float()).abs().max().item() for n in want)


def assert_state_close(got: dict, want: dict, **tol) -> None:
    for name, states in want.items():
        assert got[name].keys() == states.keys(), name
        for key, value in states.items():
            if key == "step":
                assert got[name][key] == value, (name, got[name][key], value)
            else:
                torch.testing.assert_close(
                    got[name][key], value, msg=lambda m, n=name, k=key: f"{n}[{k}]: {m}", **tol
                )


def assert_norms_close(got: list, want: list) -> None:
    assert len(got) == len(want)
    for g, w in zip(got, want):
        if w is None or g is None:
            assert g is w
        elif math.isfinite(w):
            assert g == pytest.approx(w, rel=1e-5)
        else:
            assert not math.isfinite(g)


def run_and_compare(pool: Pool, case: str = "fsdp_train", **recipe) -> tuple[list, dict]:
    """Run ``case`` on the pool and the same recipe in one process; check what
    every sharded run must match: parameters, states, norms, counters, scales."""
    results = pool.run(case, **recipe)
    ref_recipe = {k: v for k, v in recipe.items() if k in inspect.signature(C.reference).parameters}
    ref = C.reference(**ref_recipe)
    r0 = results[0]
    assert_params_close(r0["params"], ref["params"], **FP32)
    assert_norms_close(r0["norms"], ref["norms"])
    for r in results:
        # the same decision, the same norm and the same loss scale on every rank
        assert (r["skipped"], r["applied"]) == (ref["skipped"], ref["applied"]), r["rank"]
        assert list(map(repr, r["norms"])) == list(map(repr, r0["norms"])), r["rank"]  # nan == nan
        assert r["scales"] == ref["scales"], r["rank"]
    return results, ref


# ---- FSDP2 against one process ------------------------------------------------------------

FSDP_RECIPES = {
    "fp32": dict(),
    "clip": dict(opt_kwargs=CLIP),
    "clip+value": dict(opt_kwargs=dict(max_grad_norm=0.1, max_grad_value=0.05)),
    "amsgrad+clip": dict(opt_kwargs=dict(CLIP, amsgrad=True, weight_decay=0.1)),
    "torch-scaler": dict(scaler="torch"),
    "sharded-scaler": dict(scaler="sharded"),
    "fastopt-scaler+clip": dict(scaler="fastopt", opt_kwargs=CLIP),
    "lion+clip": dict(optimizer="Lion", opt_kwargs=dict(lr=1e-3, max_grad_norm=0.1)),
    "ademamix+clip": dict(optimizer="AdEMAMix", opt_kwargs=dict(CLIP, t_alpha=5, t_beta3=5)),
}


@pytest.mark.parametrize("recipe", FSDP_RECIPES.values(), ids=FSDP_RECIPES.keys())
def test_fsdp2_matches_single_process(pool, recipe):
    results, ref = run_and_compare(pool, **recipe)
    r0 = results[0]
    assert_state_close(r0["state"], ref["state"], **FP32)
    scaled = recipe.get("scaler") is not None
    value_clipped = "max_grad_value" in recipe.get("opt_kwargs", {})
    if not scaled and not value_clipped and recipe.get("opt_kwargs"):
        # N is what torch.nn.utils.clip_grad_norm_ returns on the sharded model
        # (with a scaler .grad holds scaled gradients; with value clipping N is
        # the norm of the clamped ones).
        assert r0["norms"] == pytest.approx(r0["torch_norms"], rel=1e-6)
    # the gatherer's buckets were built once and kept (NOTE [gather cache])
    assert all(r["gather_builds"] == 1 for r in results)
    # the shards really are uneven, and empty on some ranks
    numels = [r["local_numel"] for r in results]
    assert len({n["fc1.weight"] for n in numels}) > 1
    assert any(n["head.weight"] == 0 for n in numels)
    check = r0["state_dict_check"]
    assert check["keys"] == ["param_groups", "state"]
    assert check["mismatches"] == []
    assert check["groups_have_counters"]


def test_fsdp2_bf16_master_weights(pool):
    """bf16 parameters and gradients, fp32 masters. The gradients themselves are
    rounded to bf16 at different points than in one process (each rank's backward,
    the bf16 reduce-scatter), so the optimizer is checked by replaying the sharded
    run's own full gradients through one process: masters and moments at float32
    tolerance, bf16 parameters within one bf16 ulp (the master rounds to the same
    value unless the float32 difference straddles a rounding boundary). The end
    result is also within bf16 noise of the single-process bf16 run."""
    opt_kwargs = dict(master_weights=True, max_grad_norm=0.1)
    results = pool.run("fsdp_train", dtype="bfloat16", opt_kwargs=opt_kwargs, record_grads=True)
    r0 = results[0]
    replay = C.replay(r0["init"], r0["grads"], opt_kwargs=opt_kwargs)
    assert_state_close(r0["state"], replay["state"], **FP32)
    for name, p in replay["params"].items():
        assert p.dtype == r0["params"][name].dtype == torch.bfloat16
        torch.testing.assert_close(r0["params"][name].float(), p.float(), rtol=2**-7, atol=0)
        # the parameter is its master rounded to nearest
        assert torch.equal(r0["params"][name], r0["state"][name]["master_param"].bfloat16())
    assert_norms_close(r0["norms"], replay["norms"])
    ref = C.reference(dtype="bfloat16", opt_kwargs=opt_kwargs)
    # bf16 gradients differ by bf16 rounding: ten updates of at most ~lr each
    assert_params_close(r0["params"], ref["params"], rtol=0, atol=10 * 1e-3)
    check = r0["state_dict_check"]
    assert check["mismatches"] == [] and "master_param" in check["state_keys"]


# ---- FSDP2 + tensor parallel -----------------------------------------------------------------


@pytest.mark.parametrize("opt_kwargs", [{}, CLIP], ids=["noclip", "clip"])
def test_fsdp2_tp(pool, opt_kwargs):
    """FSDP2 over dp, TP over tp on a (world/2, 2) mesh: 1x2 on 2 ranks, 2x2 on 4.
    fc2's bias and the LayerNorm's weight and bias are Replicate over tp and must
    count once in the norm; ``head`` lives on the dp mesh only."""
    results, ref = run_and_compare(pool, model="tp", opt_kwargs=opt_kwargs)
    r0 = results[0]
    assert_state_close(r0["state"], ref["state"], **FP32)
    if opt_kwargs:
        assert r0["norms"] == pytest.approx(r0["torch_norms"], rel=1e-6)
    assert r0["state_dict_check"]["mismatches"] == []


# ---- DDP and ZeroRedundancyOptimizer -----------------------------------------------------------


def test_ddp(pool):
    results, ref = run_and_compare(pool, "ddp_train", opt_kwargs=CLIP)
    assert_state_close(results[0]["state"], ref["state"], **FP32)
    for r in results:
        assert r["norms"] == pytest.approx(r["torch_norms"], rel=1e-6)


@pytest.mark.parametrize("groups", [False, True], ids=["1group", "2groups"])
def test_zero_clips_with_the_global_norm(pool, groups):
    """ZeroRedundancyOptimizer(optimizer_class=functools.partial(fastopt.AdamW,
    process_group=...)): every rank clips with the norm of all partitions. Two param
    groups give ranks different numbers of buckets."""
    results, ref = run_and_compare(pool, "zero_train", opt_kwargs=CLIP, groups=groups)
    for r in results:
        assert r["norms"] == pytest.approx(r["torch_norms"], rel=1e-6)


# ---- one rank's non-finite gradient --------------------------------------------------------------


def _last(pool: Pool) -> int:
    """The last rank: its shards of fc2 and head are empty on 4 ranks."""
    return pool.world - 1


@pytest.mark.parametrize(
    ("case", "model", "param"),
    [
        ("fsdp_train", "mlp", "fc1.weight"),
        ("fsdp_train", "tp", "norm.weight"),  # a replica that is not counted in the norm
        ("zero_train", "mlp", "fc1.weight"),
    ],
    ids=["fsdp2", "fsdp2+tp-replica", "zero"],
)
def test_nan_on_one_rank_skips_everywhere(pool, case, model, param):
    """A NaN in one rank's local gradient only: every rank skips step 4 with its
    parameters and states bitwise unchanged and counts it; the run goes on equal
    to one process that skipped the same step."""
    recipe = dict(opt_kwargs=CLIP, watch_step=4,
                  inject=dict(step=4, rank=_last(pool), value="nan", param=param))  # fmt: skip
    if case == "fsdp_train":
        recipe["model"] = model
    else:  # ZeRO: the rank that owns the parameter (the others never read its gradient)
        recipe["inject"]["rank"] = "owner"
    results, ref = run_and_compare(pool, case, **recipe)
    assert ref["skipped"] == 1
    for r in results:
        assert r["skipped"] == 1 and r["unchanged_bitwise"], r["rank"]
        assert not math.isfinite(r["norms"][4])


@pytest.mark.parametrize("scaler", ["torch", "sharded", "fastopt"])
def test_overflow_on_one_rank_backs_off_everywhere(pool, scaler):
    """An inf in one rank's shard under loss scaling: every rank skips the step,
    and the scale backs off (and later grows) the same way on every rank, as in
    one process."""
    inject = dict(step=4, rank=_last(pool), value="inf", param="fc1.weight")
    results, ref = run_and_compare(pool, scaler=scaler, inject=inject, watch_step=4)
    assert ref["scales"][4] == ref["scales"][3] / 2
    for r in results:
        assert r["skipped"] == 1 and r["unchanged_bitwise"], r["rank"]


# ---- checkpoints --------------------------------------------------------------------------------

SCHEDULE = dict(warmup_steps=4, total_steps=10)
DCP_RECIPE = dict(opt_kwargs=CLIP, schedule=SCHEDULE)
NAN_AT_2 = dict(step=2, rank=1, value="nan", param="fc1.weight")


@pytest.fixture(scope="module")
def dcp_checkpoint(pools, tmp_path_factory):
    """A DCP checkpoint written by 2 ranks after 5 steps (step 2 skipped), and the
    uninterrupted 2-rank run to step 10."""
    path = str(tmp_path_factory.mktemp("dcp") / "step5")
    results = pools.get(2).run(
        "dcp_train", path=path, save_at=5, steps=10, inject=NAN_AT_2, **DCP_RECIPE
    )
    return path, results


@pytest.fixture(scope="module")
def uninterrupted():
    """One process, ten steps, step 2 skipped, the same schedule."""
    return C.reference(opt_kwargs=CLIP, schedule=SCHEDULE, inject=NAN_AT_2)


def test_dcp_save_on_2_ranks(dcp_checkpoint, uninterrupted):
    path, results = dcp_checkpoint
    r0 = results[0]
    assert r0["top_keys"] == ["param_groups", "state"]
    assert r0["at_save"]["applied"] == 4 and r0["at_save"]["skipped"] == 1
    assert_params_close(r0["params"], uninterrupted["params"], **FP32)
    assert r0["lrs"] == pytest.approx(uninterrupted["lrs"], rel=1e-12)


def _check_resumed(res: dict, dcp_checkpoint, uninterrupted) -> None:
    _, saved = dcp_checkpoint
    at_save = saved[0]["at_save"]
    assert res["loaded"] == at_save  # applied_steps, skipped_steps and the lr survive DCP
    assert (res["applied"], res["skipped"]) == (9, 1)
    assert res["lrs"] == pytest.approx(uninterrupted["lrs"][5:], rel=1e-12)


def test_dcp_resume_on_1_process(dcp_checkpoint, uninterrupted):
    """The 2-rank checkpoint loaded into a plain model in this process (no
    process group): DCP reshards the DTensor states into plain tensors."""
    path, _ = dcp_checkpoint
    res = C.dcp_resume(path=path, start=5, steps=10, **DCP_RECIPE)
    _check_resumed(res, dcp_checkpoint, uninterrupted)
    assert_params_close(res["params"], uninterrupted["params"], **FP32)
    assert_state_close(res["state"], uninterrupted["state"], **FP32)


def test_dcp_resume(pool, dcp_checkpoint, uninterrupted):
    """Loaded on 2 ranks it continues bitwise as the uninterrupted 2-rank run; on 4
    ranks (resharded) within float32 tolerance of it."""
    path, saved = dcp_checkpoint
    results = pool.run("dcp_resume", path=path, start=5, steps=10, **DCP_RECIPE)
    for r in results:
        _check_resumed(r, dcp_checkpoint, uninterrupted)
    r0 = results[0]
    if pool.world == 2:
        for name, p in saved[0]["params"].items():
            assert torch.equal(r0["params"][name], p), name
    assert_params_close(r0["params"], uninterrupted["params"], **FP32)
    assert_state_close(r0["state"], uninterrupted["state"], **FP32)
    assert r0["state_dict_check"]["mismatches"] == []


@pytest.fixture(scope="module")
def int8_checkpoint(pools, tmp_path_factory):
    """2 ranks, FSDP2, 8-bit moments: a DCP checkpoint after 4 steps, and the run to 8."""
    path = str(tmp_path_factory.mktemp("dcp_int8") / "step4")
    return path, pools.get(2).run("int8_dcp_train", path=path, save_at=4, steps=8)


def _assert_moments_within_a_code(got: dict, want: dict) -> None:
    """Moments coded on other block boundaries: each within one code step of its
    block (a code step is at most 2/127 of the block's scale for m, 4/255 for v)."""
    for name, states in want.items():
        for key, w in states.items():
            scale = w.abs().max()
            torch.testing.assert_close(got[name][key], w, rtol=0, atol=float(scale) * 0.04)


def test_int8_moments_reshard_through_dcp(pool, int8_checkpoint):
    """8-bit moments of DTensor shards are written as fp32 DTensors with the
    parameter's placements and coded again on load. Back on 2 ranks (the same
    blocks) the run continues bit for bit as the uninterrupted one; on 4 ranks
    (shards of 1120 elements: blocks cut elsewhere) the loaded moments are
    within a code step of the saved ones and the run stays close."""
    path, saved = int8_checkpoint
    s0 = saved[0]
    assert s0["live"]["fc1.weight"] == "torch.uint8"  # 8-bit in the step
    assert s0["live"]["head.weight"] == "torch.float32"  # 640 elements: fp32
    assert s0["state_dict_check"]["mismatches"] == []  # DTensors in state_dict()
    results = pool.run("int8_dcp_resume", path=path, start=4, steps=8)
    r0 = results[0]
    if pool.world == 2:
        for name in s0["params"]:
            assert torch.equal(r0["loaded"]["params"][name], s0["at_save"]["params"][name])
            for key, t in s0["at_save"]["moments"][name].items():
                assert torch.equal(r0["loaded"]["moments"][name][key], t), (name, key)
            assert torch.equal(r0["params"][name], s0["params"][name]), name
    else:
        _assert_moments_within_a_code(r0["loaded"]["moments"], s0["at_save"]["moments"])
        assert_params_close(r0["params"], s0["params"], rtol=2e-2, atol=2e-3)


def test_int8_moments_resume_in_one_process(int8_checkpoint):
    """The 2-rank 8-bit checkpoint loaded into a plain model: DCP reshards the
    decoded moments into whole tensors, coded again over the whole tensor."""
    path, saved = int8_checkpoint
    res = C.int8_dcp_resume(path=path, start=4, steps=8)
    assert res["live"]["fc1.weight"] == "torch.uint8"
    _assert_moments_within_a_code(res["loaded"]["moments"], saved[0]["at_save"]["moments"])
    assert_params_close(res["params"], saved[0]["params"], rtol=2e-2, atol=2e-3)


def test_zero_consolidate_resume_and_schedule(pool, tmp_path):
    """ZeRO with fastopt.schedules.warmup_decay on the wrapper: the lr follows the
    applied steps (a skipped step does not advance it); after consolidate_state_dict
    and a load into a fresh ZeRO, applied_steps / skipped_steps are back on every
    rank and the run continues as the uninterrupted one."""
    path = str(tmp_path / "zero.pt")
    inject = dict(NAN_AT_2, rank="owner")
    results, ref = run_and_compare(
        pool, "zero_train", opt_kwargs=CLIP, schedule=SCHEDULE, inject=inject, save_at=5, path=path
    )  # fmt: skip
    lrs = results[0]["lrs"]
    assert lrs == pytest.approx(ref["lrs"], rel=1e-12)
    assert lrs[0] < lrs[1] and lrs[2] == lrs[1] < lrs[3]  # step 2 skipped: no advance
    for r in results:
        assert r["at_save"] == dict(applied=4, skipped=1)
        assert r["lrs"] == lrs
    resumed = pool.run(
        "zero_resume", path=path, start=5, steps=10, opt_kwargs=CLIP, schedule=SCHEDULE
    )
    for r in resumed:
        assert r["loaded"] == dict(applied=4, skipped=1), r["rank"]
        assert (r["applied"], r["skipped"]) == (9, 1)
        assert r["lrs"] == lrs[5:]
    # Within float32 tolerance, not bitwise: the fresh DDP's first backward reduces
    # through its initial gradient buckets, the uninterrupted one's through the
    # rebuilt ones, and gloo's sums of differently cut buckets round differently.
    assert_params_close(resumed[0]["params"], results[0]["params"], **FP32)
    assert_params_close(resumed[0]["params"], ref["params"], **FP32)
