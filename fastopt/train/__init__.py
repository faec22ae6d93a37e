"""The reference training loop: ``python -m fastopt.train`` / ``fastopt-train``.

A small byte-level transformer trained on the running interpreter's
standard-library sources (or ``--data PATH``) with a fastopt optimizer, a
warm-up/decay schedule that counts applied steps, gradient accumulation,
clipping inside the optimizer, autocast mixed precision, sequence-length
warm-up, batch ramp, LAWA, random restarts, evaluation with early stopping
and checkpoints that resume bit for bit; data parallel under torchrun
(``--parallel ddp|fsdp|zero``). See docs/training.md.

    config.py       TrainConfig (every option), its argparse command line, validation
    model.py        ByteTransformer: RMSNorm, rotary positions, SwiGLU, tied embeddings
    data.py         Corpus: bytes, the train/val split, reproducible batches
    loop.py         Run (one optimizer step: Run.train_step), train(), main()
    checkpoint.py   atomic save/load and the state dict of a whole run (one file, or DCP shards)
    parallel.py     --parallel ddp|fsdp|zero under torchrun: process group, wrapping, batch slices
    metrics.py      metrics.jsonl, curves.png, the progress bar
"""

from fastopt.train.checkpoint import CHECKPOINT, load_checkpoint, save_checkpoint
from fastopt.train.config import ConfigError, TrainConfig, build_parser, parse_args
from fastopt.train.loop import Run, main, train
from fastopt.train.metrics import METRICS, read_metrics

__all__ = [
    "CHECKPOINT",
    "METRICS",
    "ConfigError",
    "Run",
    "TrainConfig",
    "build_parser",
    "load_checkpoint",
    "main",
    "parse_args",
    "read_metrics",
    "save_checkpoint",
    "train",
]
