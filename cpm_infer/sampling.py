"""Next-token selection primitives: pure numpy, one row of logits (V,) at a time unless stated.

Top-k then top-p, exactly as their full-sort definitions, without sorting the vocabulary:

- top-k keeps every logit >= the k-th largest (ties with the k-th are kept, as transformers does);
  ``np.partition`` finds it in O(V).
- top-p keeps the smallest prefix of the tokens sorted by probability (descending, ties by lower id
  first, i.e. a stable sort) whose mass reaches p: token i is kept iff the mass of the tokens before it
  is < p. ``nucleus`` finds the probability ``t`` of the token where that mass is reached by selection
  on mass: ``np.partition`` splits the candidates at their median, the mass of the upper half says
  which half holds the crossing, and the search goes on in that half (30000 -> 15000 -> ... -> 256,
  about two partitions of the row in all), then sorts the last 256. Every token above ``t`` is kept,
  and of those equal to ``t`` the lowest ids while the mass before them is < p. The work is the same
  for a flat row and a peaked one; a full sort of a 30000-token row costs ~2 ms (argsort) here.
- The draw is an inverse CDF over the kept mass, in id order, from one uniform per row and step:
  sums of 256-token chunks find the chunk, a cumulative sum inside it the token.

Full-length temporaries cost here (numpy's cumsum and weighted bincount are slow paths, and every
30000-float temporary is a fresh allocation): the row is transformed in place where it can be.

Masses are summed in float64. The only difference from a full-sort implementation is the order of
those sums, which can matter only when the mass before a token equals p to within rounding.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

_SMALL = 256  # candidates sorted outright at the end of the selection
_CHUNK = 256  # tokens per chunk of the inverse-CDF draw


def softmax(logits: np.ndarray) -> np.ndarray:
    """Along the last axis, float32 in and out (a row goes through ``softmax_inplace`` on a copy, so both
    give the same bits)."""
    if logits.ndim == 1:
        return softmax_inplace(np.array(logits, dtype=np.float32))
    shifted = logits - np.max(logits, axis=-1, keepdims=True)
    exp = np.exp(shifted)
    return exp / exp.sum(axis=-1, keepdims=True)


def softmax_inplace(row: np.ndarray) -> np.ndarray:
    """The probabilities of a float32 row, computed in the row's own memory (no temporaries)."""
    np.subtract(row, row.max(), out=row)
    np.exp(row, out=row)
    row /= row.sum()
    return row


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
    """A top-p set: every token whose probability is > ``threshold``, plus ``ties[:n_ties]`` (the
    lowest ids of those equal to it). ``threshold`` -1 keeps everything."""

    threshold: float
    ties: np.ndarray
    n_ties: int


def _crossing_value(probs: np.ndarray, p: float) -> tuple[float, bool]:
    """The probability t of the token (in descending order) at which the cumulative mass reaches p, and
    whether another token may have the same probability (then the caller resolves ties by id)."""
    sub, above, pivots = probs, 0.0, []
    while sub.size > _SMALL:
        half = sub.size // 2
        part = np.partition(sub, half)  # part[half:] holds the larger half, part[half] its smallest value
        pivots.append(part[half])
        upper = float(part[half:].sum(dtype=np.float64))
        if above + upper >= p:
            sub = part[half:]
        else:
            above, sub = above + upper, part[:half]
    desc = np.sort(sub)[::-1]
    cum = above + np.cumsum(desc, dtype=np.float64)
    i = min(int(np.searchsorted(cum, p, side="left")), desc.size - 1)
    t = desc[i]
    # A value equal to t outside ``sub`` sits on the other side of a pivot equal to t.
    tie = (i > 0 and desc[i - 1] == t) or (i + 1 < desc.size and desc[i + 1] == t) or any(v == t for v in pivots)
    return float(t), bool(tie)


def nucleus(probs: np.ndarray, p: float) -> Nucleus:
    """The smallest most-likely prefix of ``probs`` (one float32 row) whose mass reaches ``p``."""
    t = np.float32(_crossing_value(probs, p)[0])
    while True:
        above = float((probs * (probs > t)).sum(dtype=np.float64))
        ties = np.flatnonzero(probs == t)
        if above >= p:  # rounding put t one value too low: the crossing is above it
            t = probs[probs > t].min()
            continue
        # the j-th tie (id order) is kept while the mass before it, above + j * t, is < p
        taken = int(np.count_nonzero(above + np.arange(ties.size) * float(t) < p))
        if taken == ties.size and above + ties.size * float(t) < p:  # rounding: t one value too high
            lower = probs[probs < t]
            if lower.size == 0:
                return Nucleus(-1.0, ties, 0)  # the whole row is short of p: keep everything
            t = lower.max()
            continue
        return Nucleus(float(t), ties, max(taken, 1))


def nucleus_mask(probs: np.ndarray, p: float) -> np.ndarray:
    """The top-p set as a boolean mask (tests; sampling uses the weights directly)."""
    return kept_weights(probs, p) > 0 if p < 1.0 else np.ones(probs.shape, dtype=bool)


def kept_weights(probs: np.ndarray, p: float) -> np.ndarray:
    """``probs`` with the tokens outside the top-p set zeroed (float32)."""
    if p >= 1.0:
        return probs
    value, tie = _crossing_value(probs, p)
    if not tie:  # a single token has probability t: the set is every token >= t
        t = np.float32(value)
        return probs * (probs >= t)
    found = nucleus(probs, p)  # ties at the crossing are taken in id order
    if found.threshold < 0:
        return probs
    weights = probs * (probs > np.float32(found.threshold))
    weights[found.ties[: found.n_ties]] = np.float32(found.threshold)
    return weights


def draw(weights: np.ndarray, u: float) -> int:
    """Inverse CDF in id order: the token at which the cumulative weight first exceeds ``u * total``."""
    n = weights.size
    full = n - n % _CHUNK
    sums = weights[:full].reshape(-1, _CHUNK).sum(axis=1, dtype=np.float64)
    if full < n:
        sums = np.append(sums, weights[full:].sum(dtype=np.float64))
    cum = np.cumsum(sums)
    target = u * cum[-1]
    chunk = min(int(np.searchsorted(cum, target, side="right")), cum.size - 1)
    start = chunk * _CHUNK
    inner = np.cumsum(weights[start : start + _CHUNK], dtype=np.float64)
    offset = target - (cum[chunk - 1] if chunk else 0.0)
    i = int(np.searchsorted(inner, offset, side="right"))
    if i >= inner.size:  # rounding between the chunk sum and its inner sums: the chunk's last token
        i = int(np.flatnonzero(weights[start : start + _CHUNK])[-1])
    return start + i


def candidates(logits: np.ndarray, top_k: int, top_p: float) -> tuple[np.ndarray | None, np.ndarray]:
    """What top-k then top-p keep of a row: (ids, or None for the whole row; their draw weights,
    zero outside the kept set). The weights are the probabilities renormalised over the top-k set.
    ``logits`` (float32, the caller's own copy) is overwritten."""
    vocab = logits.shape[-1]
    if 0 < top_k < vocab:
        ids = np.flatnonzero(logits >= top_k_threshold(logits, top_k))
        return ids, kept_weights(softmax_inplace(logits[ids]), top_p)
    return None, kept_weights(softmax_inplace(logits), top_p)


def sample_row(logits: np.ndarray, top_k: int, top_p: float, u: float) -> int:
    """One token from a row of (penalised, temperature-scaled) float32 logits under top-k then top-p;
    -1 when every token is banned. ``logits`` (the caller's own copy) is overwritten."""
    if logits.max() == -np.inf:
        return -1
    ids, weights = candidates(logits, top_k, top_p)
    token = draw(weights, u)
    return token if ids is None else int(ids[token])


def greedy(logits: np.ndarray) -> np.ndarray:
    return np.argmax(logits, axis=-1)
