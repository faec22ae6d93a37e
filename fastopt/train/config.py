"""Every option of a training run: the ``TrainConfig`` dataclass, its command line, validation.

The command line is generated from the dataclass fields (name, type, default,
help), so an option exists in exactly one place.
"""

from __future__ import annotations

import argparse
import dataclasses
from dataclasses import dataclass, field

import torch

from fastopt.schedules import DECAYS
from fastopt.train import parallel
from fastopt.train.model import ModelConfig

DEVICES = ("auto", "cpu", "cuda")
OPTIMIZERS = ("adamw", "lion", "ademamix", "torch-adamw")
PRECISIONS = ("fp32", "bf16", "fp16")
STATE_DTYPES = ("auto", "fp32", "bf16", "int8")
MASTERS = ("fp32", "remainder", "none")


class ConfigError(ValueError):
    """Bad input; reported as one line and a non-zero exit."""


def _opt(help_text: str, **kw):
    return field(metadata={"help": help_text, **kw.pop("meta", {})}, **kw)


@dataclass
class TrainConfig:
    """Every option of the run; the command line is generated from these fields.

    ``validate`` fills in the defaults that depend on other options
    (``warmup_steps``, ``device``, ``precision``), so after it every field is concrete.
    """

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
    device: str = _opt(
        "where to train; auto: cuda when torch.cuda.is_available(), else cpu",
        default="auto",
        meta={"choices": DEVICES},
    )
    threads: int | None = _opt("torch intra-op threads (default: torch's choice)", default=None)
    parallel: str = _opt(
        "data parallelism under torchrun: ddp, fsdp (FSDP2) or zero (DDP + ZeroRedundancyOptimizer); "
        "--batch-size is the global batch, split over the ranks",
        default="none",
        meta={"choices": parallel.MODES},
    )
    # model
    d_model: int = _opt("model width", default=128)
    n_layers: int = _opt("transformer blocks", default=4)
    n_heads: int = _opt("attention heads", default=4)
    dropout: float = _opt(
        "dropout on the embeddings, attention weights and residual branches (off in eval)",
        default=0.0,
    )
    # optimizer and schedule
    optimizer: str = _opt(
        "adamw, lion and ademamix are fastopt's; torch-adamw is torch.optim.AdamW for side-by-side runs",
        default="adamw",
        meta={"choices": OPTIMIZERS},
    )
    backend: str = _opt("fastopt backend (auto|reference|cpu|triton|cuda)", default="auto")
    lr: float | None = _opt(
        "peak learning rate (default: 2e-3 for AdamW and AdEMAMix, 3e-4 for Lion)", default=None
    )
    beta1: float = _opt("first-moment decay (AdEMAMix: the fast EMA)", default=0.9)
    beta2: float = _opt("second-moment decay (Lion: momentum decay)", default=0.95)
    beta3: float = _opt("AdEMAMix: decay of the slow EMA", default=0.9999)
    alpha: float = _opt("AdEMAMix: weight of the slow EMA in the update", default=5.0)
    ademamix_warmup: int | None = _opt(
        "AdEMAMix: steps of the alpha and beta3 warm-up (t_alpha = t_beta3; default: --steps; 0: off)",
        default=None,
    )
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
    state_dtype: str = _opt(
        "storage of the moments (fastopt optimizers): auto (fp32 for fp32 params and with "
        "master weights), fp32, bf16 or int8 (8-bit blocks; SPEC §8)",
        default="auto",
        meta={"choices": STATE_DTYPES},
    )
    master_weights: str = _opt(
        "with --precision bf16: fp32 masters, remainder (bf16 param + int16 remainder, the "
        "same fp32 master in 4 fewer bytes) or none (the update runs on the bf16 params)",
        default="fp32",
        meta={"choices": MASTERS},
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
    precision: str | None = _opt(
        "fp32, bf16 (autocast + bf16 params with fp32 master weights) or fp16 (autocast + "
        "GradScaler); default: bf16 on cuda, fp32 on cpu",
        default=None,
        meta={"choices": PRECISIONS},
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
            dropout=self.dropout,
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
        if self.ademamix_warmup is None:
            self.ademamix_warmup = self.steps
        non_negative = (
            "warmup_steps",
            "seq_len_warmup",
            "batch_ramp",
            "patience",
            "lawa_every",
            "ademamix_warmup",
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
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"--dropout must be in [0, 1), got {self.dropout}")
        if self.peak_lr() <= 0:
            raise ConfigError(f"--lr must be positive, got {self.lr}")
        if self.batch_ramp and self.accum_steps < 4:
            raise ConfigError(
                "--batch-ramp works through the number of micro-batches: it needs --accum-steps >= 4"
            )
        if self.optimizer == "torch-adamw" and (
            self.state_dtype != "auto" or self.master_weights != "fp32"
        ):
            raise ConfigError(
                "--state-dtype and --master-weights are fastopt options; "
                "--optimizer torch-adamw keeps torch's own state"
            )
        if self.restarts > 1 and self.restart_steps >= self.steps:
            raise ConfigError("--restart-steps must be smaller than --steps")
        try:
            self.model_config()
        except ValueError as exc:
            raise ConfigError(str(exc)) from None
        self.device = resolve_device(self.device)
        if self.precision is None:
            self.precision = "bf16" if self.device == "cuda" else "fp32"
        if (
            self.parallel == "zero"
            and self.lawa_every
            and self.precision == "bf16"
            and self.optimizer != "torch-adamw"
        ):
            raise ConfigError(
                "--lawa-every with --parallel zero and bf16 master weights is not supported: "
                "each rank keeps the fp32 masters of its own partition only, so the ranks' "
                "snapshots would differ; use --parallel fsdp or ddp, or --precision fp32"
            )
        problem = parallel.launch_problem(self.parallel, self.batch_size)
        if problem is not None:
            raise ConfigError(problem)


def resolve_device(device: str) -> str:
    """``auto`` -> ``cuda`` when torch sees a GPU, else ``cpu``; ``cuda`` without one is an error."""
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise ConfigError(
            "--device cuda: no CUDA device is available (torch.cuda.is_available() is False); "
            "use --device cpu or --device auto"
        )
    if device not in DEVICES:
        raise ConfigError(f"--device must be one of {', '.join(DEVICES)}, got {device!r}")
    return device


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
