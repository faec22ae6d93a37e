"""fastopt inside PyTorch Lightning, the HF transformers Trainer and HF accelerate.

docs/integrations.md describes the recipes; these tests run each one for a few
real steps on a tiny model on CPU and check what the page promises:

* clipping happens inside the optimizer (``max_grad_norm``) with the framework's
  own clipping turned off, and the trained parameters match a run of
  ``torch.optim.AdamW`` with the framework's clipping (so the in-optimizer clip
  really ran, at the same norm), while an unclipped run lands measurably
  elsewhere (so the comparison can tell clipping from no clipping);
* the optimizer's counters advance once per optimizer step the framework
  takes (gradient accumulation included), and ``last_grad_norm`` equals the
  norm the framework computes itself;
* the framework's checkpointing carries fastopt's state: a resumed run ends
  where an uninterrupted one does;
* Lightning's refusal of Trainer-side clipping under mixed precision for
  optimizers that unscale inside ``step()`` (the reason Trainer clipping must be
  off) holds for fastopt exactly as for torch's fused AdamW;
* the GradScaler protocol as the frameworks drive it (Lightning's "16-mixed"
  plugin, accelerate's scaler-wrapped optimizer): unscaling and the skip on an
  infinite loss happen inside fastopt's step, and the one place a framework
  misreads such a skip (accelerate's ``step_was_skipped``) is a strict xfail.

Each test skips when its framework is not installed
(``bash scripts/install_integrations.sh`` installs all three).
"""

from __future__ import annotations

import math
import warnings

import pytest
import torch
from torch.nn import functional as F

import fastopt

# Lightning 2.6 on torch 2.14 warns about a deprecated pytree call on every fit.
pytestmark = pytest.mark.filterwarnings("ignore:.*isinstance\\(treespec, LeafSpec\\).*")

LR = 1e-2
# Below the tiny models' gradient norms (~0.3-2.5) at most steps and above them at
# others, so the clip factor changes from step to step and Adam's invariance to
# a constant gradient scale does not hide it.
MAX_NORM = 0.5
# fastopt vs torch.optim.AdamW(foreach=False) with the framework's
# clip_grad_norm_: the two sum the squared gradients in different orders and
# apply the clip factor at different points (in the kernel vs in .grad), so the
# clip factors and updates differ by a few fp32 ulps per step. Measured after
# 6-8 steps: at most 6e-7 absolute on parameters of size ~0.1-1. The unclipped
# control run differs by at least 2e-4, so this tolerance cannot mistake one
# for the other (asserted in every test via CONTROL_GAP).
ATOL, RTOL = 5e-6, 1e-5
CONTROL_GAP = 10 * ATOL


def _mlp() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 1))


def _regression_data(n: int = 24) -> tuple[torch.Tensor, torch.Tensor]:
    x = torch.randn(n, 8, generator=torch.Generator().manual_seed(1))
    y = torch.randn(n, 1, generator=torch.Generator().manual_seed(2))
    return x, y


def _params(module: torch.nn.Module) -> list[torch.Tensor]:
    return [p.detach().clone() for p in module.parameters()]


def _max_diff(a: list[torch.Tensor], b: list[torch.Tensor]) -> float:
    return max((x - y).abs().max().item() for x, y in zip(a, b, strict=True))


def _check_against_references(mine, clipped_ref, unclipped_ref) -> None:
    """fastopt's params match the framework-clipped run and not the unclipped one."""
    for i, (a, b) in enumerate(zip(mine, clipped_ref, strict=True)):
        torch.testing.assert_close(a, b, atol=ATOL, rtol=RTOL, msg=lambda m, i=i: f"param {i}: {m}")
    gap = _max_diff(mine, unclipped_ref)
    assert gap > CONTROL_GAP, (
        f"the unclipped run is only {gap:.2e} away: this setup cannot tell clipping from none"
    )


def _global_norm(params) -> float:
    grads = [p.grad.detach().float() for p in params if p.grad is not None]
    return torch.linalg.vector_norm(
        torch.stack([torch.linalg.vector_norm(g) for g in grads])
    ).item()


# ---------------------------------------------------------------------------
# PyTorch Lightning
# ---------------------------------------------------------------------------


def _lightning():
    return pytest.importorskip("lightning.pytorch")


def _lightning_module(pl, make_optimizer, *, poison_step=None):
    """A LightningModule around _mlp() that records, per optimizer step, the
    gradient norm its hook sees (before Lightning clips) and, for fastopt, the
    optimizer's last_grad_norm read through Lightning's optimizer wrapper.
    ``poison_step``: at that global step the loss is multiplied by inf."""

    class Tiny(pl.LightningModule):
        def __init__(self):
            super().__init__()
            self.net = _mlp()
            self.grad_norms: list[float] = []
            self.fastopt_norms: list[float] = []

        def training_step(self, batch, batch_idx):
            x, y = batch
            loss = F.mse_loss(self.net(x).float(), y)
            return loss * math.inf if self.global_step == poison_step else loss

        def configure_optimizers(self):
            return make_optimizer(self.parameters())

        def on_before_optimizer_step(self, optimizer):
            # runs after backward and before Trainer-side clipping
            self.grad_norms.append(_global_norm(self.parameters()))

        def on_train_batch_end(self, outputs, batch, batch_idx):
            opt = self.optimizers()  # LightningOptimizer wrapping ours
            if isinstance(opt.optimizer, fastopt.AdamW):
                self.fastopt_norms.append(opt.last_grad_norm.item())

    return Tiny()


def _fit(pl, module, tmp_path, *, ckpt_path=None, **trainer_kwargs):
    x, y = _regression_data()
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=8)
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=tmp_path,
        **trainer_kwargs,
    )
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*does not have many workers.*")
        trainer.fit(module, loader, ckpt_path=ckpt_path)
    return trainer


@pytest.mark.parametrize("precision", ["32-true", "bf16-mixed"])
def test_lightning_in_optimizer_clipping_matches_trainer_clipping(tmp_path, precision):
    pl = _lightning()
    steps = 6

    mine = _lightning_module(pl, lambda p: fastopt.AdamW(p, lr=LR, max_grad_norm=MAX_NORM))
    trainer = _fit(pl, mine, tmp_path, max_steps=steps, precision=precision, gradient_clip_val=None)
    opt = trainer.optimizers[0]
    assert isinstance(opt, fastopt.AdamW)
    assert opt.applied_steps == steps and opt.skipped_steps == 0
    # last_grad_norm is reachable through the LightningOptimizer wrapper and is the
    # norm Lightning's own hook sees before any clipping
    assert len(mine.fastopt_norms) == steps
    torch.testing.assert_close(mine.fastopt_norms, mine.grad_norms, atol=1e-6, rtol=1e-5)
    assert max(mine.grad_norms) > MAX_NORM > min(mine.grad_norms), mine.grad_norms

    # torch's AdamW (not fused: Lightning allows Trainer clipping for it under AMP)
    ref = _lightning_module(pl, lambda p: torch.optim.AdamW(p, lr=LR, foreach=False))
    _fit(pl, ref, tmp_path, max_steps=steps, precision=precision, gradient_clip_val=MAX_NORM,
         gradient_clip_algorithm="norm")  # fmt: skip
    free = _lightning_module(pl, lambda p: torch.optim.AdamW(p, lr=LR, foreach=False))
    _fit(pl, free, tmp_path, max_steps=steps, precision=precision, gradient_clip_val=None)
    torch.testing.assert_close(mine.grad_norms, ref.grad_norms, atol=1e-5, rtol=1e-5)
    _check_against_references(_params(mine), _params(ref), _params(free))


@pytest.mark.parametrize(
    "make_optimizer",
    [
        pytest.param(lambda p: fastopt.AdamW(p, lr=LR), id="fastopt"),
        pytest.param(lambda p: torch.optim.AdamW(p, lr=LR, fused=True), id="torch-fused"),
    ],
)
def test_lightning_refuses_trainer_clipping_under_amp(tmp_path, make_optimizer):
    """Under "bf16-mixed" (and "16-mixed") Lightning raises as soon as it would clip
    for an optimizer with ``_step_supports_amp_scaling`` (it cannot unscale for it
    first); torch's fused AdamW gets the same answer, so the recipe is clipping
    inside the optimizer with ``gradient_clip_val=None``."""
    pl = _lightning()
    module = _lightning_module(pl, make_optimizer)
    with pytest.raises(RuntimeError, match="does not allow for gradient clipping"):
        _fit(pl, module, tmp_path, max_steps=2, precision="bf16-mixed", gradient_clip_val=1.0)


@pytest.mark.parametrize("scaler_cls", ["torch", "fastopt"])
def test_lightning_16_mixed_scaler_protocol(tmp_path, scaler_cls):
    """ "16-mixed" drives the optimizer through a GradScaler: Lightning sees
    ``_step_supports_amp_scaling``, skips its own ``unscale_`` and calls
    ``scaler.step(opt)``, so the unscale and the clip happen inside fastopt's step.
    Lightning's connector turns "16-mixed" into "bf16-mixed" on CPU, so the
    precision plugin is built by hand here (fp16 autocast runs on CPU). The
    reference, torch.optim.AdamW with Trainer clipping, is unscaled by Lightning
    before it clips. A step with an infinite loss is skipped by fastopt (the
    scaler backs off, the counters say so) and by the reference alike."""
    pl = _lightning()
    from lightning.pytorch.plugins.precision import MixedPrecision

    def plugin(cls):
        return MixedPrecision("16-mixed", "cpu", scaler=cls("cpu", init_scale=2.0**10))

    scaler = {"torch": torch.amp.GradScaler, "fastopt": fastopt.GradScaler}[scaler_cls]
    steps, poison = 6, 3
    mine = _lightning_module(
        pl, lambda p: fastopt.AdamW(p, lr=LR, max_grad_norm=MAX_NORM), poison_step=poison
    )
    trainer = _fit(pl, mine, tmp_path, max_steps=steps, plugins=[plugin(scaler)])
    opt = trainer.optimizers[0]
    assert opt.applied_steps == steps - 1 and opt.skipped_steps == 1
    assert trainer.precision_plugin.scaler.get_scale() == 2.0**9  # one backoff
    assert math.isinf(mine.fastopt_norms[poison]) or math.isnan(mine.fastopt_norms[poison])

    ref = _lightning_module(
        pl, lambda p: torch.optim.AdamW(p, lr=LR, foreach=False), poison_step=poison
    )
    _fit(pl, ref, tmp_path, max_steps=steps, plugins=[plugin(torch.amp.GradScaler)],
         gradient_clip_val=MAX_NORM)  # fmt: skip
    free = _lightning_module(
        pl, lambda p: torch.optim.AdamW(p, lr=LR, foreach=False), poison_step=poison
    )
    _fit(pl, free, tmp_path, max_steps=steps, plugins=[plugin(torch.amp.GradScaler)])
    # the reference's hook sees unscaled gradients (Lightning unscaled them for it);
    # fastopt's last_grad_norm is the unscaled norm too
    finite = [i for i in range(steps) if i != poison]
    torch.testing.assert_close(
        [mine.fastopt_norms[i] for i in finite], [ref.grad_norms[i] for i in finite],
        atol=1e-5, rtol=1e-5,
    )  # fmt: skip
    _check_against_references(_params(mine), _params(ref), _params(free))


def test_lightning_checkpoint_resume_continues_exactly(tmp_path):
    """Two epochs straight vs one epoch, ``trainer.save_checkpoint``, and a resumed
    ``fit(ckpt_path=...)`` for the second: the optimizer state (moments, step,
    counters) travels through Lightning's checkpoint and the runs end bit for bit
    equal. Three batches per epoch, no shuffling: the resume point is an epoch
    boundary, so both runs see the same batches."""
    pl = _lightning()

    def make(p):
        return fastopt.AdamW(p, lr=LR, max_grad_norm=MAX_NORM)

    straight = _lightning_module(pl, make)
    t = _fit(pl, straight, tmp_path / "a", max_epochs=2)
    assert t.optimizers[0].applied_steps == 6

    first = _lightning_module(pl, make)
    t = _fit(pl, first, tmp_path / "b", max_epochs=1)
    ckpt = tmp_path / "b" / "half.ckpt"
    t.save_checkpoint(ckpt)
    resumed = _lightning_module(pl, make)
    t = _fit(pl, resumed, tmp_path / "c", max_epochs=2, ckpt_path=ckpt)
    opt = t.optimizers[0]
    assert opt.applied_steps == 6 and opt.skipped_steps == 0
    assert len(resumed.fastopt_norms) == 3  # the resumed fit took only the second epoch's steps
    for i, (a, b) in enumerate(zip(_params(resumed), _params(straight), strict=True)):
        torch.testing.assert_close(a, b, atol=0, rtol=0, msg=lambda m, i=i: f"param {i}: {m}")


# ---------------------------------------------------------------------------
# HF accelerate (and the process-wide state it and the HF Trainer share)
# ---------------------------------------------------------------------------


@pytest.fixture
def accelerate_state():
    """accelerate keeps its state in process-wide singletons; every test here
    builds its own Accelerator(s), so reset the singletons around each one."""
    state = pytest.importorskip("accelerate.state")

    def reset():
        state.AcceleratorState._reset_state(True)
        state.GradientState._reset_state()

    reset()
    yield reset
    reset()


def _accelerate_run(reset, make_optimizer, *, clip=None, mixed_precision="no", accum=2,
                    batches=None, save_to=None, save_after=None, load_from=None):  # fmt: skip
    """The recipe of docs/integrations.md: prepare(model, optimizer), accumulate,
    backward, step, zero_grad; ``clip`` adds accelerate's own clipping (for the
    torch reference run) at each sync step."""
    from accelerate import Accelerator

    reset()
    accelerator = Accelerator(
        cpu=True, gradient_accumulation_steps=accum, mixed_precision=mixed_precision
    )
    model = _mlp()
    opt = make_optimizer(model.parameters())
    model, opt = accelerator.prepare(model, opt)
    if load_from is not None:
        accelerator.load_state(load_from)
    if batches is None:
        x, y = _regression_data(64)
        batches = [(x[i : i + 8], y[i : i + 8]) for i in range(0, 64, 8)]
    norms = []
    for k, (xb, yb) in enumerate(batches):
        with accelerator.accumulate(model):
            loss = F.mse_loss(model(xb).float(), yb)
            accelerator.backward(loss)
            if accelerator.sync_gradients:
                norms.append(_global_norm(model.parameters()))
                if clip is not None:
                    accelerator.clip_grad_norm_(model.parameters(), clip)
            opt.step()
            opt.zero_grad()
        if save_to is not None and k + 1 == save_after:
            accelerator.save_state(save_to)
    return model, opt, norms


@pytest.mark.parametrize("mixed_precision", ["no", "bf16"])
def test_accelerate_in_optimizer_clipping_with_accumulation(accelerate_state, mixed_precision):
    steps, accum = 4, 2  # 8 micro-batches
    model, opt, norms = _accelerate_run(
        accelerate_state,
        lambda p: fastopt.AdamW(p, lr=LR, max_grad_norm=MAX_NORM),
        mixed_precision=mixed_precision,
        accum=accum,
    )
    inner = opt.optimizer  # accelerate's AcceleratedOptimizer wraps ours
    assert isinstance(inner, fastopt.AdamW)
    # opt.step() ran 8 times; accelerate passed only the 4 sync steps through
    assert inner.applied_steps == steps and inner.skipped_steps == 0
    assert math.isclose(inner.last_grad_norm.item(), norms[-1], rel_tol=1e-5)
    assert max(norms) > MAX_NORM, norms

    ref, _, ref_norms = _accelerate_run(
        accelerate_state,
        lambda p: torch.optim.AdamW(p, lr=LR, foreach=False),
        clip=MAX_NORM,
        mixed_precision=mixed_precision,
        accum=accum,
    )
    free, _, _ = _accelerate_run(
        accelerate_state,
        lambda p: torch.optim.AdamW(p, lr=LR, foreach=False),
        mixed_precision=mixed_precision,
        accum=accum,
    )
    torch.testing.assert_close(norms, ref_norms, atol=1e-5, rtol=1e-5)
    _check_against_references(_params(model), _params(ref), _params(free))


def _accelerated_overflow_step(reset):
    """One step through accelerate's optimizer wrapper with a GradScaler (what
    ``Accelerator(mixed_precision="fp16")`` builds on a GPU; accelerate makes no
    scaler on CPU, so the wrapper is built by hand) on an infinite loss."""
    from accelerate import Accelerator
    from accelerate.optimizer import AcceleratedOptimizer

    reset()
    Accelerator(cpu=True)
    model = _mlp()
    inner = fastopt.AdamW(model.parameters(), lr=LR, max_grad_norm=MAX_NORM)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
    opt = AcceleratedOptimizer(inner, device_placement=False, scaler=scaler)
    # built on accelerate's wrapper, as a user would after prepare()
    schedule = fastopt.schedules.warmup_decay(opt, warmup_steps=4, total_steps=10)
    before = _params(model)
    x, y = _regression_data(8)
    scaler.scale(F.mse_loss(model(x), y) * math.inf).backward()
    lr_before = opt.param_groups[0]["lr"]
    opt.step()
    schedule.step()
    return opt, inner, scaler, before, model, lr_before


def test_accelerate_scaler_overflow_is_skipped_by_fastopt(accelerate_state):
    """fastopt skips the step, the scaler backs off, and warmup_decay, which
    counts applied steps, holds the learning rate where it was."""
    opt, inner, scaler, before, model, lr_before = _accelerated_overflow_step(accelerate_state)
    assert inner.skipped_steps == 1 and inner.applied_steps == 0
    assert all(torch.equal(a, b) for a, b in zip(before, _params(model), strict=True))
    assert scaler.get_scale() == 2.0**9
    assert opt.param_groups[0]["lr"] == lr_before


@pytest.mark.xfail(
    strict=True,
    raises=AssertionError,
    reason="accelerate decides step_was_skipped by whether the scaler called "
    "optimizer.step(); GradScaler always calls it for optimizers with "
    "_step_supports_amp_scaling (fastopt, torch's fused AdamW), which skip inside "
    "step(). So under fp16 accelerate's scheduler wrapper and the HF Trainer advance "
    "the LR schedule on skipped steps (docs/integrations.md).",
)
def test_accelerate_reports_the_skipped_step(accelerate_state):
    opt, *_ = _accelerated_overflow_step(accelerate_state)
    assert opt.step_was_skipped


def test_accelerate_save_load_state_resumes(accelerate_state, tmp_path):
    """``accelerator.save_state`` after 2 optimizer steps, a fresh model and
    optimizer, ``load_state``, and the remaining micro-batches: same end point as
    the uninterrupted run, and the counters carried over."""

    def make(p):
        return fastopt.AdamW(p, lr=LR, max_grad_norm=MAX_NORM)

    x, y = _regression_data(64)
    batches = [(x[i : i + 8], y[i : i + 8]) for i in range(0, 64, 8)]
    straight, _, _ = _accelerate_run(accelerate_state, make, batches=batches)
    _accelerate_run(
        accelerate_state, make, batches=batches[:4], save_to=tmp_path / "s", save_after=4
    )
    resumed, opt, _ = _accelerate_run(
        accelerate_state, make, batches=batches[4:], load_from=tmp_path / "s"
    )
    assert opt.optimizer.applied_steps == 4
    for i, (a, b) in enumerate(zip(_params(resumed), _params(straight), strict=True)):
        torch.testing.assert_close(a, b, atol=0, rtol=0, msg=lambda m, i=i: f"param {i}: {m}")


# ---------------------------------------------------------------------------
# HF transformers Trainer
# ---------------------------------------------------------------------------


def _hf_train(tmp_path, reset, optimizer_cls_and_kwargs, *, max_grad_norm, steps=6,
              weight_decay=0.01, callbacks=(), trainer_cls=None, save_steps=None,
              resume=None, out="hf", lr_scheduler_type="constant"):  # fmt: skip
    transformers = pytest.importorskip("transformers")
    reset()
    torch.manual_seed(0)
    config = transformers.GPT2Config(
        vocab_size=32, n_positions=16, n_embd=16, n_layer=1, n_head=2,
        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=0, eos_token_id=0,
    )  # fmt: skip
    model = transformers.GPT2LMHeadModel(config)
    tokens = torch.randint(0, 32, (32, 16), generator=torch.Generator().manual_seed(1))
    data = [{"input_ids": t, "labels": t} for t in tokens]
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path / out),
        per_device_train_batch_size=4,
        max_steps=steps,
        learning_rate=LR,
        lr_scheduler_type=lr_scheduler_type,
        weight_decay=weight_decay,
        max_grad_norm=max_grad_norm,
        logging_strategy="no",
        save_strategy="no" if save_steps is None else "steps",
        save_steps=save_steps or 500,
        report_to="none",
        use_cpu=True,
        seed=0,
        disable_tqdm=True,
        dataloader_num_workers=0,
    )
    trainer = (trainer_cls or transformers.Trainer)(
        model=model,
        args=args,
        train_dataset=data,
        optimizer_cls_and_kwargs=optimizer_cls_and_kwargs,
        callbacks=list(callbacks),
    )
    trainer.train(resume_from_checkpoint=resume)
    return trainer, model


def test_hf_trainer_in_optimizer_clipping_matches_trainer_clipping(
    tmp_path, accelerate_state, monkeypatch
):
    transformers = pytest.importorskip("transformers")
    accelerate = pytest.importorskip("accelerate")
    steps = 6

    # Every clip_grad_norm_ the Trainer asks accelerate for: (max_norm, returned norm).
    calls: list[tuple[float, float]] = []
    original = accelerate.Accelerator.clip_grad_norm_

    def recording(self, parameters, max_norm, *args, **kwargs):
        norm = original(self, parameters, max_norm, *args, **kwargs)
        calls.append((float(max_norm), float(norm)))
        return norm

    monkeypatch.setattr(accelerate.Accelerator, "clip_grad_norm_", recording)

    class FastoptNorms(transformers.TrainerCallback):
        def __init__(self):
            self.norms = []

        def on_optimizer_step(self, args, state, control, optimizer=None, **kwargs):
            self.norms.append(optimizer.optimizer.last_grad_norm.item())

    log = FastoptNorms()
    # weight_decay=0.1 here is overridden: the Trainer builds the param groups and
    # gives each one its own "weight_decay" (TrainingArguments.weight_decay, or 0.0
    # for biases and norms) -- asserted below, documented in docs/integrations.md.
    trainer, model = _hf_train(
        tmp_path, accelerate_state,
        (fastopt.AdamW, {"max_grad_norm": MAX_NORM, "weight_decay": 0.1}),
        max_grad_norm=0, callbacks=[log],
    )  # fmt: skip
    opt = trainer.optimizer.optimizer
    assert isinstance(opt, fastopt.AdamW)
    assert opt.applied_steps == steps and opt.skipped_steps == 0
    assert [g["weight_decay"] for g in opt.param_groups] == [0.01, 0.0]
    # max_grad_norm=0: the Trainer clips nothing, but still asks for the norm
    # (max_norm=inf, for its logs) once per step; fastopt's norm is that norm.
    assert [m for m, _ in calls] == [math.inf] * steps
    torch.testing.assert_close(log.norms, [n for _, n in calls], atol=1e-6, rtol=1e-5)
    assert max(log.norms) > MAX_NORM, log.norms

    calls.clear()
    _, ref = _hf_train(tmp_path, accelerate_state, (torch.optim.AdamW, {"foreach": False}),
                       max_grad_norm=MAX_NORM)  # fmt: skip
    assert [m for m, _ in calls] == [MAX_NORM] * steps
    _, free = _hf_train(tmp_path, accelerate_state, (torch.optim.AdamW, {"foreach": False}),
                        max_grad_norm=0)  # fmt: skip
    _check_against_references(_params(model), _params(ref), _params(free))


def test_hf_trainer_without_its_norm_pass(tmp_path, accelerate_state, monkeypatch):
    """The optional subclass of docs/integrations.md: returning the given norm from
    ``_get_grad_norm`` drops the Trainer's extra pass over the gradients (a private
    method of transformers; this test notices when it changes)."""
    transformers = pytest.importorskip("transformers")
    accelerate = pytest.importorskip("accelerate")
    if not hasattr(transformers.Trainer, "_get_grad_norm"):
        pytest.fail("transformers.Trainer._get_grad_norm is gone: update docs/integrations.md")

    class FastoptTrainer(transformers.Trainer):
        def _get_grad_norm(self, model, grad_norm=None):
            return grad_norm

    def forbidden(*args, **kwargs):
        raise AssertionError("the Trainer computed a gradient norm of its own")

    monkeypatch.setattr(accelerate.Accelerator, "clip_grad_norm_", forbidden)
    trainer, model = _hf_train(
        tmp_path, accelerate_state, (fastopt.AdamW, {"max_grad_norm": MAX_NORM}),
        max_grad_norm=0, trainer_cls=FastoptTrainer,
    )  # fmt: skip
    assert trainer.optimizer.optimizer.applied_steps == 6


def test_hf_trainer_checkpoint_resume_continues_exactly(tmp_path, accelerate_state):
    """A checkpoint saved by the Trainer at step 3 (optimizer.pt holds fastopt's
    state dict) and ``train(resume_from_checkpoint=...)`` to step 6 end bit for
    bit where 6 uninterrupted steps do, under a cosine schedule."""
    recipe = (fastopt.AdamW, {"max_grad_norm": MAX_NORM})
    kw = dict(max_grad_norm=0, lr_scheduler_type="cosine")
    _, straight = _hf_train(tmp_path, accelerate_state, recipe, out="a", **kw)
    _hf_train(tmp_path, accelerate_state, recipe, out="b", save_steps=3, **kw)
    trainer, resumed = _hf_train(
        tmp_path,
        accelerate_state,
        recipe,
        out="c",
        resume=str(tmp_path / "b" / "checkpoint-3"),
        **kw,
    )
    assert trainer.optimizer.optimizer.applied_steps == 6
    for i, (a, b) in enumerate(zip(_params(resumed), _params(straight), strict=True)):
        torch.testing.assert_close(a, b, atol=0, rtol=0, msg=lambda m, i=i: f"param {i}: {m}")
