"""Byte-level corpus: load, split train/val deterministically, sample batches reproducibly."""

from __future__ import annotations

import math
import os
import sysconfig
from pathlib import Path

import torch

# NOTE [train/val split]
# The byte stream is cut into blocks of SPLIT_BLOCK bytes and every
# VAL_EVERY-th block goes to validation. Interleaving (rather than "the last
# 10%") keeps both splits drawn from the whole corpus, so sorted file names
# do not make validation a different distribution; the split depends only on
# the bytes, so it is the same on every run and machine. A corpus too small
# for 2 * VAL_EVERY blocks falls back to its last tenth.
SPLIT_BLOCK = 8192
VAL_EVERY = 10


class DataError(ValueError):
    """A corpus that cannot be used; the message is one line meant for the user."""


def default_corpus_files() -> list[Path]:
    """The running interpreter's top-level standard-library ``*.py`` sources, sorted."""
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    return sorted(stdlib.glob("*.py"))


def corpus_files(path: str | os.PathLike | None) -> list[Path]:
    if path is None:
        files = default_corpus_files()
        if not files:
            raise DataError("no standard-library sources found; pass --data PATH")
        return files
    p = Path(path)
    if p.is_file():
        return [p]
    if p.is_dir():
        # every regular file below it, hidden ones excluded, in a fixed order
        files = sorted(
            f
            for f in p.rglob("*")
            if f.is_file() and not any(s.startswith(".") for s in f.relative_to(p).parts)
        )
        if not files:
            raise DataError(f"data folder {str(p)!r} contains no files")
        return files
    raise DataError(f"data path {str(p)!r} does not exist")


def load_bytes(path: str | os.PathLike | None) -> bytes:
    files = corpus_files(path)
    data = b"".join(f.read_bytes() for f in files)
    if not data:
        where = "default corpus" if path is None else f"data path {str(path)!r}"
        raise DataError(f"{where} is empty")
    return data


def split(data: bytes) -> tuple[torch.Tensor, torch.Tensor]:
    """(train, val) uint8 tensors; see NOTE [train/val split]."""
    arr = torch.frombuffer(bytearray(data), dtype=torch.uint8)
    n_blocks = len(arr) // SPLIT_BLOCK
    if n_blocks < 2 * VAL_EVERY:
        cut = len(arr) - max(1, len(arr) // 10)
        return arr[:cut].clone(), arr[cut:].clone()
    blocks = torch.arange(math.ceil(len(arr) / SPLIT_BLOCK))
    is_val = (blocks % VAL_EVERY) == VAL_EVERY - 1
    mask = is_val.repeat_interleave(SPLIT_BLOCK)[: len(arr)]
    return arr[~mask].clone(), arr[mask].clone()


def unigram_cross_entropy(train: torch.Tensor, val: torch.Tensor) -> float:
    """Cross-entropy (nats/byte) on ``val`` of the byte-frequency model fitted on ``train``.

    Add-one smoothing so a byte unseen in training does not cost infinity.
    """
    counts = torch.bincount(train.long(), minlength=256).double() + 1.0
    logp = (counts / counts.sum()).log()
    val_counts = torch.bincount(val.long(), minlength=256).double()
    return float(-(val_counts * logp).sum() / val_counts.sum())


class Corpus:
    """Train/val byte tensors; batches are drawn with a caller's ``torch.Generator``.

    The generator's state is the data position: saving and restoring it
    resumes the exact sequence of batches.
    """

    def __init__(self, path: str | os.PathLike | None) -> None:
        self.path = path
        self.train, self.val = split(load_bytes(path))

    def check_seq_len(self, seq_len: int) -> None:
        for name, part in (("train", self.train), ("val", self.val)):
            if len(part) < seq_len + 1:
                raise DataError(
                    f"the {name} split has {len(part)} bytes, fewer than --seq-len + 1 = {seq_len + 1}"
                )

    def train_batch(
        self, generator: torch.Generator, batch_size: int, seq_len: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Random windows of the train split: inputs and next-byte targets, int64 (B, T)."""
        starts = torch.randint(0, len(self.train) - seq_len, (batch_size,), generator=generator)
        return self._windows(self.train, starts, seq_len)

    def val_batches(self, n_batches: int, batch_size: int, seq_len: int):
        """A fixed set of windows spread evenly over the val split (the same every eval)."""
        n = n_batches * batch_size
        starts = torch.linspace(0, len(self.val) - seq_len - 1, n).long()
        for i in range(n_batches):
            yield self._windows(self.val, starts[i * batch_size : (i + 1) * batch_size], seq_len)

    @staticmethod
    def _windows(part: torch.Tensor, starts: torch.Tensor, seq_len: int):
        idx = starts[:, None] + torch.arange(seq_len + 1)
        chunk = part[idx].long()
        return chunk[:, :-1], chunk[:, 1:]
