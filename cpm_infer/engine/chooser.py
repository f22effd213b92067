"""Per-row next-token choice: each row of a batch brings its own settings, generator and history.

A ``RowChooser`` holds what one row's choice depends on: its ``GenerationConfig``, its seeded
generator and its logits processors (``cpm_infer.engine.processors``), updated in O(1) per token.
``choose`` runs a batch of rows, each on its own row of logits, so a row's tokens never depend on the
rows it is batched with. Order (transformers' order for the processors it shares):

    raw logits -> [logprobs] -> the row's processors (penalties, n-gram bans, logit bias, bans)
    -> argmax (temperature 0) | temperature -> min-p -> top-k -> top-p -> draw
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np

from cpm_infer.config import GenerationConfig
from cpm_infer.engine import processors, sampling


@dataclass
class TokenLogprob:
    """The chosen token's log-probability and the ``N`` most likely alternatives (the model's
    distribution: before penalties and temperature). None: nothing predicted it (a prompt's first token)."""

    token_id: int
    token_text: str
    logprob: float | None
    top: list[tuple[int, str, float]] = field(default_factory=list)


class RowChooser:
    """The choice state of one row (one sample of one prompt): its processors and warpers
    (``cpm_infer.engine.processors``) and its seeded generator."""

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
        self.processors = processors.build(config, prompt_ids, (), processors.RowContext(vocab, banned, eos))
        self.warpers = processors.build_warpers(config)

    def process(self, logits: np.ndarray) -> np.ndarray:
        """The row's logits after penalties and bans, in place (``logits`` is the row's own copy)."""
        return processors.apply(self.processors, logits)

    def pick(self, logits: np.ndarray) -> int:
        """argmax, or one draw under temperature / min-p / top-k / top-p (from the row's generator); <eod> when
        every token is banned (the row cannot go on). ``logits`` is the row's own copy: it is overwritten."""
        c = self.config
        if c.greedy:
            token = int(np.argmax(logits))
            return token if logits[token] > -np.inf else self.eos
        if logits.max() == -np.inf:
            return self.eos
        processors.apply(self.warpers, logits)
        token = sampling.sample_row(logits, c.top_k, c.top_p, self.rng)
        return token if token >= 0 else self.eos

    def distribution(self, logits: np.ndarray) -> np.ndarray | None:
        """The distribution ``pick`` draws from for a sampled row (float64 over the vocabulary, zero outside what
        min-p / typical-p / top-k / top-p keep), or None when every token is banned. ``logits``: processed, the
        row's own copy (overwritten). Speculative decoding compares the target's and the draft's."""
        if logits.max() == -np.inf:
            return None
        processors.apply(self.warpers, logits)
        ids, weights = sampling.candidates(logits, self.config.top_k, self.config.top_p)
        weights = weights.astype(np.float64)
        weights /= weights.sum()
        if ids is None:
            return weights
        full = np.zeros(logits.shape[-1], dtype=np.float64)
        full[ids] = weights
        return full

    def verify(self, logits: np.ndarray, proposed: int | None, q: np.ndarray | None) -> tuple[int, bool]:
        """The row's token at a position where a draft proposed ``proposed`` (drawn from ``q``; None: a point
        mass or a greedy draft), and whether it is that proposal. ``logits``: the target's, processed, the row's own
        copy. Greedy rows accept while the argmax matches; sampled rows accept with probability min(1, p/q) and
        on rejection draw from max(0, p - q) renormalised, so every token has exactly the probability ``pick``
        gives it (Leviathan et al. 2023, Theorem 1). No proposal: ``pick``."""
        if proposed is None or self.config.greedy:
            token = self.pick(logits)
            return token, token == proposed
        p = self.distribution(logits)
        if p is None:
            return self.eos, False
        q_token = 1.0 if q is None else float(q[proposed])
        if self.rng.random() * q_token < p[proposed]:  # u < p/q without dividing by a tiny q
            return proposed, True
        residual = p.copy()
        if q is None:
            residual[proposed] = 0.0
        else:
            np.maximum(residual - q, 0.0, out=residual)
        if residual.sum() <= 0.0:  # p == q up to rounding: the rejection had probability ~0
            residual = p
        return sampling.draw(residual, self.rng.random()), False

    def update(self, token: int) -> None:
        """Record a token the row generated (not <eod>)."""
        for processor in self.processors:
            processor.update(token)


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


def token_info(
    raw: np.ndarray, token: int, n: int | None, decode: Callable[[Sequence[int]], str]
) -> TokenLogprob | None:
    """The chosen token's logprob and the ``n`` best from the raw logits row (None when logprobs are off)."""
    if n is None:
        return None
    logprob, top = raw_logprobs(raw.astype(np.float32, copy=False), token, n)
    return TokenLogprob(token, decode([token]), logprob, [(i, decode([i]), value) for i, value in top])


def choose(
    logits: np.ndarray, rows: Sequence[RowChooser], decode: Callable[[Sequence[int]], str]
) -> tuple[list[int], list[TokenLogprob | None]]:
    """One token per row of ``logits`` (B, V); each row only sees its own logits and state."""
    tokens: list[int] = []
    infos: list[TokenLogprob | None] = []
    for raw, row in zip(logits, rows, strict=True):
        token = row.pick(row.process(np.array(raw, dtype=np.float32)))
        tokens.append(token)
        infos.append(token_info(raw, token, row.config.logprobs, decode))
    return tokens, infos
