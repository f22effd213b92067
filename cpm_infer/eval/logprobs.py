"""Log-probabilities of the next tokens under any backend, from the logits of every position."""

from __future__ import annotations

import numpy as np

from cpm_infer.backends.base import Backend, Scorer
from cpm_infer.errors import CpmError


class EvalError(CpmError):
    """Unusable evaluation input (no text, a too-short gate file, a bad template) or model."""


def log_softmax_at(logits: np.ndarray, targets: np.ndarray, *, rows: int = 64) -> np.ndarray:
    """log p(target) per row: ``logits`` (N, V) float, ``targets`` (N,) int -> (N,) float64.

    ``rows`` rows at a time: the temporaries are then a few MB, not several copies of a 1024-token
    window's logits (123 MB each with the CPM vocabulary), which would raise the quality gate's peak memory."""
    out = np.empty(len(targets), dtype=np.float64)
    for start in range(0, len(targets), rows):
        part = logits[start : start + rows].astype(np.float32, copy=False)
        peak = part.max(axis=-1, keepdims=True)
        log_norm = np.log(np.exp(part - peak).sum(axis=-1, dtype=np.float64)) + peak[:, 0]
        want = targets[start : start + rows]
        out[start : start + rows] = part[np.arange(len(want)), want].astype(np.float64) - log_norm
    return out


def all_logits(backend: Backend | Scorer, ids: np.ndarray, mask: np.ndarray, pos: np.ndarray) -> np.ndarray:
    """Logits of every position (B, T, V): one pass on a :class:`Scorer`, else by teacher forcing on a
    :class:`Backend` (prefill the first token, then decode the rest one at a time)."""
    if isinstance(backend, Scorer):
        return np.asarray(backend.logits_all(ids, mask, pos), dtype=np.float32)
    if not all(callable(getattr(backend, name, None)) for name in ("prefill", "decode")):
        raise EvalError(
            f"{getattr(backend, 'name', type(backend).__name__)} cannot score text: it has neither logits_all "
            "(Scorer) nor prefill/decode (Backend)"
        )
    seq = ids.shape[1]
    logits, state = backend.prefill(ids[:, :1], mask[:, :1], pos[:, :1])
    rows = [logits]
    for t in range(1, seq):
        logits, state = backend.decode(state, ids[:, t : t + 1], mask[:, : t + 1], pos[:, t : t + 1])
        rows.append(logits)
    return np.stack(rows, axis=1)


def token_logprobs(backend: Backend, input_ids: np.ndarray) -> np.ndarray:
    """log p(ids[:, t+1] | ids[:, :t+1]) for unpadded rows ``input_ids`` (B, T) -> (B, T-1) float64."""
    ids = np.ascontiguousarray(input_ids, dtype=np.int64)
    if ids.ndim != 2 or ids.shape[1] < 2:
        raise EvalError(f"scoring needs at least 2 tokens per row, got shape {ids.shape}")
    if ids.shape[1] > backend.spec.n_positions:
        raise EvalError(f"{ids.shape[1]} tokens exceed the model's context of {backend.spec.n_positions}")
    batch, seq = ids.shape
    mask = np.ones_like(ids)
    pos = np.broadcast_to(np.arange(seq, dtype=np.int64), (batch, seq)).copy()
    logits = all_logits(backend, ids, mask, pos)[:, :-1, :]  # position t predicts token t + 1
    flat = log_softmax_at(logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1))
    return flat.reshape(batch, seq - 1)
