"""Held-out split, a resumable epoch sampler, and batch collation over cached windows.

The sampler is a pure function of (seed, epoch, batch index), so a resumed run regenerates the
same order and skips to its saved position: no sampler state needs saving beyond two integers.
Under data parallelism each rank takes its slice of every global batch.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from functools import lru_cache

import numpy as np

from trainer.errors import DataError
from trainer.windows import TokenCache, windows_for

IGNORE = -100  # label value the loss skips (padding)


def split_documents(n_docs: int, val_fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """(train docs, held-out docs): a seeded random ``val_fraction`` of documents, at least one when
    there are two or more documents and the fraction is positive."""
    if not 0 <= val_fraction < 1:
        raise DataError(f"val fraction must be in [0, 1), got {val_fraction}")
    order = np.random.default_rng(seed).permutation(n_docs)
    n_val = 0 if val_fraction == 0 or n_docs < 2 else max(1, round(n_docs * val_fraction))
    return sorted(order[n_val:].tolist()), sorted(order[:n_val].tolist())


def train_windows(cache: TokenCache, docs: list[int]) -> np.ndarray:
    keep = np.isin(cache.windows[:, 2], np.asarray(docs, dtype=np.int64))
    return np.asarray(cache.windows[keep])


def eval_windows(cache: TokenCache, docs: list[int]) -> np.ndarray:
    """Non-overlapping windows (stride = max_len): every held-out token is scored exactly once."""
    max_len = int(cache.meta["max_len"])
    return windows_for(np.asarray(cache.doc_offsets), max_len, max_len, docs)


@dataclass(frozen=True)
class EpochSampler:
    """Shuffled micro-batches of window indices, identical across runs with the same seed."""

    n_windows: int
    batch_size: int
    seed: int
    rank: int = 0
    world: int = 1

    @property
    def batches_per_epoch(self) -> int:
        return self.n_windows // (self.batch_size * self.world)

    def check(self) -> None:
        if self.batches_per_epoch == 0:
            raise DataError(
                f"only {self.n_windows} training window(s), fewer than one global batch of "
                f"{self.batch_size * self.world}; lower --batch-size or add data"
            )

    def batch(self, epoch: int, index: int) -> np.ndarray:
        """Micro-batch ``index`` of ``epoch`` (this rank's slice of that global batch)."""
        if not 0 <= index < self.batches_per_epoch:
            raise IndexError(f"batch {index} outside an epoch of {self.batches_per_epoch}")
        lo = index * self.batch_size * self.world + self.rank * self.batch_size
        return _order(self.n_windows, self.seed, epoch)[lo : lo + self.batch_size]


@lru_cache(maxsize=2)
def _order(n: int, seed: int, epoch: int) -> np.ndarray:
    return np.random.default_rng([seed, epoch]).permutation(n)


def collate(cache: TokenCache, windows: np.ndarray, rows: np.ndarray, pad_id: int) -> dict[str, np.ndarray]:
    """Right-padded ``input_ids``/``attention_mask``/``labels`` (int64) for the given window rows."""
    picked = windows[rows]
    width = int(picked[:, 1].max())
    ids = np.full((len(picked), width), pad_id, dtype=np.int64)
    mask = np.zeros((len(picked), width), dtype=np.int64)
    for i, (start, length, _doc) in enumerate(picked):
        ids[i, :length] = cache.tokens[start : start + length]
        mask[i, :length] = 1
    labels = np.where(mask == 1, ids, IGNORE)
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def eval_batches(windows: np.ndarray, batch_size: int, rank: int = 0, world: int = 1) -> Iterator[np.ndarray]:
    """This rank's share of the held-out windows, in order (longest first would pad less, but order
    does not matter for a sum of losses)."""
    rows = np.arange(len(windows))[rank::world]
    for lo in range(0, len(rows), batch_size):
        yield rows[lo : lo + batch_size]
