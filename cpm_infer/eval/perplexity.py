"""Perplexity of a backend over a text file, with sliding windows over documents longer than the context.

Each document is scored on its own (no context crosses a document boundary). A document longer than
``window`` tokens is covered by windows ``stride`` apart (stride < window); every token is predicted exactly once, and
after the first window each prediction sees at least ``window - stride`` tokens of context (the last
window is moved back to end at the document's end, so it is full length too). A document of n tokens
adds n - 1 predictions: its first token has no context.
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from cpm_infer.backends.base import Backend
from cpm_infer.documents import Document, ReadSummary
from cpm_infer.documents import read_documents as read_with_summary
from cpm_infer.eval.logprobs import EvalError, token_logprobs
from cpm_infer.tokenizer import CpmTokenizer

Progress = Callable[[int, int], None]  # (windows done, windows in all)


@dataclass(frozen=True)
class Window:
    doc: int
    start: int  # first token fed
    end: int  # one past the last token fed
    scored_from: int  # first token whose prediction counts (>= start + 1)


@dataclass
class PerplexityResult:
    perplexity: float
    mean_nll: float  # nats per predicted token
    tokens: int  # predicted tokens
    documents: int
    windows: int
    window: int
    stride: int
    seconds: float
    tokens_per_s: float  # predicted tokens per second of scoring

    def to_dict(self) -> dict:
        return asdict(self)


def load_documents(
    path: str | os.PathLike[str], *, strict: bool = False, encoding: str | None = None
) -> tuple[list[Document], ReadSummary]:
    """The documents of an evaluation file and what reading it did (``cpm_infer.documents``): ``.jsonl``
    (``text``, or ``content`` + optional ``title``), a seed-format file, or text whose documents are
    separated by blank lines (none: the whole file is one document). Unusable parts are skipped and
    counted (``strict``: refused, naming file and line)."""
    path = Path(path)
    if not path.is_file():
        raise EvalError(f"evaluation file not found: {path}")
    return read_with_summary([path], strict=strict, encoding=encoding, blocks=True)


def read_documents(path: str | os.PathLike[str]) -> list[Document]:
    """``load_documents`` without the summary."""
    return load_documents(path)[0]


def document_ids(tokenizer: CpmTokenizer, doc: Document) -> list[int]:
    """``title <sep> content`` when titled (the CPM fine-tuning layout), else ``content``."""
    body = tokenizer.encode(doc.content)
    return [*tokenizer.encode(doc.title), tokenizer.sep_id, *body] if doc.title else body


def plan_windows(lengths: list[int], window: int, stride: int) -> list[Window]:
    """Windows covering every document; each token after a document's first is predicted once."""
    plan = []
    for doc, n in enumerate(lengths):
        if n < 2:
            continue
        end = min(n, window)
        plan.append(Window(doc, 0, end, 1))
        while end < n:
            new_end = min(end + stride, n)
            start = max(0, new_end - window)
            plan.append(Window(doc, start, new_end, end))
            end = new_end
    return plan


def perplexity(
    backend: Backend,
    tokenizer: CpmTokenizer,
    documents: list[Document],
    *,
    window: int | None = None,
    stride: int | None = None,
    batch_size: int = 1,
    min_tokens: int = 1,
    progress: Progress | None = None,
) -> PerplexityResult:
    """exp(mean next-token NLL) of ``documents`` under ``backend``; ``min_tokens`` refuses a text too
    short for the number to mean anything."""
    context = backend.spec.n_positions
    window = min(window or context, context)
    stride = stride or max(1, window // 2)
    if window < 2 or not 1 <= stride < window:
        raise EvalError(f"window {window} and stride {stride}: need window >= 2 and 1 <= stride < window")
    ids = [document_ids(tokenizer, d) for d in documents]
    predicted = sum(max(0, len(x) - 1) for x in ids)
    if predicted < max(1, min_tokens):
        need = max(1, min_tokens)
        raise EvalError(
            f"the text gives {predicted} predicted tokens; at least {need} are needed for a meaningful perplexity"
        )
    plan = plan_windows([len(x) for x in ids], window, stride)
    batches = _batches(plan, batch_size)
    nll, count, done = 0.0, 0, 0
    start_time = time.perf_counter()
    for group in batches:
        rows = np.array([ids[w.doc][w.start : w.end] for w in group], dtype=np.int64)
        logprobs = token_logprobs(backend, rows)  # (B, L-1): column j predicts token start + j + 1
        for w, row in zip(group, logprobs, strict=True):
            kept = row[w.scored_from - w.start - 1 :]
            nll -= float(kept.sum())
            count += len(kept)
        done += len(group)
        if progress:
            progress(done, len(plan))
    seconds = time.perf_counter() - start_time
    assert count == predicted, (count, predicted)  # every prediction exactly once
    mean = nll / count
    return PerplexityResult(
        perplexity=math.exp(mean),
        mean_nll=mean,
        tokens=count,
        documents=len(documents),
        windows=len(plan),
        window=window,
        stride=stride,
        seconds=seconds,
        tokens_per_s=count / seconds if seconds > 0 else float("inf"),
    )


def _batches(plan: list[Window], batch_size: int) -> list[list[Window]]:
    """Windows of equal length batched together (no padding needed), in plan order otherwise."""
    if batch_size < 1:
        raise EvalError(f"batch size must be at least 1, got {batch_size}")
    groups: dict[int, list[list[Window]]] = {}
    order: list[list[Window]] = []
    for w in plan:
        bucket = groups.setdefault(w.end - w.start, [])
        if not bucket or len(bucket[-1]) == batch_size:
            bucket.append([])
            order.append(bucket[-1])
        bucket[-1].append(w)
    return order
