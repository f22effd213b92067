"""Next-token selection primitives: pure numpy, one row of logits (V,) at a time unless stated.

Top-k then top-p, exactly as their full-sort definitions, without sorting the vocabulary:

- top-k keeps every logit >= the k-th largest (ties with the k-th are kept, as transformers does);
  ``np.partition`` finds it in O(V).
- top-p keeps the smallest prefix of the tokens sorted by probability (descending, ties by lower id
  first, i.e. a stable sort) whose mass reaches p: token i is kept iff the mass of the tokens before it
  is < p. ``nucleus`` finds that prefix by radix select on the probabilities' float32 bit patterns
  (for non-negative floats the int32 view orders like the values): a histogram of the mass per high
  digit (``np.bincount(weights=...)``) finds the digit where the cumulative mass crosses p, and only
  that digit's tokens go on to the next digit; after three digits the tokens left have one exact
  probability and are taken in id order. O(V) for any shape of distribution (the full sort costs
  ~2 ms per 30000-token row, the histogram pass a few tens of microseconds).
- The draw is an inverse CDF over the kept mass, in id order, from one uniform per row and step.

The only difference from a full-sort implementation is the order in which floating-point masses are
summed, which can matter only when the mass before a token equals p to within rounding.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

# Radix digits of a float32's bits (sign bit 0 for probabilities): 11 + 10 + 10 bits.
_DIGITS = ((20, 11), (10, 10), (0, 10))


def softmax(logits: np.ndarray) -> np.ndarray:
    """Along the last axis, float32 in and out."""
    shifted = logits - np.max(logits, axis=-1, keepdims=True)
    exp = np.exp(shifted)
    return exp / exp.sum(axis=-1, keepdims=True)


def log_softmax(logits: np.ndarray) -> np.ndarray:
    top = np.max(logits, axis=-1, keepdims=True)
    shifted = logits - top
    return shifted - np.log(np.exp(shifted).sum(axis=-1, keepdims=True))


def apply_repetition_penalty(logits: np.ndarray, ids: np.ndarray, penalty: float) -> None:
    """CTRL-style penalty, in place, on the ids of a row (its prompt + generated tokens, unique).

    A positive logit is divided by ``penalty``, a negative one multiplied, so a penalty > 1 always
    makes a seen token less likely (transformers' ``RepetitionPenaltyLogitsProcessor``).
    """
    picked = logits[ids]
    logits[ids] = np.where(picked < 0, picked * penalty, picked / penalty)


def apply_presence_frequency(
    logits: np.ndarray, ids: np.ndarray, counts: np.ndarray, presence: float, frequency: float
) -> None:
    """OpenAI's penalties, in place: ``logit -= presence * (count > 0) + frequency * count`` for the
    generated ``ids`` (unique) that occurred ``counts`` times."""
    logits[ids] -= (presence + frequency * counts).astype(logits.dtype)


def top_k_threshold(logits: np.ndarray, k: int) -> float:
    """The k-th largest logit of a row (keep ``logits >= threshold``)."""
    return float(np.partition(logits, logits.shape[-1] - k)[logits.shape[-1] - k])


class Nucleus(NamedTuple):
    """A top-p set: every token whose probability bits are > ``key``, plus ``ties[:n_ties]`` (the
    lowest ids of those whose bits equal ``key``)."""

    key: int
    ties: np.ndarray
    n_ties: int


def nucleus(probs: np.ndarray, p: float) -> Nucleus:
    """The smallest most-likely prefix of ``probs`` (one float32 row) whose mass reaches ``p``."""
    keys = probs.view(np.int32)
    idx: np.ndarray | None = None  # ids still in play (None: all)
    sub_keys, sub_probs = keys, probs
    before = 0.0  # mass of the tokens certainly kept (all above the current subset)
    for shift, width in _DIGITS:
        size = 1 << width
        digits = (sub_keys >> shift) & (size - 1)
        mass = np.bincount(digits, weights=sub_probs, minlength=size)[::-1]  # top digit first
        cum = before + np.cumsum(mass)
        r = int(np.searchsorted(cum, p, side="left"))  # first digit (from the top) where the mass reaches p
        if r == size:  # the whole subset falls short of p (p ~ 1, or rounding): keep all of it
            low = int(sub_keys.min()) - 1 if sub_keys.size else -1
            return Nucleus(low if idx is not None else -1, np.empty(0, np.int64), 0)
        before = float(cum[r - 1]) if r else before
        chosen = np.flatnonzero(digits == size - 1 - r)
        idx = chosen if idx is None else idx[chosen]
        sub_keys, sub_probs = keys[idx], probs[idx]
    # Every token left has the same probability w: take them in id order while the mass before < p.
    w = float(sub_probs[0])
    if w > 0:
        taken = int(np.count_nonzero(before + np.arange(len(idx)) * w < p))
    else:
        taken = len(idx)
    return Nucleus(int(sub_keys[0]), idx, max(taken, 1))


def nucleus_mask(probs: np.ndarray, p: float) -> np.ndarray:
    """The top-p set as a boolean mask (tests, logging; sampling uses ``nucleus`` directly)."""
    if p >= 1.0:
        return np.ones(probs.shape, dtype=bool)
    found = nucleus(probs, p)
    keep = probs.view(np.int32) > found.key
    keep[found.ties[: found.n_ties]] = True
    return keep


def kept_weights(probs: np.ndarray, p: float) -> np.ndarray:
    """``probs`` with the tokens outside the top-p set zeroed (float32)."""
    if p >= 1.0:
        return probs
    found = nucleus(probs, p)
    weights = np.where(probs.view(np.int32) > found.key, probs, np.float32(0))
    ties = found.ties[: found.n_ties]
    weights[ties] = probs[ties]
    return weights


def draw(weights: np.ndarray, u: float) -> int:
    """Inverse CDF in id order: the token whose cumulative weight first exceeds ``u * total``."""
    cdf = np.cumsum(weights, dtype=np.float64)
    return min(int(np.searchsorted(cdf, u * cdf[-1], side="right")), len(weights) - 1)


def candidates(logits: np.ndarray, top_k: int, top_p: float) -> tuple[np.ndarray | None, np.ndarray]:
    """What top-k then top-p keep of a row: (ids, or None for the whole row; their draw weights,
    zero outside the kept set). The weights are the probabilities renormalised over the top-k set."""
    vocab = logits.shape[-1]
    if 0 < top_k < vocab:
        ids = np.flatnonzero(logits >= top_k_threshold(logits, top_k))
        return ids, kept_weights(softmax(logits[ids]), top_p)
    return None, kept_weights(softmax(logits), top_p)


def sample_row(logits: np.ndarray, top_k: int, top_p: float, u: float) -> int:
    """One token from a row of (penalised, temperature-scaled) logits under top-k then top-p."""
    ids, weights = candidates(logits, top_k, top_p)
    token = draw(weights, u)
    return token if ids is None else int(ids[token])


def greedy(logits: np.ndarray) -> np.ndarray:
    return np.argmax(logits, axis=-1)
