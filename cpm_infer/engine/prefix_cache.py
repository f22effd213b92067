"""The prefix cache: KV snapshots of prompts already prefilled, reused by later prompts that start alike.

After the engine prefills a prompt it hands the cache that prompt's row of the KV state; the cache keeps a copy
(``copy_rows``: one row, the prompt's positions only) keyed by the prompt's token ids. A later prompt whose longest
common prefix with a cached one is at least ``min_tokens`` long starts from a copy of that entry cut to the common
prefix and extends it with the rest of its prompt instead of prefilling all of it (``Engine``).

- Lookup: the longest common prefix over all entries, compared with numpy: O(total cached tokens), which is what a
  radix tree would save at sizes far beyond these (a few hundred entries of a few hundred tokens).
- The entries are kept prefix-free: a prompt that is a prefix of a cached one is not stored again (the longer entry
  serves every lookup it would), and storing a prompt drops the entries that are prefixes of it.
- Bounded in bytes (``Backend.nbytes`` of each snapshot as allocated), least recently used evicted first.
- Entries are never handed out: ``take`` returns a copy, so nothing the running batch does (select, merge, decode
  writing in place) touches a cached state, and evicting an entry never affects a row that started from it.

Backends without ``KvCacheOps`` (TensorRT) get no cache (``cpm_infer.backends.base.supports_kv_ops``).
Thread-safe (one lock), so one cache may serve every engine over one backend (``shared_cache``).
"""

from __future__ import annotations

import threading
import weakref
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from cpm_infer.config import ConfigError

DEFAULT_BYTES = 256 * 2**20
DEFAULT_MIN_TOKENS = 32


@dataclass
class PrefixCacheStats:
    lookups: int = 0  # prompts long enough to reuse a prefix that were looked up
    hits: int = 0  # lookups that reused one
    hit_tokens: int = 0  # prompt tokens reused (not prefilled) over all hits
    stored: int = 0  # snapshots kept
    evictions: int = 0  # entries dropped for room (least recently used first)
    entries: int = 0
    bytes: int = 0  # bytes the snapshots hold now

    def as_dict(self) -> dict[str, int]:
        return dict(vars(self))


@dataclass
class _Entry:
    tokens: np.ndarray  # int64 prompt ids
    state: Any  # one row, len(tokens) positions; never mutated, never handed out
    nbytes: int


class PrefixCache:
    """Snapshots of prefilled prompts, at most ``max_bytes`` in all; a prefix is reused from ``min_tokens`` on."""

    def __init__(self, max_bytes: int = DEFAULT_BYTES, *, min_tokens: int = DEFAULT_MIN_TOKENS) -> None:
        if max_bytes < 0 or min_tokens < 1:
            raise ConfigError(f"prefix cache: max_bytes must be >= 0, min_tokens >= 1; got {max_bytes}, {min_tokens}")
        self.max_bytes, self.min_tokens = int(max_bytes), int(min_tokens)
        self._entries: OrderedDict[bytes, _Entry] = OrderedDict()  # least recently used first
        self._stats = PrefixCacheStats()
        self._lock = threading.Lock()

    @property
    def stats(self) -> PrefixCacheStats:
        with self._lock:
            return PrefixCacheStats(**self._stats.as_dict())

    def __len__(self) -> int:
        return len(self._entries)

    def take(self, backend: Any, prompt: Sequence[int]) -> tuple[Any, int] | None:
        """A new state holding the longest cached prefix of ``prompt`` (at least ``min_tokens``, at most all but
        its last token, so that extending it gives the next token's logits) and that prefix's length; None on a
        miss. The copy has room for the rest of the prompt (``KvCacheOps.copy_rows``)."""
        if len(prompt) <= self.min_tokens or self.max_bytes == 0:
            return None
        ids = np.asarray(prompt, dtype=np.int64)
        with self._lock:
            self._stats.lookups += 1
            best, length = None, 0
            for key, entry in self._entries.items():
                common = _common_prefix(entry.tokens, ids)
                if common > length:
                    best, length = key, common
            length = min(length, len(ids) - 1)
            if best is None or length < self.min_tokens:
                return None
            entry = self._entries[best]
            self._entries.move_to_end(best)
            state = backend.copy_rows(entry.state, np.array([0]), stop=length, room=len(ids) - length)
            self._stats.hits += 1
            self._stats.hit_tokens += length
        return state, length

    def store(self, backend: Any, prompt: Sequence[int], state: Any, *, row: int = 0, start: int = 0) -> bool:
        """Keep a copy of row ``row`` of ``state``, whose positions ``start:start + len(prompt)`` hold ``prompt``
        (``start``: the row's left padding in a batch). False when not kept (too short, already covered by a
        cached prompt it begins, larger than the whole cache)."""
        if len(prompt) < self.min_tokens or self.max_bytes == 0:
            return False
        ids = np.asarray(prompt, dtype=np.int64)
        with self._lock:
            for key, entry in self._entries.items():
                if len(entry.tokens) >= len(ids) and _common_prefix(entry.tokens, ids) == len(ids):
                    self._entries.move_to_end(key)  # covered: the longer entry serves whatever this one would
                    return False
            snapshot = backend.copy_rows(state, np.array([row]), start=start, stop=start + len(ids))
            size = int(backend.nbytes(snapshot))
            if size > self.max_bytes:
                return False
            for key in [k for k, e in self._entries.items() if _common_prefix(e.tokens, ids) == len(e.tokens)]:
                self._drop(key)  # a prefix of this prompt: superseded, not evicted
            while self._entries and self._stats.bytes + size > self.max_bytes:
                self._drop(next(iter(self._entries)))
                self._stats.evictions += 1
            self._entries[ids.tobytes()] = _Entry(ids, snapshot, size)
            self._stats.bytes += size
            self._stats.stored += 1
            self._stats.entries = len(self._entries)
        return True

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()
            self._stats.bytes = self._stats.entries = 0

    def _drop(self, key: bytes) -> None:
        self._stats.bytes -= self._entries.pop(key).nbytes
        self._stats.entries = len(self._entries)


def _common_prefix(a: np.ndarray, b: np.ndarray) -> int:
    n = min(len(a), len(b))
    differ = np.flatnonzero(a[:n] != b[:n])
    return int(differ[0]) if differ.size else n


_SHARED: weakref.WeakKeyDictionary[Any, PrefixCache] = weakref.WeakKeyDictionary()
_SHARED_LOCK = threading.Lock()


def shared_cache(backend: Any) -> PrefixCache:
    """The default cache of ``backend`` (``DEFAULT_BYTES``), shared by every engine over it (``generate`` makes an
    engine per call: ``cpm batch`` reuses prefixes across its calls); it goes with the backend."""
    with _SHARED_LOCK:
        try:
            cache = _SHARED.get(backend)
            if cache is None:
                cache = _SHARED[backend] = PrefixCache()
        except TypeError:  # a backend that cannot be weakly referenced: a cache of the engine's own
            cache = PrefixCache()
        return cache
