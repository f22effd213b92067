"""Per-row next-token choice: each row of a batch brings its own settings, generator and history.

A ``RowChooser`` holds what one row's choice depends on: its ``GenerationConfig``, its seeded
generator, the ids it has seen (repetition penalty), the counts of the ids it generated (presence /
frequency penalties) and its n-grams (``no_repeat_ngram_size``), all updated in O(1) per token.
``choose`` runs a batch of rows, each on its own row of logits, so a row's tokens never depend on the
rows it is batched with. Order (transformers' order for the processors it shares):

    raw logits -> [logprobs] -> repetition penalty -> presence/frequency -> no-repeat n-grams
    -> banned ids (<unk>, banned_ids, ids the tokenizer cannot decode, <eod> before min_new_tokens)
    -> argmax (temperature 0) | temperature -> top-k -> top-p -> draw
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np

from cpm_infer.config import GenerationConfig
from cpm_infer.engine import sampling


@dataclass
class TokenLogprob:
    """The chosen token's log-probability and the ``N`` most likely alternatives (the model's
    distribution: before penalties and temperature)."""

    token_id: int
    token_text: str
    logprob: float
    top: list[tuple[int, str, float]] = field(default_factory=list)


class _IdSet:
    """Distinct ids in insertion order, as a growing numpy array (O(1) amortised per add)."""

    def __init__(self, vocab: int) -> None:
        self.present = np.zeros(vocab, dtype=bool)
        self._buf = np.empty(64, dtype=np.int64)
        self.size = 0

    def add(self, token: int) -> None:
        if self.present[token]:
            return
        self.present[token] = True
        if self.size == len(self._buf):
            self._buf = np.concatenate([self._buf, np.empty_like(self._buf)])
        self._buf[self.size] = token
        self.size += 1

    @property
    def ids(self) -> np.ndarray:
        return self._buf[: self.size]


class NgramBans:
    """transformers' ``no_repeat_ngram_size``: the next token may not complete an n-gram that already
    occurs in the sequence (prompt + generated). Kept incrementally: prefix (n-1 ids) -> next ids."""

    def __init__(self, n: int, ids: Sequence[int]) -> None:
        self.n = n
        self.seq: list[int] = []
        self.table: dict[tuple[int, ...], set[int]] = {}
        for token in ids:
            self.add(token)

    def add(self, token: int) -> None:
        self.seq.append(int(token))
        if len(self.seq) >= self.n:
            self.table.setdefault(tuple(self.seq[len(self.seq) - self.n : -1]), set()).add(self.seq[-1])

    def banned(self) -> list[int]:
        if len(self.seq) + 1 < self.n:
            return []
        prefix = tuple(self.seq[len(self.seq) + 1 - self.n :])
        return sorted(self.table.get(prefix, ()))


class RowChooser:
    """The choice state of one row (one sample of one prompt)."""

    def __init__(
        self,
        config: GenerationConfig,
        prompt_ids: Sequence[int],
        rng: np.random.Generator,
        *,
        vocab: int,
        banned: np.ndarray,
        eos: int,
    ) -> None:
        self.config, self.rng, self.eos, self.vocab = config, rng, eos, vocab
        self.banned = banned  # static bans of this row (sorted unique ids < vocab)
        self.generated = 0
        self.seen: _IdSet | None = None
        if config.repetition_penalty != 1.0:
            self.seen = _IdSet(vocab)
            for token in prompt_ids:
                if token < vocab:
                    self.seen.add(int(token))
        self.counts: np.ndarray | None = None
        self.counted: _IdSet | None = None
        if config.presence_penalty or config.frequency_penalty:
            self.counts, self.counted = np.zeros(vocab, dtype=np.float32), _IdSet(vocab)
        self.ngrams = NgramBans(config.no_repeat_ngram_size, prompt_ids) if config.no_repeat_ngram_size else None

    def process(self, logits: np.ndarray) -> np.ndarray:
        """The row's logits after penalties and bans, in place (``logits`` is the row's own copy)."""
        c = self.config
        if self.seen is not None:
            sampling.apply_repetition_penalty(logits, self.seen.ids, c.repetition_penalty)
        if self.counted is not None and self.counted.size:
            ids = self.counted.ids
            sampling.apply_presence_frequency(logits, ids, self.counts[ids], c.presence_penalty, c.frequency_penalty)
        if self.ngrams is not None:
            logits[self.ngrams.banned()] = -np.inf
        logits[self.banned] = -np.inf
        if self.generated < c.min_new_tokens and not c.ignore_eos:
            logits[self.eos] = -np.inf
        return logits

    def pick(self, logits: np.ndarray) -> int:
        """argmax, or one draw under temperature / top-k / top-p (from the row's generator); <eod> when every
        token is banned (the row cannot go on). ``logits`` is the row's own copy: it is overwritten."""
        c = self.config
        if c.greedy:
            token = int(np.argmax(logits))
            return token if logits[token] > -np.inf else self.eos
        top = logits.max()
        if top == -np.inf:
            return self.eos
        if c.temperature != 1.0:
            # Shift first so the largest logit stays 0: a tiny temperature then sends the others to -inf (the
            # greedy limit) instead of overflowing to inf - inf = NaN; one below float32's range acts as its
            # smallest normal.
            logits -= top
            with np.errstate(over="ignore"):
                logits /= max(np.float32(c.temperature), np.finfo(np.float32).tiny)
        token = sampling.sample_row(logits, c.top_k, c.top_p, self.rng)
        return token if token >= 0 else self.eos

    def update(self, token: int) -> None:
        """Record a token the row generated (not <eod>)."""
        self.generated += 1
        if self.seen is not None and token < self.vocab:
            self.seen.add(token)
        if self.counts is not None and token < self.vocab:
            self.counts[token] += 1
            self.counted.add(token)
        if self.ngrams is not None:
            self.ngrams.add(token)


def raw_logprobs(logits: np.ndarray, token: int, n: int) -> tuple[float, list[tuple[int, float]]]:
    """log-softmax of a raw logits row: the chosen token's value and the ``n`` largest (descending,
    ties by lower id)."""
    top = float(logits.max())
    lse = top + float(np.log(np.exp(logits - top, dtype=np.float32).sum(dtype=np.float64)))
    alternatives: list[tuple[int, float]] = []
    if n:
        n = min(n, logits.shape[-1])
        best = np.argpartition(-logits, n - 1)[:n]
        best = best[np.lexsort((best, -logits[best]))]
        alternatives = [(int(i), float(logits[i]) - lse) for i in best]
    return float(logits[token]) - lse, alternatives


def choose(
    logits: np.ndarray, rows: Sequence[RowChooser], decode: Callable[[Sequence[int]], str]
) -> tuple[list[int], list[TokenLogprob | None]]:
    """One token per row of ``logits`` (B, V); each row only sees its own logits and state."""
    tokens: list[int] = []
    infos: list[TokenLogprob | None] = []
    for raw, row in zip(logits, rows, strict=True):
        token = row.pick(row.process(np.array(raw, dtype=np.float32)))
        tokens.append(token)
        if row.config.logprobs is None:
            infos.append(None)
            continue
        logprob, top = raw_logprobs(raw.astype(np.float32, copy=False), token, row.config.logprobs)
        infos.append(TokenLogprob(token, decode([token]), logprob, [(i, decode([i]), value) for i, value in top]))
    return tokens, infos
