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
