"""Logits processors: one per setting that changes a row's logits, built only where it changes something
(TGI's ``utils/tokens.py``). A processor works in place on one row and is told each token the row generates
(``update``), so its state costs O(1) per token. The continuous batch keeps one set per row
(``chooser.RowChooser``); beam search builds a set from each beam's history (``beam``).

Order (transformers' order for the processors it shares), on the raw logits (beams: log-probabilities):

    repetition penalty -> presence/frequency -> no-repeat n-grams -> logit bias
    -> bans (<unk>, banned_ids, ids the tokenizer cannot decode) -> <eod> before min_new_tokens

then, when sampling, the warpers: temperature -> min_p -> typical_p, before top-k -> top-p -> draw (``chooser``).
A new setting that changes the logits adds its class to ``PROCESSORS`` (or ``WARPERS``).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

import numpy as np

from cpm_infer.config import GenerationConfig
from cpm_infer.engine import sampling
from cpm_infer.settings import MAX_BIAS


@dataclass(frozen=True)
class RowContext:
    """What processors need besides the config: the logits' width, the row's static bans, the end id."""

    vocab: int
    banned: np.ndarray  # sorted unique ids < vocab
    eos: int


class Processor(Protocol):
    def __call__(self, logits: np.ndarray) -> None: ...

    def update(self, token: int) -> None: ...


def static_bans(config: GenerationConfig, *, unk_id: int, tokenizer_vocab: int, vocab: int) -> np.ndarray:
    """<unk> (``ban_unk``), ``banned_ids`` and the embedding rows the tokenizer cannot decode."""
    banned = [unk_id] if config.ban_unk else []
    banned += [i for i in config.banned_ids if i < vocab]
    banned += range(tokenizer_vocab, vocab)
    return np.unique(np.asarray(banned, dtype=np.int64))


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


class RepetitionPenalty:
    """CTRL's penalty over the ids of the prompt and of the text so far."""

    def __init__(self, penalty: float, vocab: int, history: Sequence[int]) -> None:
        self.penalty, self.vocab, self.seen = penalty, vocab, _IdSet(vocab)
        for token in history:
            self.update(token)

    @classmethod
    def build(cls, c: GenerationConfig, prompt, generated, ctx: RowContext) -> RepetitionPenalty | None:
        return cls(c.repetition_penalty, ctx.vocab, [*prompt, *generated]) if c.repetition_penalty != 1.0 else None

    def __call__(self, logits: np.ndarray) -> None:
        sampling.apply_repetition_penalty(logits, self.seen.ids, self.penalty)

    def update(self, token: int) -> None:
        if token < self.vocab:
            self.seen.add(int(token))


class PresenceFrequency:
    """OpenAI's penalties over the generated ids: ``logit -= presence * (count > 0) + frequency * count``."""

    def __init__(self, presence: float, frequency: float, vocab: int, generated: Sequence[int]) -> None:
        self.presence, self.frequency, self.vocab = presence, frequency, vocab
        self.counts, self.counted = np.zeros(vocab, dtype=np.float32), _IdSet(vocab)
        for token in generated:
            self.update(token)

    @classmethod
    def build(cls, c: GenerationConfig, prompt, generated, ctx: RowContext) -> PresenceFrequency | None:
        if not (c.presence_penalty or c.frequency_penalty):
            return None
        return cls(c.presence_penalty, c.frequency_penalty, ctx.vocab, generated)

    def __call__(self, logits: np.ndarray) -> None:
        if self.counted.size:
            ids = self.counted.ids
            sampling.apply_presence_frequency(logits, ids, self.counts[ids], self.presence, self.frequency)

    def update(self, token: int) -> None:
        if token < self.vocab:
            self.counts[token] += 1
            self.counted.add(int(token))


class NgramBans:
    """transformers' ``no_repeat_ngram_size``: the next token may not complete an n-gram that already
    occurs in the sequence (prompt + generated). Kept incrementally: prefix (n-1 ids) -> next ids."""

    def __init__(self, n: int, ids: Sequence[int]) -> None:
        self.n = n
        self.seq: list[int] = []
        self.table: dict[tuple[int, ...], set[int]] = {}
        for token in ids:
            self.add(token)

    @classmethod
    def build(cls, c: GenerationConfig, prompt, generated, ctx: RowContext) -> NgramBans | None:
        return cls(c.no_repeat_ngram_size, [*prompt, *generated]) if c.no_repeat_ngram_size else None

    def add(self, token: int) -> None:
        self.seq.append(int(token))
        if len(self.seq) >= self.n:
            self.table.setdefault(tuple(self.seq[len(self.seq) - self.n : -1]), set()).add(self.seq[-1])

    def banned(self) -> list[int]:
        if len(self.seq) + 1 < self.n:
            return []
        prefix = tuple(self.seq[len(self.seq) + 1 - self.n :])
        return sorted(self.table.get(prefix, ()))

    def __call__(self, logits: np.ndarray) -> None:
        logits[self.banned()] = -np.inf

    update = add


class LogitBias:
    """OpenAI's ``logit_bias``: a bias added to given ids' logits; -100 bans the id outright."""

    def __init__(self, bias: Sequence[tuple[int, float]], vocab: int) -> None:
        pairs = [(i, b) for i, b in bias if i < vocab]
        self.ids = np.asarray([i for i, _ in pairs], dtype=np.int64)
        self.values = np.asarray([-np.inf if b <= -MAX_BIAS else b for _, b in pairs], dtype=np.float32)

    @classmethod
    def build(cls, c: GenerationConfig, prompt, generated, ctx: RowContext) -> LogitBias | None:
        return cls(c.logit_bias, ctx.vocab) if c.logit_bias else None

    def __call__(self, logits: np.ndarray) -> None:
        logits[self.ids] += self.values

    def update(self, token: int) -> None:
        pass


class StaticBans:
    """Ids the row may never generate (``static_bans``)."""

    def __init__(self, banned: np.ndarray) -> None:
        self.banned = banned

    @classmethod
    def build(cls, c: GenerationConfig, prompt, generated, ctx: RowContext) -> StaticBans | None:
        return cls(ctx.banned) if ctx.banned.size else None

    def __call__(self, logits: np.ndarray) -> None:
        logits[self.banned] = -np.inf

    def update(self, token: int) -> None:
        pass


class MinTokens:
    """<eod> is banned until ``min_new_tokens`` tokens were generated."""

    def __init__(self, minimum: int, eos: int, generated: int) -> None:
        self.minimum, self.eos, self.generated = minimum, eos, generated

    @classmethod
    def build(cls, c: GenerationConfig, prompt, generated, ctx: RowContext) -> MinTokens | None:
        if c.ignore_eos or len(generated) >= c.min_new_tokens:
            return None
        return cls(c.min_new_tokens, ctx.eos, len(generated))

    def __call__(self, logits: np.ndarray) -> None:
        if self.generated < self.minimum:
            logits[self.eos] = -np.inf

    def update(self, token: int) -> None:
        self.generated += 1


class Temperature:
    """Divide by the temperature. Shift first so the largest logit stays 0: a tiny temperature then sends
    the others to -inf (the greedy limit) instead of overflowing to inf - inf = NaN; one below float32's
    range acts as its smallest normal."""

    def __init__(self, temperature: float) -> None:
        self.divisor = max(np.float32(temperature), np.finfo(np.float32).tiny)

    @classmethod
    def build(cls, c: GenerationConfig) -> Temperature | None:
        return cls(c.temperature) if c.temperature != 1.0 else None

    def __call__(self, logits: np.ndarray) -> None:
        logits -= logits.max()
        with np.errstate(over="ignore"):
            logits /= self.divisor


class MinP:
    """min-p sampling: drop the tokens whose probability is below ``min_p`` times the top token's."""

    def __init__(self, min_p: float) -> None:
        self.log_min_p = math.log(min_p)

    @classmethod
    def build(cls, c: GenerationConfig) -> MinP | None:
        return cls(c.min_p) if c.min_p > 0 else None

    def __call__(self, logits: np.ndarray) -> None:
        logits[logits < logits.max() + self.log_min_p] = -np.inf


class TypicalP:
    """Locally typical sampling (Meister et al. 2022; transformers' ``TypicalLogitsWarper``): keep the tokens
    whose surprise ``-log p`` is closest to the entropy, fewest first, until their mass reaches ``typical_p``."""

    def __init__(self, mass: float) -> None:
        self.mass = mass

    @classmethod
    def build(cls, c: GenerationConfig) -> TypicalP | None:
        return cls(c.typical_p) if c.typical_p < 1.0 else None

    def __call__(self, logits: np.ndarray) -> None:
        logp = sampling.log_softmax(logits)
        p = np.exp(logp)
        with np.errstate(invalid="ignore"):  # a banned token: -inf * 0, which nansum skips
            entropy = -np.nansum(logp * p)
        shifted = np.abs(-logp - entropy)
        order = np.argsort(shifted, kind="stable")
        last = min(int((np.cumsum(p[order], dtype=np.float64) < self.mass).sum()), len(order) - 1)
        drop = shifted > shifted[order[last]]
        drop[order[0]] = False  # at least one token
        logits[drop] = -np.inf


PROCESSORS = (RepetitionPenalty, PresenceFrequency, NgramBans, LogitBias, StaticBans, MinTokens)
WARPERS = (Temperature, MinP, TypicalP)


def build(
    config: GenerationConfig, prompt: Sequence[int], generated: Sequence[int], ctx: RowContext
) -> list[Processor]:
    """The processors of a row (or a beam) whose prompt is ``prompt`` and text so far ``generated``."""
    return [p for cls in PROCESSORS if (p := cls.build(config, prompt, generated, ctx)) is not None]


def build_warpers(config: GenerationConfig) -> list:
    """The sampling warpers of a row (none for greedy rows)."""
    if config.greedy:
        return []
    return [w for cls in WARPERS if (w := cls.build(config)) is not None]


def apply(processors: Sequence[Processor], logits: np.ndarray) -> np.ndarray:
    for processor in processors:
        processor(logits)
    return logits
