"""The running batch on the host side: attention mask and positions, kept in step with the backend's
KV state through decode, select (rows leave) and merge (rows join); and, for one prompt being prefilled in pieces
(a cached prefix, chunked prefill), through extend.

Rows of one batch share the cache's sequence axis, each left-padded to its width ``W``. A join pads
the shorter side on the left once (``Backend.merge``); when rows leave, the columns that are padding
in every row left are cut off in the same ``select``, so ``W`` stays the longest row's length.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from cpm_infer.backends.base import Backend
from cpm_infer.kv import pad_left


def left_pad(prompts: Sequence[Sequence[int]], pad_id: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Left-pad prompts into (ids, attention_mask, position_ids), each (B, T) int64."""
    width = max(len(p) for p in prompts)
    ids = np.full((len(prompts), width), pad_id, dtype=np.int64)
    mask = np.zeros((len(prompts), width), dtype=np.int64)
    for row, prompt in enumerate(prompts):
        if prompt:
            ids[row, width - len(prompt) :] = prompt
            mask[row, width - len(prompt) :] = 1
    return ids, mask, position_ids_from_mask(mask)


def position_ids_from_mask(mask: np.ndarray) -> np.ndarray:
    """Positions count real tokens only (``cumsum - 1``); padded slots get 0."""
    return np.where(mask == 1, np.cumsum(mask, axis=-1) - 1, 0).astype(np.int64)


def common_padding(mask: np.ndarray) -> int:
    """Leading columns that are padding in every row."""
    filled = mask.any(axis=0)
    return int(np.argmax(filled)) if filled.any() else mask.shape[1]


@dataclass
class DecodeBatch:
    """KV state + mask (B, W) + the last position of each row (B,)."""

    state: Any
    mask: np.ndarray
    positions: np.ndarray

    @classmethod
    def prefill(cls, backend: Backend, prompts: Sequence[Sequence[int]], pad_id: int) -> tuple[np.ndarray, DecodeBatch]:
        ids, mask, pos = left_pad(prompts, pad_id)
        logits, state = backend.prefill(ids, mask, pos)
        return logits, cls(state, mask, pos[:, -1].copy())

    @classmethod
    def holding(cls, state: Any, length: int) -> DecodeBatch:
        """One row whose cache ``state`` holds ``length`` tokens, no padding (a prefix taken from the prefix cache)."""
        return cls(state, np.ones((1, length), dtype=np.int64), np.array([length - 1], dtype=np.int64))

    @property
    def size(self) -> int:
        return self.mask.shape[0]

    @property
    def width(self) -> int:
        return self.mask.shape[1]

    def decode(self, backend: Backend, tokens: Sequence[int]) -> np.ndarray:
        """Feed one token per row; returns the logits of the next one (B, V)."""
        ids = np.asarray(tokens, dtype=np.int64).reshape(-1, 1)
        self.mask = np.concatenate([self.mask, np.ones((self.size, 1), dtype=np.int64)], axis=1)
        self.positions = self.positions + 1
        logits, self.state = backend.decode(self.state, ids, self.mask, self.positions[:, None])
        return logits

    def extend(self, backend: Backend, tokens: Sequence[Sequence[int]]) -> np.ndarray:
        """Feed T >= 1 tokens to every row (``KvCacheOps.extend``); returns the logits after the last (B, V)."""
        return self._append(backend.extend, tokens)

    def extend_all(self, backend: Backend, tokens: Sequence[Sequence[int]]) -> np.ndarray:
        """``extend`` returning the logits after each new token (B, T, V) (``Verifier.extend_all``)."""
        return self._append(backend.extend_all, tokens)

    def _append(self, call: Any, tokens: Sequence[Sequence[int]]) -> np.ndarray:
        ids = np.asarray(tokens, dtype=np.int64).reshape(self.size, -1)
        self.mask = np.concatenate([self.mask, np.ones(ids.shape, dtype=np.int64)], axis=1)
        positions = self.positions[:, None] + np.arange(1, ids.shape[1] + 1, dtype=np.int64)
        logits, self.state = call(self.state, ids, self.mask, positions)
        self.positions = positions[:, -1].copy()
        return logits

    def drop_last(self, backend: Backend, count: int) -> None:
        """Forget the last ``count`` positions of every row (``KvCacheOps.crop``): a rejected speculation."""
        if count <= 0:
            return
        self.state = backend.crop(self.state, self.width - count)
        self.mask, self.positions = self.mask[:, :-count], self.positions - count

    def select(self, backend: Backend, rows: Sequence[int]) -> None:
        """Keep ``rows`` (in that order; repeats allowed) and drop the padding no kept row needs."""
        rows = np.asarray(rows, dtype=np.int64)
        mask = self.mask[rows]
        start = common_padding(mask)
        if start == 0 and np.array_equal(rows, np.arange(self.size)):
            return
        # Keyword only when needed: wrappers written against the older two-argument select keep working.
        self.state = backend.select(self.state, rows, start=start) if start else backend.select(self.state, rows)
        self.mask, self.positions = mask[:, start:], self.positions[rows]

    def merge(self, backend: Backend, other: DecodeBatch) -> None:
        """Append ``other``'s rows after this batch's (the narrower side is left-padded once)."""
        width = max(self.width, other.width)
        self.state = backend.merge(self.state, other.state)
        self.mask = np.concatenate([pad_left(self.mask, width, 1), pad_left(other.mask, width, 1)])
        self.positions = np.concatenate([self.positions, other.positions])
