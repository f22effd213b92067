"""Next-token selection as pure numpy functions over ``(batch, vocab)`` logits.

Order (as in transformers and CPM's seed script): repetition penalty -> banned ids -> temperature ->
top-k -> top-p -> sample (or argmax when greedy). Each step returns a new array; only the steps that
change something are built into a pipeline (see ``build_pipeline``).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np

from cpm_infer.config import GenerationConfig

Processor = Callable[[np.ndarray], np.ndarray]


def apply_repetition_penalty(logits: np.ndarray, seen: np.ndarray, penalty: float) -> np.ndarray:
    """CTRL-style penalty on tokens already in the context (``seen`` is a (B, V) bool mask).

    A positive logit is divided by ``penalty``, a negative one multiplied, so a penalty > 1 always
    makes a seen token less likely.
    """
    penalised = np.where(logits > 0, logits / penalty, logits * penalty)
    return np.where(seen, penalised, logits)


def ban_ids(logits: np.ndarray, ids: Sequence[int]) -> np.ndarray:
    out = logits.copy()
    out[:, list(ids)] = -np.inf
    return out


def apply_temperature(logits: np.ndarray, temperature: float) -> np.ndarray:
    return logits / temperature


def top_k_filter(logits: np.ndarray, k: int) -> np.ndarray:
    """Keep the k largest logits of each row (ties with the k-th are kept), the rest to -inf."""
    if k <= 0 or k >= logits.shape[-1]:
        return logits
    kth = np.partition(logits, -k, axis=-1)[:, -k][:, None]
    return np.where(logits < kth, -np.inf, logits)


def top_p_filter(logits: np.ndarray, p: float, candidates: int = 256) -> np.ndarray:
    """Nucleus filter: keep the smallest set of most likely tokens whose probability reaches ``p``.

    The most likely token is always kept. Only the ``candidates`` most likely tokens of each row are
    sorted (argpartition); a row whose candidates hold less than ``p`` of the mass falls back to a full
    sort, so the result is exact either way. (A full sort of a 30000-token row costs ~2 ms.)
    """
    if p >= 1.0:
        return logits
    probs = softmax(logits.astype(np.float32, copy=False))
    m = min(candidates, logits.shape[-1])
    top = (
        np.argpartition(-probs, m - 1, axis=-1)[:, :m]
        if m < logits.shape[-1]
        else np.broadcast_to(np.arange(m), probs.shape)
    )
    keep = np.zeros(logits.shape, dtype=bool)
    covered = np.take_along_axis(probs, top, axis=-1).sum(axis=-1) >= p
    for rows, index in ((np.flatnonzero(covered), top), (np.flatnonzero(~covered), None)):
        if not len(rows):
            continue
        cand = (
            index[rows]
            if index is not None
            else np.broadcast_to(np.arange(logits.shape[-1]), (len(rows), logits.shape[-1]))
        )
        cand_p = np.take_along_axis(probs[rows], cand, axis=-1)
        order = np.argsort(-cand_p, axis=-1, kind="stable")
        sorted_ids = np.take_along_axis(cand, order, axis=-1)
        sorted_p = np.take_along_axis(cand_p, order, axis=-1)
        kept = (np.cumsum(sorted_p, axis=-1) - sorted_p) < p
        kept[:, 0] = True
        for row, ids, mask in zip(rows, sorted_ids, kept, strict=True):
            keep[row, ids[mask]] = True
    return np.where(keep, logits, -np.inf)


def softmax(logits: np.ndarray) -> np.ndarray:
    shifted = logits - np.max(logits, axis=-1, keepdims=True)
    exp = np.exp(shifted)
    return exp / exp.sum(axis=-1, keepdims=True)


def greedy(logits: np.ndarray) -> np.ndarray:
    return np.argmax(logits, axis=-1)


def sample(logits: np.ndarray, rngs: Sequence[np.random.Generator]) -> np.ndarray:
    """Draw one token per row, row i from ``rngs[i]`` (one generator per sequence keeps results
    independent of how sequences are batched)."""
    probs = softmax(logits.astype(np.float32, copy=False))
    cdf = np.cumsum(probs, axis=-1, dtype=np.float64)
    # Inverse-CDF draw: one uniform per row, reproducible for a given generator state.
    u = np.array([rng.random() for rng in rngs]) * cdf[:, -1]
    chosen = (cdf <= u[:, None]).sum(axis=-1)
    return np.minimum(chosen, logits.shape[-1] - 1).astype(np.int64)


def build_pipeline(config: GenerationConfig, banned: Sequence[int]) -> list[Processor]:
    """The logits processors (after the repetition penalty) that change something for ``config``."""
    steps: list[Processor] = []
    if banned:
        ids = sorted(set(banned))
        steps.append(lambda x: ban_ids(x, ids))
    if config.greedy:
        return steps
    if config.temperature != 1.0:
        steps.append(lambda x: apply_temperature(x, config.temperature))
    if config.top_k > 0:
        steps.append(lambda x: top_k_filter(x, config.top_k))
    if config.top_p < 1.0:
        steps.append(lambda x: top_p_filter(x, config.top_p))
    return steps
