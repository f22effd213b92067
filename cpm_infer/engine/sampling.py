"""Next-token selection primitives: pure numpy, one row of logits (V,) at a time unless stated.

Top-k then top-p, exactly as their full-sort definitions, without sorting the vocabulary:

- top-k keeps every logit >= the k-th largest (ties with the k-th are kept, as transformers does);
  ``np.partition`` finds it in O(V).
- top-p keeps the smallest prefix of the tokens sorted by probability (descending, ties by lower id
  first, i.e. a stable sort) whose mass reaches p: token i is kept iff the mass of the tokens ahead of
  it is < p (``mass_before``).
- The draw (``sample_nucleus``) is by rejection: draw from the whole distribution (inverse CDF in id
  order: sums of 256-token chunks find the chunk, a cumulative sum inside it the token), keep the token
  if it is in the nucleus (one O(V) pass: the mass of the tokens more likely than it), else draw again.
  A kept token comes out with probability p_i / (mass of the nucleus), exactly the renormalised
  distribution, after 1 / (mass of the nucleus) <= 1/p draws on average whatever the distribution's
  shape. After 3 misses (a small p on a flat row) the nucleus is computed outright (``kept_weights``):
  ``np.partition`` halves the candidates, keeping the half where the cumulative mass crosses p
  (30000 -> 15000 -> ... -> 256, about two partitions of the row), then sorts the last 256; the
  mixture of the two stays exact. A full argsort of a 30000-token row costs ~1 ms here, the draw and
  its check ~0.1 ms.

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
_TRIES = 3  # rejection draws before the nucleus is computed outright


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
    big = np.finfo(logits.dtype).max  # a tiny penalty must not overflow to inf (inf - inf = NaN downstream)
    with np.errstate(over="ignore", divide="ignore"):  # a subnormal penalty is 0 in float32
        logits[ids] = np.clip(np.where(picked < 0, picked * penalty, picked / penalty), -big, big)


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


class Cdf:
    """Inverse-CDF draws in id order over fixed weights: chunk sums once, a 256-long cumulative sum per draw."""

    def __init__(self, weights: np.ndarray) -> None:
        self.weights = weights
        n = weights.size
        full = n - n % _CHUNK
        sums = weights[:full].reshape(-1, _CHUNK).sum(axis=1, dtype=np.float64)
        if full < n:
            sums = np.append(sums, weights[full:].sum(dtype=np.float64))
        self.cum = np.cumsum(sums)

    def draw(self, u: float) -> int:
        """The token at which the cumulative weight first exceeds ``u * total`` (never a zero weight)."""
        cum, weights = self.cum, self.weights
        target = u * cum[-1]
        chunk = min(int(np.searchsorted(cum, target, side="right")), cum.size - 1)
        start = chunk * _CHUNK
        inner = np.cumsum(weights[start : start + _CHUNK], dtype=np.float64)
        offset = target - (cum[chunk - 1] if chunk else 0.0)
        i = int(np.searchsorted(inner, offset, side="right"))
        if i >= inner.size:  # rounding between the chunk sum and its inner sums: the chunk's last token
            i = int(np.flatnonzero(weights[start : start + _CHUNK])[-1])
        return start + i


def draw(weights: np.ndarray, u: float) -> int:
    """One inverse-CDF draw over ``weights`` in id order."""
    return Cdf(weights).draw(u)


def mass_before(probs: np.ndarray, token: int) -> float:
    """The mass of the tokens ahead of ``token`` in the top-p order: more likely, or as likely with a lower
    id. ``token`` is in the nucleus of ``p`` iff this is < p."""
    pt = probs[token]
    ahead = float((probs * (probs > pt)).sum(dtype=np.float64))
    return ahead + int(np.count_nonzero(probs[:token] == pt)) * float(pt)


def sample_nucleus(probs: np.ndarray, p: float, rng: np.random.Generator) -> int:
    """One token from ``probs`` restricted to its top-p set (renormalised), by rejection (see above)."""
    cdf = Cdf(probs)
    if p >= 1.0:
        return cdf.draw(rng.random())
    for _ in range(_TRIES):
        token = cdf.draw(rng.random())
        if mass_before(probs, token) < p:
            return token
    return draw(kept_weights(probs, p), rng.random())


def candidates(logits: np.ndarray, top_k: int, top_p: float) -> tuple[np.ndarray | None, np.ndarray]:
    """What top-k then top-p keep of a row, computed outright: (ids, or None for the whole row; their
    weights, zero outside the kept set). ``logits`` (float32, the caller's own copy) is overwritten."""
    ids, probs = _top_k(logits, top_k)
    return ids, kept_weights(probs, top_p)


def _top_k(logits: np.ndarray, top_k: int) -> tuple[np.ndarray | None, np.ndarray]:
    """(ids kept by top-k or None for all, their probabilities renormalised over them), in place."""
    if 0 < top_k < logits.shape[-1]:
        ids = np.flatnonzero(logits >= top_k_threshold(logits, top_k))
        return ids, softmax_inplace(logits[ids])
    return None, softmax_inplace(logits)


def sample_row(logits: np.ndarray, top_k: int, top_p: float, rng: np.random.Generator) -> int:
    """One token from a row of (penalised, temperature-scaled) float32 logits under top-k then top-p;
    -1 when every token is banned. ``logits`` (the caller's own copy) is overwritten."""
    if logits.max() == -np.inf:
        return -1
    ids, probs = _top_k(logits, top_k)
    token = sample_nucleus(probs, top_p, rng)
    return token if ids is None else int(ids[token])


def greedy(logits: np.ndarray) -> np.ndarray:
    return np.argmax(logits, axis=-1)
