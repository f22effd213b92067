"""The KL half of a quantized export's quality gate: next-token KL(float32 graph || quantized graph).

Perplexity compares two averages: a quantized graph can keep the perplexity of the float32 one and still move
the next-token distribution at every position. KL compares the distributions position by position, as the
peer measurements do (``benchmarks/peers``): the gate text's documents in non-overlapping windows of
``KL_WINDOW`` tokens, teacher forcing, every position predicted, the first ``KL_POSITIONS`` predictions in all.
The float32 graph's log-probabilities there are kept (float32, positions x vocabulary: 123 MB with CPM's 30000
tokens) while its session is open, then compared with the quantized graph's on the same windows: one session
at a time, as the perplexity gate.

Default limits (mean KL in nats, ``KL_THRESHOLDS``): log(1 + the perplexity gate's limits), so +2% and +10%
again: on text written by the float32 model, cross-entropy rises by exactly KL(float32 || quantized), the
perplexity by a factor exp(KL). They stop a broken quantization, not a recipe a user chose: on the demo model's
held-out chapter (``benchmarks/results/quant-search-intel-xeon-2c``) int8 measures 3e-5, the int4 default 1e-4
and ``--fast`` 6e-3; a random test model's int8 3e-3.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from cpm_infer.eval.logprobs import all_logits
from cpm_infer.eval.perplexity import document_ids

KL_THRESHOLDS = {"int8": 0.0198, "int4": 0.0953}  # mean next-token KL allowed by default: log 1.02, log 1.10
KL_POSITIONS = 1024  # predictions compared
KL_WINDOW = 256  # tokens per window (the model's context when shorter)


@dataclass
class KLReference:
    """The float32 graph's next-token log-probabilities on the KL windows."""

    windows: list[np.ndarray]  # token ids, one window each
    logprobs: list[np.ndarray]  # (len(window) - 1, vocab) float32 per window

    @property
    def positions(self) -> int:
        return sum(len(lp) for lp in self.logprobs)


def kl_windows(tokenizer, documents, n_positions: int, positions: int = KL_POSITIONS) -> list[np.ndarray]:
    """Non-overlapping windows over each document until ``positions`` predictions (fewer if the text is short)."""
    size = max(2, min(KL_WINDOW, n_positions))
    out, left = [], positions
    for document in documents:
        ids = np.asarray(document_ids(tokenizer, document), dtype=np.int64)
        for start in range(0, len(ids) - 1, size):
            window = ids[start : start + min(size, left + 1)]
            if len(window) < 2:
                continue
            out.append(window)
            left -= len(window) - 1
            if left <= 0:
                return out
    return out


def _log_softmax(logits: np.ndarray, rows: int = 64) -> np.ndarray:
    """float32 log-probabilities of (N, V) logits, computed in float64 ``rows`` rows at a time."""
    out = np.empty(logits.shape, dtype=np.float32)
    for start in range(0, len(logits), rows):
        part = logits[start : start + rows].astype(np.float64)
        part -= part.max(axis=-1, keepdims=True)
        part -= np.log(np.exp(part).sum(axis=-1, keepdims=True))
        out[start : start + rows] = part
    return out


def _window_logprobs(backend, window: np.ndarray) -> np.ndarray:
    ids = window[None, :]
    logits = all_logits(backend, ids, np.ones_like(ids), np.arange(len(window), dtype=np.int64)[None, :])
    return _log_softmax(logits[0, :-1])  # position t predicts token t + 1


def reference_logprobs(backend, tokenizer, documents) -> KLReference:
    """The float32 graph's side, on ``kl_windows`` of ``documents``."""
    windows = kl_windows(tokenizer, documents, backend.spec.n_positions)
    return KLReference(windows, [_window_logprobs(backend, w) for w in windows])


def mean_kl(reference: KLReference, backend) -> float:
    """Mean over the reference's positions of KL(reference || backend), nats."""
    total, count = 0.0, 0
    for window, ref in zip(reference.windows, reference.logprobs, strict=True):
        got = _window_logprobs(backend, window)
        for start in range(0, len(ref), 64):
            p = ref[start : start + 64].astype(np.float64)
            total += float((np.exp(p) * (p - got[start : start + 64])).sum())
        count += len(ref)
    return total / count if count else 0.0
