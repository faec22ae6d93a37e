"""The run: ``Run`` (model, optimizer, schedule, scaler, LAWA, data position) and ``train()``.

One optimizer step, in order (``Run.train_step``)::

    for each of n micro-batches:  loss = model(x, y) / n;  scaler.scale(loss).backward()
    scaler.step(optimizer)   fastopt: unscale, global grad norm, clip and update in one kernel
    scaler.update()          new loss scale (fp16 only; otherwise the scaler is disabled and
                             scale/step/update pass straight through, as in nanoGPT)
    scheduler.step();  optimizer.zero_grad(set_to_none=True)

NOTE [parallel hook]
Data parallelism (``torchrun ... -m fastopt.train --parallel ddp|fsdp|zero``,
NOTE [parallel modes] in parallel.py) touches the step in three places only.
``wrap_model`` is the one place the model is wrapped (DDP, or ``fully_shard``
in place, then ``torch.compile``), and ``make_optimizer`` right after it builds
the optimizer, or its ZeRO-sharded form, on the wrapped parameters.
``Run.batch`` is the one place a training micro-batch is drawn: each rank
keeps its slice of the same global batch. The logged loss is the mean over
the ranks' slices; gradients are averaged by DDP / FSDP in the backward pass.
"""

from __future__ import annotations

import contextlib
import math
import os
import random
import sys
import time
import warnings
from pathlib import Path

import torch
from torch import nn

import fastopt
from fastopt.averaging import LAWA
from fastopt.schedules import warmup_decay
from fastopt.train import parallel
from fastopt.train.checkpoint import (
    checkpoint_path,
    load_checkpoint,
    load_run_state_dict,
    save_run,
)
from fastopt.train.config import ConfigError, TrainConfig, parse_args
from fastopt.train.data import Corpus, DataError, unigram_cross_entropy
from fastopt.train.metrics import CURVES, METRICS, Metrics, Progress, plot_curves
from fastopt.train.model import ByteTransformer
from fastopt.train.parallel import SINGLE, Parallel

# ---------------------------------------------------------------------------------------------
# model, optimizer, precision


def wrap_model(cfg: TrainConfig, model: nn.Module, par: Parallel = SINGLE) -> nn.Module:
    """What the loop calls for the forward pass; NOTE [parallel hook].

    ddp / zero: ``DistributedDataParallel(model)``; fsdp: ``fully_shard`` on each
    block and the root, in place (``model``'s parameters become DTensor shards).
    """
    forward = parallel.wrap(model, par, cfg.device)
    return torch.compile(forward) if cfg.compile else forward


def make_optimizer(
    cfg: TrainConfig, model: nn.Module, par: Parallel = SINGLE
) -> torch.optim.Optimizer:
    # weight decay on matrices (embedding, projections) only; norm gains stay free
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    groups = [
        {"params": decay, "weight_decay": cfg.weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    lr, betas = cfg.peak_lr(), (cfg.beta1, cfg.beta2)
    masters = {"fp32": True, "remainder": "remainder", "none": False}
    states = {"auto": None, "fp32": torch.float32, "bf16": torch.bfloat16, "int8": "int8"}
    fused = {
        "max_grad_norm": cfg.max_grad_norm,
        # NOTE [precision policy]
        "master_weights": masters[cfg.master_weights] if cfg.precision == "bf16" else False,
        "state_dtype": states[cfg.state_dtype],
        "backend": cfg.backend,
    }
    warmup = cfg.ademamix_warmup or None  # 0: alpha and beta3 constant from the first step
    cls, kwargs = {
        "torch-adamw": (torch.optim.AdamW, {"lr": lr, "betas": betas, "eps": 1e-8}),
        "adamw": (fastopt.AdamW, {"lr": lr, "betas": betas, "eps": 1e-8, **fused}),
        "lion": (fastopt.Lion, {"lr": lr, "betas": betas, **fused}),
        "ademamix": (
            fastopt.AdEMAMix,
            {
                "lr": lr,
                "betas": (cfg.beta1, cfg.beta2, cfg.beta3),
                "alpha": cfg.alpha,
                "t_alpha": warmup,
                "t_beta3": warmup,
                "eps": 1e-8,
                **fused,
            },
        ),
    }[cfg.optimizer]
    try:
        if par.mode == "zero":  # NOTE [parallel modes]: fastopt's norm is reduced over the world
            return parallel.zero_optimizer(
                groups, cls, fused=cfg.optimizer != "torch-adamw", **kwargs
            )
        return cls(groups, **kwargs)
    except (RuntimeError, ValueError) as exc:
        raise ConfigError(str(exc).splitlines()[0]) from None


def make_scaler(cfg: TrainConfig, par: Parallel = SINGLE) -> torch.amp.GradScaler:
    """Loss scaling for fp16, disabled (a pass-through) otherwise.

    fastopt.GradScaler lets a fastopt optimizer's norm pass do the inf check
    (reduced over the shards, so every rank skips alike); torch.optim.AdamW gets
    torch's own scaler, under FSDP its ShardedGradScaler, which all-reduces the
    inf check of the local shards.
    """
    if cfg.optimizer != "torch-adamw":
        cls = fastopt.GradScaler
    elif par.mode == "fsdp":
        from torch.distributed.fsdp.sharded_grad_scaler import ShardedGradScaler as cls
    else:
        cls = torch.amp.GradScaler
    return cls(cfg.device, enabled=cfg.precision == "fp16")


def autocast(cfg: TrainConfig):
    # NOTE [precision policy]
    # fp32: no autocast. fp16: autocast to fp16 with fp32 parameters and a
    # GradScaler (fp16's range needs loss scaling). bf16 (the default on CUDA):
    # autocast to bf16, and with a fastopt optimizer the parameters themselves
    # are stored in bf16 while the optimizer keeps fp32 master weights
    # (master_weights=True), the mode SPEC §5 is built for; torch.optim.AdamW
    # has no master weights, so with --optimizer torch-adamw bf16 keeps fp32
    # parameters (torch's usual autocast recipe). RMSNorm statistics and the
    # loss are fp32 in every mode.
    if cfg.precision == "fp32":
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if cfg.precision == "bf16" else torch.float16
    return torch.autocast(device_type=cfg.device, dtype=dtype)


# ---------------------------------------------------------------------------------------------
# the run


class Run:
    """Model, optimizer, schedule, scaler, LAWA and data position of one training run."""

    def __init__(self, cfg: TrainConfig, corpus: Corpus, seed: int, par: Parallel = SINGLE) -> None:
        self.cfg = cfg
        self.corpus = corpus
        self.par = par
        self.device = cfg.device
        self.fused = cfg.optimizer != "torch-adamw"  # a fastopt optimizer
        torch.manual_seed(seed)  # the same initialisation on every rank
        random.seed(seed)
        self.model = ByteTransformer(cfg.model_config()).to(self.device)
        if cfg.precision == "bf16" and self.fused:
            self.model.to(torch.bfloat16)  # NOTE [precision policy]
        self.forward = wrap_model(cfg, self.model, par)
        self.optimizer = make_optimizer(cfg, self.model, par)
        # ZeRO: this rank's optimizer, which holds the fastopt counters and the norm
        self.local_optimizer = parallel.local_optimizer(self.optimizer)
        if par.world > 1:  # each rank its own dropout stream, after the common initialisation
            torch.manual_seed(parallel.dropout_seed(seed, par.rank))
        self.scheduler = warmup_decay(
            self.optimizer,
            warmup_steps=cfg.warmup_steps,
            total_steps=cfg.steps,
            decay=cfg.schedule,
            min_lr_ratio=cfg.min_lr_ratio,
            decay_steps=cfg.decay_steps,
        )
        self.scaler = make_scaler(cfg, par)
        self.lawa = LAWA(cfg.lawa_window) if cfg.lawa_every else None
        # batches are drawn on the CPU from their own generator: the same data order on any device
        self.generator = torch.Generator().manual_seed(seed)
        self.step = 0
        self.tokens = 0
        self.best_val = math.inf
        self.evals_since_best = 0
        self.seed = seed

    # -- what each step trains on ---------------------------------------------------------
    def seq_len_at(self, step: int) -> int:
        """Linear growth from seq_len/8 to seq_len over --seq-len-warmup steps, multiples of 8."""
        cfg = self.cfg
        if not cfg.seq_len_warmup or step >= cfg.seq_len_warmup:
            return cfg.seq_len
        lo = max(8, cfg.seq_len // 8)
        n = lo + (cfg.seq_len - lo) * step / cfg.seq_len_warmup
        return min(cfg.seq_len, max(lo, int(n) // 8 * 8))

    def micro_batches_at(self, step: int) -> int:
        """--batch-ramp: from a quarter of --accum-steps micro-batches to all over N steps."""
        cfg = self.cfg
        if not cfg.batch_ramp or step >= cfg.batch_ramp:
            return cfg.accum_steps
        frac = 0.25 + 0.75 * step / cfg.batch_ramp
        return max(1, min(cfg.accum_steps, math.ceil(cfg.accum_steps * frac)))

    def batch(self, seq_len: int) -> tuple[torch.Tensor, torch.Tensor]:
        """This rank's slice of the next global training micro-batch, on the run's device.

        NOTE [parallel hook]: every rank draws the whole batch from the same generator
        (so the data position is one state for all ranks) and keeps its own rows.
        """
        x, y = self.corpus.train_batch(self.generator, self.cfg.batch_size, seq_len)
        return self._to_device(self.par.shard(x)), self._to_device(self.par.shard(y))

    def _to_device(self, t: torch.Tensor) -> torch.Tensor:
        if self.device == "cpu":
            return t
        # from pinned host memory the copy is asynchronous: the GPU need not wait for it
        return t.pin_memory().to(self.device, non_blocking=True)

    # -- one optimizer step ---------------------------------------------------------------
    def train_step(self) -> dict:
        """One optimizer step in the order of the module docstring; returns its log record."""
        cfg, opt, scaler = self.cfg, self.optimizer, self.scaler
        n_micro, seq_len = self.micro_batches_at(self.step), self.seq_len_at(self.step)
        lr = opt.param_groups[0]["lr"]
        skipped_before = self.local_optimizer.skipped_steps if self.fused else 0
        scale_before = scaler.get_scale()
        t0 = self._clock()
        loss_sum = torch.zeros((), device=self.device)
        for i in range(n_micro):
            x, y = self.batch(seq_len)
            parallel.set_grad_sync(self.forward, self.model, self.par, i == n_micro - 1)
            with autocast(cfg):
                loss = self.forward(x, y) / n_micro  # accumulated: the gradient of the mean loss
            scaler.scale(loss).backward()
            loss_sum += loss.detach().float()
        t1 = self._clock()
        grad_norm = self._grad_norm_outside_optimizer()
        scaler.step(opt)  # fastopt: unscale, global grad norm, clip and update in one kernel
        scaler.update()
        self.scheduler.step()
        opt.zero_grad(set_to_none=True)
        t2 = self._clock()

        if grad_norm is None:
            grad_norm = self.local_optimizer.last_grad_norm
        skipped = self.fused and self.local_optimizer.skipped_steps > skipped_before
        if not self.fused or self.optimizer is not self.local_optimizer:
            # torch's scaler backs off exactly on the steps it skips; under ZeRO it, not the
            # fastopt optimizer, checks for infs (the wrapper is no fastopt optimizer)
            skipped = skipped or scaler.get_scale() < scale_before
        self.step += 1
        tokens = n_micro * cfg.batch_size * seq_len
        self.tokens += tokens
        if self.lawa is not None and self.step % cfg.lawa_every == 0:
            self.lawa.update(self.model, self.local_optimizer)
        return {
            "step": self.step,
            "loss": self.par.mean(loss_sum).item(),  # of the global batch
            "lr": float(lr),
            # a skipped step's norm is not finite (written as null); under ZeRO + fp16 the
            # local optimizer never ran on it, so its last_grad_norm would be stale
            "grad_norm": math.inf if skipped else float(grad_norm),
            "skipped": bool(skipped),
            "seq_len": seq_len,
            "micro_batches": n_micro,
            "tokens": self.tokens,
            "tokens_step": tokens,
            "step_time": t2 - t0,
            "opt_time": t2 - t1,
        }

    def _grad_norm_outside_optimizer(self) -> torch.Tensor | None:
        """The global grad norm where the optimizer will not report it, else None.

        torch.optim.AdamW has no built-in clipping, so for it the loop unscales
        and calls ``clip_grad_norm_`` (which returns the norm). A fastopt
        optimizer measures the norm only when it clips or unscales; with
        neither, it is measured here for the log.
        """
        cfg, opt = self.cfg, self.optimizer
        if self.fused and (cfg.max_grad_norm is not None or self.scaler.is_enabled()):
            return None
        if not self.fused:
            self.scaler.unscale_(opt)
            if cfg.max_grad_norm is not None:
                # ZeRO: the wrapper's groups hold every parameter (DDP made the grads whole)
                params = [p for g in opt.param_groups for p in g["params"]]
                norm = torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)
                return parallel.full_value(norm)  # FSDP: a DTensor
        grads = [p.grad for p in self.model.parameters() if p.grad is not None]
        if self.par.mode == "fsdp":  # DTensor shards: torch's total norm reduces over the mesh
            return parallel.full_value(torch.nn.utils.get_total_norm(grads))
        return torch.linalg.vector_norm(
            torch.stack([torch.linalg.vector_norm(g.float()) for g in grads])
        )

    def _clock(self) -> float:
        # NOTE [step timing]: CUDA runs asynchronously, so the step and optimizer times
        # (and the optimizer's share the progress bar shows) are only true once the
        # queue has drained: one synchronisation at each of the step's three time marks.
        if self.device == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter()

    @torch.no_grad()
    def evaluate(self) -> float:
        """Mean loss over the fixed val batches, in eval mode (no dropout).

        Distributed, each rank evaluates its slice of every val batch and the
        slices' means are averaged over the ranks.
        """
        self.model.eval()
        total = 0.0
        for x, y in self.corpus.val_batches(
            self.cfg.eval_batches, self.cfg.batch_size, self.cfg.seq_len
        ):
            x, y = self._to_device(self.par.shard(x)), self._to_device(self.par.shard(y))
            with autocast(self.cfg):
                total += self.model(x, y).item()
        self.model.train()
        if self.par.world > 1:
            total = self.par.mean(torch.tensor(total, dtype=torch.float64, device=self.device))
            total = total.item()
        return total / self.cfg.eval_batches


# ---------------------------------------------------------------------------------------------
# driver


def select_restart(
    cfg: TrainConfig, corpus: Corpus, run: Run, metrics: Metrics, progress: Progress
) -> tuple[Run, float]:
    """Random restarts: the best of ``cfg.restarts`` candidates and its val loss.

    NOTE [random restarts]: each candidate is a full Run with its own seed
    (initialisation and batch order; ``run`` is candidate 0), trained on the
    same schedule for --restart-steps; the lowest val loss continues, the
    others are dropped. The winner's steps are logged again as the main curve.
    """
    best: tuple[float, int, Run] | None = None
    for k in range(cfg.restarts):
        cand = run if k == 0 else Run(cfg, corpus, cfg.seed + k, run.par)
        while cand.step < cfg.restart_steps:
            rec = cand.train_step()
            progress.update(rec)
            metrics.log(rec | {"candidate": k})
        val = cand.evaluate()
        metrics.log({"step": cand.step, "val_loss": val, "candidate": k})
        progress.write(f"restart candidate {k} (seed {cfg.seed + k}): val loss {val:.4f}")
        progress.reset(cfg.steps)
        if best is None or val < best[0]:
            best = (val, k, cand)
    val, k, winner = best
    winner.best_val = val
    for r in metrics.records():
        if r.get("candidate") == k:
            metrics.log({key: v for key, v in r.items() if key != "candidate"})
    progress.reset(cfg.steps, done=winner.step)
    return winner, val


def train(cfg: TrainConfig) -> dict:
    """Run the configured training; returns a summary dict (printed by rank 0).

    Under torchrun (``--parallel``) every rank runs this; NOTE [parallel modes].
    """
    par = parallel.setup(cfg.parallel, cfg.device)
    finished = False
    try:
        summary = _train(cfg, par)
        finished = True
        return summary
    finally:
        parallel.teardown(par, finished)


def _train(cfg: TrainConfig, par: Parallel) -> dict:
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    say = print if par.is_main else (lambda *a, **k: None)  # one voice: rank 0
    wall0 = time.perf_counter()
    out = Path(cfg.out)
    ckpt_path = checkpoint_path(out, par)
    ckpt = load_checkpoint(ckpt_path) if cfg.resume else None
    corpus = Corpus(cfg.data)
    corpus.check_seq_len(cfg.seq_len)
    unigram = unigram_cross_entropy(corpus.train, corpus.val)
    out.mkdir(parents=True, exist_ok=True)
    say(
        f"corpus: {len(corpus.train):,} train / {len(corpus.val):,} val bytes; "
        f"byte-unigram val loss {unigram:.4f} nats ({unigram / math.log(2):.3f} bits/byte)",
        flush=True,
    )

    run = Run(cfg, corpus, cfg.seed, par)
    if ckpt is not None:
        load_run_state_dict(run, ckpt, ckpt_path)
        del ckpt
        if run.step >= cfg.steps or (cfg.patience and run.evals_since_best >= cfg.patience):
            say(f"checkpoint {ckpt_path} ended its run at step {run.step}; nothing to resume")
            return {"step": run.step, "val_loss": run.best_val, "unigram": unigram}
    n_params = sum(p.numel() for p in run.model.parameters())  # DTensors count globally
    where = f"device {cfg.device}"
    if cfg.parallel != "none":
        where += f", --parallel {cfg.parallel} over {par.world} ranks ({cfg.batch_size // par.world} sequences each)"
    say(
        f"model: {n_params:,} parameters ({cfg.n_layers} layers, d_model {cfg.d_model}); "
        f"optimizer {cfg.optimizer}, precision {cfg.precision}, {where}, "
        f"{cfg.steps} steps",
        flush=True,
    )
    metrics = Metrics(out / METRICS, run.step if cfg.resume else None, enabled=par.is_main)
    progress = Progress(cfg.progress, cfg.steps, run.step, "train", quiet=not par.is_main)
    stop_at = cfg.steps if cfg.stop_after is None else min(cfg.steps, run.step + cfg.stop_after)
    ckpt_every = cfg.ckpt_every or cfg.eval_every
    val_loss = None
    stopped_early = False
    try:
        if cfg.restarts > 1 and run.step == 0:
            run, val_loss = select_restart(cfg, corpus, run, metrics, progress)
            save_run(run, ckpt_path)

        while run.step < stop_at:
            rec = run.train_step()
            progress.update(rec)
            metrics.log(rec)
            if not math.isfinite(rec["loss"]) and not rec["skipped"]:
                raise RuntimeError(
                    f"loss became {rec['loss']} at step {run.step}; try a lower --lr"
                )
            if run.step % cfg.eval_every == 0 or run.step == cfg.steps:
                val_loss = run.evaluate()
                improved = val_loss < run.best_val
                run.best_val = min(run.best_val, val_loss)
                run.evals_since_best = 0 if improved else run.evals_since_best + 1
                metrics.log({"step": run.step, "val_loss": val_loss})
                progress.write(f"step {run.step}: val loss {val_loss:.4f} (unigram {unigram:.4f})")
                if cfg.patience and run.evals_since_best >= cfg.patience:
                    stopped_early = True
                    progress.write(f"early stop: no better val loss in {cfg.patience} evaluations")
            if run.step % ckpt_every == 0 or run.step == stop_at or stopped_early:
                save_run(run, ckpt_path)
            if stopped_early:
                break
    finally:
        progress.close()
        metrics.close()

    finished = run.step >= cfg.steps or stopped_early
    if cfg.plot and par.is_main:
        try:
            plot_curves(out / METRICS, out / CURVES, unigram)
        except ImportError:  # matplotlib is in the [train] extra
            say("(no curves.png: pip install matplotlib)", flush=True)
    wall = time.perf_counter() - wall0
    summary = {
        "step": run.step,
        "finished": finished,
        "stopped_early": stopped_early,
        "val_loss": val_loss,
        "best_val_loss": run.best_val,
        "unigram": unigram,
        "wall_time_s": round(wall, 2),
        "tokens_per_s": round(progress.tok_s or 0.0),
        "optimizer_time_fraction": round(progress.opt_frac or 0.0, 4),
    }
    state = "finished" if finished else f"stopped after step {run.step} (resume with --resume)"
    vl = "n/a" if val_loss is None else f"{val_loss:.4f}"
    say(
        f"{state}: val loss {vl} nats vs byte-unigram {unigram:.4f}; "
        f"wall time {wall:.1f} s; {summary['tokens_per_s']:,} tokens/s; "
        f"optimizer {100 * summary['optimizer_time_fraction']:.1f}% of step time; out: {out}",
        flush=True,
    )
    return summary


def main(argv: list[str] | None = None) -> int:
    """Console entry point; bad input exits non-zero with one line on stderr."""
    warnings.filterwarnings(
        "ignore", message=".*lr_scheduler.step\\(\\)` before `optimizer.step\\(\\)"
    )
    try:
        cfg = parse_args(argv)
        train(cfg)
    except (ConfigError, DataError) as exc:
        # the same on every rank (it comes from the options, the data or the checkpoint)
        if int(os.environ.get("RANK", "0")) == 0:
            print(f"fastopt-train: error: {exc}", file=sys.stderr)
        raise SystemExit(2) from None
    return 0
