"""The reference training loop: ``python -m fastopt.train`` / ``fastopt-train``.

A small byte-level transformer (fastopt/model.py) trained on the running
interpreter's standard-library sources (or ``--data PATH``) with a fastopt
optimizer, a warm-up/decay schedule that counts applied steps, gradient
accumulation, clipping inside the optimizer, autocast mixed precision,
sequence-length warm-up, batch ramp, LAWA, random restarts, evaluation with
early stopping and checkpoints that resume bit for bit.

One optimizer step, in order (``Run.train_step``)::

    for each of n micro-batches:  loss = model(x, y) / n;  scaler.scale(loss).backward()
    optimizer.step()     unscale, global grad norm, clip and update in one kernel
                         (with fp16 through the GradScaler, which also updates its scale)
    scheduler.step();    optimizer.zero_grad(set_to_none=True)
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import math
import os
import random
import sys
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import torch

from fastopt.averaging import LAWA
from fastopt.data import Corpus, DataError, unigram_cross_entropy
from fastopt.model import ByteTransformer, ModelConfig
from fastopt.schedules import DECAYS, warmup_decay

CHECKPOINT = "ckpt.pt"
METRICS = "metrics.jsonl"
CURVES = "curves.png"


class ConfigError(ValueError):
    """Bad input; reported as one line and a non-zero exit."""


def _opt(help_text: str, **kw):
    return field(metadata={"help": help_text, **kw.pop("meta", {})}, **kw)


@dataclass
class TrainConfig:
    """Every option of the run; the command line is generated from these fields."""

    # run
    steps: int = _opt("optimizer steps of the whole run (the schedule's total_steps)", default=600)
    out: str = _opt("output folder: metrics.jsonl, curves.png, ckpt.pt", default="runs/default")
    resume: bool = _opt("continue exactly from the checkpoint in --out", default=False)
    stop_after: int | None = _opt(
        "end this invocation after K optimizer steps with a checkpoint", default=None
    )
    seed: int = _opt("seed of the initialisation and the batch order", default=0)
    data: str | None = _opt(
        "text file or folder (default: the stdlib's *.py sources)", default=None
    )
    threads: int | None = _opt("torch intra-op threads (default: torch's choice)", default=None)
    # model
    d_model: int = _opt("model width", default=128)
    n_layers: int = _opt("transformer blocks", default=4)
    n_heads: int = _opt("attention heads", default=4)
    # optimizer and schedule
    optimizer: str = _opt(
        "adamw and lion are fastopt's; torch-adamw is torch.optim.AdamW for side-by-side runs",
        default="adamw",
        meta={"choices": ("adamw", "lion", "torch-adamw")},
    )
    backend: str = _opt("fastopt backend (auto|reference|cpu|triton|cuda)", default="auto")
    lr: float | None = _opt(
        "peak learning rate (default: 2e-3 for AdamW, 3e-4 for Lion)", default=None
    )
    beta1: float = _opt("first-moment decay", default=0.9)
    beta2: float = _opt("second-moment decay (Lion: momentum decay)", default=0.95)
    weight_decay: float = _opt("decoupled weight decay of matrices (norms get none)", default=0.1)
    schedule: str = _opt("decay after warm-up", default="cosine", meta={"choices": DECAYS})
    warmup_steps: int | None = _opt("linear warm-up steps (default: 5%% of --steps)", default=None)
    decay_steps: int | None = _opt(
        "warm-up-stable-decay: decay only over the last N steps", default=None
    )
    min_lr_ratio: float = _opt("final lr as a fraction of the peak", default=0.1)
    max_grad_norm: float | None = _opt(
        "global-norm clipping inside the optimizer (0 or less: off)", default=1.0
    )
    # batches
    batch_size: int = _opt("sequences per micro-batch", default=16)
    accum_steps: int = _opt("micro-batches per optimizer step (gradient accumulation)", default=1)
    seq_len: int = _opt("sequence length in bytes", default=128)
    seq_len_warmup: int = _opt(
        "grow the sequence length from seq_len/8 to seq_len over this many steps",
        default=0,
    )
    batch_ramp: int = _opt(
        "grow micro-batches per step from a quarter of --accum-steps to all of them over N steps",
        default=0,
    )
    precision: str = _opt(
        "fp32, bf16 (autocast + bf16 params with fp32 master weights) or fp16 (autocast + GradScaler)",
        default="fp32",
        meta={"choices": ("fp32", "bf16", "fp16")},
    )
    compile: bool = _opt("torch.compile the model", default=False)
    # evaluation, averaging, restarts
    eval_every: int = _opt("evaluate on the val split every N steps (and at the end)", default=100)
    eval_batches: int = _opt("val batches per evaluation", default=16)
    patience: int = _opt(
        "stop after N evaluations without a new best val loss (0: never)", default=0
    )
    ckpt_every: int | None = _opt("checkpoint every N steps (default: at each eval)", default=None)
    lawa_every: int = _opt("every N steps replace the weights by the LAWA mean (0: off)", default=0)
    lawa_window: int = _opt("LAWA: number of latest snapshots averaged", default=5)
    restarts: int = _opt("random restart: train K candidates, keep the best (<=1: off)", default=1)
    restart_steps: int = _opt("random restart: steps each candidate trains", default=50)
    # output
    progress: bool = _opt("show a progress bar", default=True)
    plot: bool = _opt("write curves.png at the end", default=True)

    def model_config(self) -> ModelConfig:
        return ModelConfig(
            d_model=self.d_model,
            n_layers=self.n_layers,
            n_heads=self.n_heads,
            max_seq_len=self.seq_len,
        )

    def peak_lr(self) -> float:
        if self.lr is not None:
            return self.lr
        return 3e-4 if self.optimizer == "lion" else 2e-3

    def validate(self) -> None:
        positive = (
            "steps",
            "batch_size",
            "accum_steps",
            "eval_every",
            "eval_batches",
            "d_model",
            "n_layers",
            "n_heads",
            "lawa_window",
            "restart_steps",
        )
        for name in positive:
            if getattr(self, name) < 1:
                raise ConfigError(
                    f"--{name.replace('_', '-')} must be at least 1, got {getattr(self, name)}"
                )
        if self.warmup_steps is None:
            self.warmup_steps = round(0.05 * self.steps) if self.steps > 0 else 0
        non_negative = (
            "warmup_steps",
            "seq_len_warmup",
            "batch_ramp",
            "patience",
            "lawa_every",
        )
        for name in non_negative:
            if getattr(self, name) < 0:
                raise ConfigError(
                    f"--{name.replace('_', '-')} must be >= 0, got {getattr(self, name)}"
                )
        if self.seq_len < 2:
            raise ConfigError(f"--seq-len must be at least 2, got {self.seq_len}")
        if self.stop_after is not None and self.stop_after < 1:
            raise ConfigError(f"--stop-after must be at least 1, got {self.stop_after}")
        if self.ckpt_every is not None and self.ckpt_every < 1:
            raise ConfigError(f"--ckpt-every must be at least 1, got {self.ckpt_every}")
        if self.warmup_steps > self.steps:
            raise ConfigError(f"--warmup-steps {self.warmup_steps} exceeds --steps {self.steps}")
        if (
            self.decay_steps is not None
            and not 0 < self.decay_steps <= self.steps - self.warmup_steps
        ):
            raise ConfigError("--decay-steps must be in (0, steps - warmup_steps]")
        if not 0.0 <= self.min_lr_ratio <= 1.0:
            raise ConfigError(f"--min-lr-ratio must be in [0, 1], got {self.min_lr_ratio}")
        if self.peak_lr() <= 0:
            raise ConfigError(f"--lr must be positive, got {self.lr}")
        if self.batch_ramp and self.accum_steps < 4:
            raise ConfigError(
                "--batch-ramp works through the number of micro-batches: it needs --accum-steps >= 4"
            )
        if self.restarts > 1 and self.restart_steps >= self.steps:
            raise ConfigError("--restart-steps must be smaller than --steps")
        try:
            self.model_config()
        except ValueError as exc:
            raise ConfigError(str(exc)) from None


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Show defaults, except where the help already says what None means."""

    def _get_help_string(self, action: argparse.Action) -> str:
        if action.default is None or "default" in (action.help or ""):
            return action.help or ""
        return super()._get_help_string(action)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fastopt-train",
        description="Train a small byte-level transformer with a fastopt optimizer.",
        formatter_class=_HelpFormatter,
    )
    for f in dataclasses.fields(TrainConfig):
        flag = "--" + f.name.replace("_", "-")
        kwargs = {"help": f.metadata["help"], "default": f.default}
        if "choices" in f.metadata:
            kwargs["choices"] = f.metadata["choices"]
        kind = str(f.type)
        if kind == "bool":
            kwargs["action"] = argparse.BooleanOptionalAction
        elif "int" in kind:
            kwargs["type"] = int
        elif "float" in kind:
            kwargs["type"] = float
        else:
            kwargs["type"] = str
        parser.add_argument(flag, **kwargs)
    return parser


def parse_args(argv: list[str] | None) -> TrainConfig:
    args = build_parser().parse_args(argv)
    cfg = TrainConfig(**vars(args))
    if cfg.max_grad_norm is not None and cfg.max_grad_norm <= 0:
        cfg.max_grad_norm = None
    cfg.validate()
    return cfg


# ---------------------------------------------------------------------------------------------
# optimizer, precision


def _fastopt_class(name: str):
    """fastopt.AdamW / fastopt.Lion, imported lazily so this file never breaks the package import."""
    import fastopt

    cls = getattr(fastopt, {"adamw": "AdamW", "lion": "Lion"}[name], None)
    if cls is None:
        raise ConfigError(f"this fastopt install has no {name} optimizer")
    return cls


def make_optimizer(cfg: TrainConfig, model: torch.nn.Module) -> torch.optim.Optimizer:
    # weight decay on matrices (embedding, projections) only; norm gains stay free
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    groups = [
        {"params": decay, "weight_decay": cfg.weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    betas = (cfg.beta1, cfg.beta2)
    if cfg.optimizer == "torch-adamw":
        return torch.optim.AdamW(groups, lr=cfg.peak_lr(), betas=betas, eps=1e-8)
    cls = _fastopt_class(cfg.optimizer)
    try:
        return cls(
            groups,
            lr=cfg.peak_lr(),
            betas=betas,
            max_grad_norm=cfg.max_grad_norm,
            master_weights=cfg.precision == "bf16",
            backend=cfg.backend,
        )
    except (RuntimeError, ValueError) as exc:
        raise ConfigError(str(exc).splitlines()[0]) from None


def make_scaler(cfg: TrainConfig, device: str):
    """A GradScaler for fp16 (fastopt's for fastopt optimizers), None otherwise."""
    if cfg.precision != "fp16":
        return None
    if cfg.optimizer != "torch-adamw":
        import fastopt

        cls = getattr(fastopt, "GradScaler", None)
        if cls is not None:
            return cls(device)
    return torch.amp.GradScaler(device)


def autocast(cfg: TrainConfig, device: str):
    # NOTE [precision policy]
    # fp32: no autocast. fp16: autocast to fp16 with fp32 parameters and a
    # GradScaler (fp16's range needs loss scaling). bf16: autocast to bf16, and
    # with a fastopt optimizer the parameters themselves are stored in bf16
    # while the optimizer keeps fp32 master weights (master_weights=True), the
    # mode SPEC §5 is built for; torch.optim.AdamW has no master weights, so
    # with --optimizer torch-adamw bf16 keeps fp32 parameters (torch's usual
    # autocast recipe). RMSNorm statistics and the loss are fp32 in every mode.
    if cfg.precision == "fp32":
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if cfg.precision == "bf16" else torch.float16
    return torch.autocast(device_type=device, dtype=dtype)


# ---------------------------------------------------------------------------------------------
# checkpoints


def save_checkpoint(path: Path, state: dict) -> None:
    """Write ``state`` to ``path`` atomically: a crash leaves either the old or the new file.

    NOTE [atomic checkpoint]
    torch.save goes to ``path.tmp``, which is flushed and fsynced, then
    ``os.replace`` renames it over ``path`` in one step (atomic on POSIX and
    Windows within a filesystem). A crash at any point before the rename
    leaves the previous checkpoint untouched; a stale ``.tmp`` is simply
    overwritten by the next save and never read.
    """
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        torch.save(state, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    with contextlib.suppress(OSError):  # make the rename itself durable where the OS allows
        dir_fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)


def load_checkpoint(path: Path) -> dict:
    if not path.is_file():
        raise ConfigError(f"no checkpoint to resume from: {path} does not exist")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - a torn or foreign file: say which, in one line
        raise ConfigError(f"cannot read checkpoint {path}: {str(exc).splitlines()[0]}") from None


# ---------------------------------------------------------------------------------------------
# the run


class Run:
    """Model, optimizer, schedule, scaler, LAWA and data position of one training run."""

    def __init__(self, cfg: TrainConfig, corpus: Corpus, seed: int, device: str = "cpu") -> None:
        self.cfg = cfg
        self.corpus = corpus
        self.device = device
        torch.manual_seed(seed)
        random.seed(seed)
        self.model = ByteTransformer(cfg.model_config()).to(device)
        if cfg.precision == "bf16" and cfg.optimizer != "torch-adamw":
            self.model.to(torch.bfloat16)  # NOTE [precision policy]
        self.forward = torch.compile(self.model) if cfg.compile else self.model
        self.optimizer = make_optimizer(cfg, self.model)
        self.scheduler = warmup_decay(
            self.optimizer,
            warmup_steps=cfg.warmup_steps,
            total_steps=cfg.steps,
            decay=cfg.schedule,
            min_lr_ratio=cfg.min_lr_ratio,
            decay_steps=cfg.decay_steps,
        )
        self.scaler = make_scaler(cfg, device)
        self.lawa = LAWA(cfg.lawa_window) if cfg.lawa_every else None
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

    # -- one optimizer step ---------------------------------------------------------------
    def _grad_norm(self) -> torch.Tensor:
        grads = [p.grad for p in self.model.parameters() if p.grad is not None]
        return torch.linalg.vector_norm(
            torch.stack([torch.linalg.vector_norm(g.float()) for g in grads])
        )

    def train_step(self) -> dict:
        cfg, opt, scaler = self.cfg, self.optimizer, self.scaler
        n_micro = self.micro_batches_at(self.step)
        seq_len = self.seq_len_at(self.step)
        lr = opt.param_groups[0]["lr"]
        t0 = time.perf_counter()
        loss_sum = torch.zeros(())
        for _ in range(n_micro):
            x, y = self.corpus.train_batch(self.generator, cfg.batch_size, seq_len)
            with autocast(cfg, self.device):
                loss = self.forward(x.to(self.device), y.to(self.device)) / n_micro
            (scaler.scale(loss) if scaler is not None else loss).backward()
            loss_sum += loss.detach().float().cpu()
        t1 = time.perf_counter()

        skipped_before = getattr(opt, "skipped_steps", 0)
        grad_norm = None
        if cfg.optimizer == "torch-adamw":
            # torch's optimizer has no built-in clipping: unscale, then clip_grad_norm_
            if scaler is not None:
                scaler.unscale_(opt)
            params = [p for g in opt.param_groups for p in g["params"]]
            if cfg.max_grad_norm is not None:
                grad_norm = torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)
            else:
                grad_norm = self._grad_norm()
        elif cfg.max_grad_norm is None and scaler is None:
            grad_norm = self._grad_norm()  # fastopt measures the norm only when it needs it
        scale_before = scaler.get_scale() if scaler is not None else None
        if scaler is not None:
            scaler.step(opt)
            scaler.update()
        else:
            opt.step()
        if grad_norm is None:
            grad_norm = opt.last_grad_norm
        self.scheduler.step()
        opt.zero_grad(set_to_none=True)
        t2 = time.perf_counter()

        if scaler is not None and cfg.optimizer == "torch-adamw":
            skipped = scaler.get_scale() < scale_before  # torch's scaler backs off exactly on skips
        else:
            skipped = getattr(opt, "skipped_steps", 0) > skipped_before
        self.step += 1
        tokens = n_micro * cfg.batch_size * seq_len
        self.tokens += tokens
        if self.lawa is not None and self.step % cfg.lawa_every == 0:
            self.lawa.update(self.model, opt)
        return {
            "step": self.step,
            "loss": loss_sum.item(),
            "lr": float(lr),
            "grad_norm": float(grad_norm),
            "skipped": bool(skipped),
            "seq_len": seq_len,
            "micro_batches": n_micro,
            "tokens": self.tokens,
            "tokens_step": tokens,
            "step_time": t2 - t0,
            "opt_time": t2 - t1,
        }

    @torch.no_grad()
    def evaluate(self) -> float:
        self.model.eval()
        total = 0.0
        for x, y in self.corpus.val_batches(
            self.cfg.eval_batches, self.cfg.batch_size, self.cfg.seq_len
        ):
            with autocast(self.cfg, self.device):
                total += self.model(x.to(self.device), y.to(self.device)).item()
        self.model.train()
        return total / self.cfg.eval_batches

    # -- checkpoint -----------------------------------------------------------------------
    def state_dict(self) -> dict:
        return {
            "format": 1,
            "model_config": dataclasses.asdict(self.cfg.model_config()) | {"max_seq_len": None},
            "optimizer_name": self.cfg.optimizer,
            "precision": self.cfg.precision,
            "step": self.step,
            "tokens": self.tokens,
            "seed": self.seed,
            "best_val": self.best_val,
            "evals_since_best": self.evals_since_best,
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict() if self.scaler is not None else None,
            "lawa": self.lawa.state_dict() if self.lawa is not None else None,
            "data_rng": self.generator.get_state(),
            "torch_rng": torch.get_rng_state(),
            "python_rng": random.getstate(),
        }

    def load_state_dict(self, ckpt: dict, path: Path) -> None:
        want = dataclasses.asdict(self.cfg.model_config()) | {"max_seq_len": None}
        have = ckpt.get("model_config")
        if have != want:
            diff = ", ".join(
                f"{k}={have.get(k) if have else None} (this run: {want[k]})"
                for k in want
                if not have or have.get(k) != want[k]
            )
            raise ConfigError(f"checkpoint {path} is from a different model shape: {diff}")
        for key in ("optimizer_name", "precision"):
            mine = self.cfg.optimizer if key == "optimizer_name" else self.cfg.precision
            if ckpt[key] != mine:
                raise ConfigError(
                    f"checkpoint {path} was written with --{key.split('_')[0]} {ckpt[key]}, this run asks for {mine}"
                )
        self.model.load_state_dict(ckpt["model"])
        self.optimizer.load_state_dict(ckpt["optimizer"])
        self.scheduler.load_state_dict(ckpt["scheduler"])
        if self.scaler is not None:
            self.scaler.load_state_dict(ckpt["scaler"])
        if self.lawa is not None and ckpt["lawa"] is not None:
            self.lawa.load_state_dict(ckpt["lawa"])
        self.generator.set_state(ckpt["data_rng"])
        torch.set_rng_state(ckpt["torch_rng"])
        random.setstate(ckpt["python_rng"])
        self.step = ckpt["step"]
        self.tokens = ckpt["tokens"]
        self.seed = ckpt["seed"]
        self.best_val = ckpt["best_val"]
        self.evals_since_best = ckpt["evals_since_best"]


# ---------------------------------------------------------------------------------------------
# metrics and the picture


class Metrics:
    """Append-only ``metrics.jsonl``, one JSON object per optimizer step or evaluation."""

    def __init__(self, path: Path, resume_step: int | None) -> None:
        self.path = path
        if resume_step is None:
            path.write_text("")
        elif path.exists():
            # drop what was logged after the checkpoint: those steps are about to be redone
            keep = [
                line
                for line in path.read_text().splitlines()
                if line.strip() and json.loads(line).get("step", 0) <= resume_step
            ]
            path.write_text("".join(line + "\n" for line in keep))
        self.file = open(path, "a")  # noqa: SIM115 - closed in close()

    def log(self, record: dict) -> None:
        # strict JSON has no inf/nan (a skipped step's grad norm): write null instead
        clean = {
            k: None if isinstance(v, float) and not math.isfinite(v) else v
            for k, v in record.items()
        }
        self.file.write(json.dumps(clean, allow_nan=False) + "\n")
        self.file.flush()

    def close(self) -> None:
        self.file.close()


def read_metrics(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def plot_curves(metrics_path: Path, png_path: Path, unigram: float | None = None) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = read_metrics(metrics_path)
    train = [r for r in records if "loss" in r and "candidate" not in r]
    val = [r for r in records if "val_loss" in r and "candidate" not in r]
    fig, (ax_loss, ax_lr) = plt.subplots(
        2, 1, figsize=(7, 6), sharex=True, gridspec_kw={"height_ratios": [3, 1]}
    )
    steps = [r["step"] for r in train]
    ax_loss.plot(
        steps,
        [math.nan if r["loss"] is None else r["loss"] for r in train],
        lw=0.8,
        alpha=0.6,
        label="train loss",
    )
    if val:
        ax_loss.plot(
            [r["step"] for r in val],
            [r["val_loss"] for r in val],
            "o-",
            label="val loss",
        )
    if unigram is not None:
        ax_loss.axhline(unigram, color="gray", ls="--", lw=1, label=f"byte unigram ({unigram:.2f})")
    ax_loss.set_ylabel("cross-entropy (nats/byte)")
    ax_loss.legend()
    ax_loss.grid(alpha=0.3)
    ax_lr.plot(steps, [r["lr"] for r in train], color="C2")
    ax_lr.set_ylabel("lr")
    ax_lr.set_xlabel("optimizer step")
    ax_lr.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(png_path, dpi=110)
    plt.close(fig)


# ---------------------------------------------------------------------------------------------
# driver


class _Progress:
    """tqdm bar with loss, lr, tokens/s and the optimizer's share of the step time."""

    def __init__(self, enabled: bool, total: int, initial: int, desc: str) -> None:
        self.bar = None
        self.tok_s = None
        self.opt_frac = None
        if enabled:
            try:
                from tqdm import tqdm
            except ImportError:  # tqdm is in the [train] extra; train without a bar
                print("(no progress bar: pip install tqdm)", flush=True)
                return
            self.bar = tqdm(total=total, initial=initial, desc=desc, dynamic_ncols=True, leave=True)

    def update(self, rec: dict) -> None:
        # exponential moving averages so the numbers are readable while they change
        tok_s = rec["tokens_step"] / max(rec["step_time"], 1e-9)
        frac = rec["opt_time"] / max(rec["step_time"], 1e-9)
        self.tok_s = tok_s if self.tok_s is None else 0.9 * self.tok_s + 0.1 * tok_s
        self.opt_frac = frac if self.opt_frac is None else 0.9 * self.opt_frac + 0.1 * frac
        if self.bar is not None:
            self.bar.set_postfix(
                loss=f"{rec['loss']:.3f}",
                lr=f"{rec['lr']:.2e}",
                tok_s=f"{self.tok_s:,.0f}",
                opt=f"{100 * self.opt_frac:.1f}%",
                refresh=False,
            )
            self.bar.update(1)

    def write(self, msg: str) -> None:
        if self.bar is not None:
            self.bar.write(msg)
        else:
            print(msg, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def _train_until(run: Run, until: int, metrics: Metrics, progress: _Progress, extra: dict) -> None:
    """Plain steps (no eval/checkpoint) up to ``until``; used by the restart candidates."""
    while run.step < until:
        rec = run.train_step()
        progress.update(rec)
        metrics.log(rec | extra)


def train(cfg: TrainConfig) -> dict:
    """Run the configured training; returns a summary dict (also printed)."""
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    wall0 = time.perf_counter()
    device = "cpu"
    out = Path(cfg.out)
    ckpt_path = out / CHECKPOINT
    ckpt = load_checkpoint(ckpt_path) if cfg.resume else None
    corpus = Corpus(cfg.data)
    corpus.check_seq_len(cfg.seq_len)
    unigram = unigram_cross_entropy(corpus.train, corpus.val)
    out.mkdir(parents=True, exist_ok=True)
    print(
        f"corpus: {len(corpus.train):,} train / {len(corpus.val):,} val bytes; "
        f"byte-unigram val loss {unigram:.4f} nats ({unigram / math.log(2):.3f} bits/byte)",
        flush=True,
    )

    run = Run(cfg, corpus, cfg.seed, device)
    if ckpt is not None:
        run.load_state_dict(ckpt, ckpt_path)
        del ckpt
        if run.step >= cfg.steps or (cfg.patience and run.evals_since_best >= cfg.patience):
            print(f"checkpoint {ckpt_path} ended its run at step {run.step}; nothing to resume")
            return {"step": run.step, "val_loss": run.best_val, "unigram": unigram}
    n_params = sum(p.numel() for p in run.model.parameters())
    print(
        f"model: {n_params:,} parameters ({cfg.n_layers} layers, d_model {cfg.d_model}); "
        f"optimizer {cfg.optimizer}, precision {cfg.precision}, {cfg.steps} steps",
        flush=True,
    )
    metrics = Metrics(out / METRICS, run.step if cfg.resume else None)
    progress = _Progress(cfg.progress, cfg.steps, run.step, "train")
    start_step = run.step
    stop_at = cfg.steps if cfg.stop_after is None else min(cfg.steps, start_step + cfg.stop_after)
    ckpt_every = cfg.ckpt_every or cfg.eval_every
    val_loss = None
    stopped_early = False
    try:
        if cfg.restarts > 1 and run.step == 0:
            # NOTE [random restarts]: each candidate is a full Run with its own seed
            # (initialisation and batch order), trained on the same schedule for
            # --restart-steps; the lowest val loss continues, the others are dropped.
            best = None
            for k in range(cfg.restarts):
                cand = run if k == 0 else Run(cfg, corpus, cfg.seed + k, device)
                _train_until(cand, cfg.restart_steps, metrics, progress, {"candidate": k})
                v = cand.evaluate()
                metrics.log({"step": cand.step, "val_loss": v, "candidate": k})
                progress.write(f"restart candidate {k} (seed {cfg.seed + k}): val loss {v:.4f}")
                if progress.bar is not None:
                    progress.bar.reset(total=cfg.steps)
                if best is None or v < best[0]:
                    best = (v, cand)
            val_loss, run = best
            run.best_val = val_loss
            # re-log the winner's steps as the main curve
            for r in read_metrics(out / METRICS):
                if r.get("candidate") == best[1].seed - cfg.seed:
                    metrics.log({k: v for k, v in r.items() if k != "candidate"})
            if progress.bar is not None:
                progress.bar.update(run.step)
            save_checkpoint(ckpt_path, run.state_dict())

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
                save_checkpoint(ckpt_path, run.state_dict())
            if stopped_early:
                break
    finally:
        progress.close()
        metrics.close()

    finished = run.step >= cfg.steps or stopped_early
    if cfg.plot:
        try:
            plot_curves(out / METRICS, out / CURVES, unigram)
        except ImportError:  # matplotlib is in the [train] extra
            print("(no curves.png: pip install matplotlib)", flush=True)
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
    print(
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
        print(f"fastopt-train: error: {exc}", file=sys.stderr)
        raise SystemExit(2) from None
    return 0


if __name__ == "__main__":
    sys.exit(main())
