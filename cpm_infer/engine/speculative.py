"""Speculative decoding's drafts: who proposes the next k tokens of a row, and how many to propose.

The engine (``cpm_infer.engine.core``) asks a draft for up to k tokens, feeds the row's last token and the
proposals to the target in one pass (``Verifier.extend_all``), accepts a prefix with ``RowChooser.verify`` (the
rejection rule of Leviathan et al. 2023: the output has exactly the target's distribution, whatever the draft) and
crops the target's cache to what was accepted. Two drafts:

- :class:`ModelDraft`: a smaller or quantized model with the target's vocabulary (the int4 sibling of the same
  checkpoint, a distilled student) on any backend with ``KvCacheOps``; it samples its proposals with the row's own
  settings (a copy of the row's processors, so penalties see the proposals before them), and keeps its own cache,
  cropped back to the row's accepted tokens before the next proposal;
- :class:`NgramDraft`: prompt lookup (Saxena 2023; transformers' ``prompt_lookup_num_tokens``): the tokens that
  followed the latest earlier occurrence of the row's last n-gram. No model, no cost; pays where outputs copy input.

:class:`Acceptance` adapts k per row from its measured acceptance and turns speculation off for a row whose
proposals keep being rejected.
"""

from __future__ import annotations

import copy
import logging
import os
import weakref
from collections.abc import Sequence
from dataclasses import dataclass, fields
from typing import Any, Protocol

import numpy as np

from cpm_infer.backends.base import Backend, supports_speculation
from cpm_infer.config import ConfigError
from cpm_infer.engine import processors as procs
from cpm_infer.engine import sampling
from cpm_infer.engine.chooser import RowChooser
from cpm_infer.settings import FIRST_K

log = logging.getLogger(__name__)

NGRAM = "ngram"


@dataclass
class Proposal:
    """Draft tokens, and the distribution each was drawn from (None: greedy, or a point mass as prompt lookup)."""

    tokens: list[int]
    q: list[np.ndarray] | None = None


class Draft(Protocol):
    name: str

    def propose(self, key: object, tokens: Sequence[int], k: int, chooser: RowChooser) -> Proposal:
        """Up to ``k`` tokens to follow ``tokens`` (the row's prompt and text so far), for the row ``key``."""
        ...

    def forget(self, key: object) -> None:
        """The row ``key`` is gone: drop what is kept for it."""
        ...

    def close(self) -> None: ...


class DraftMismatchError(ConfigError):
    """A draft model that cannot draft for this target (another vocabulary or tokenizer)."""


class ModelDraft:
    """A draft model on a backend with ``KvCacheOps`` and ``extend_all``, holding one row's cache at a time."""

    def __init__(self, backend: Backend, *, name: str = "model") -> None:
        if not supports_speculation(backend):
            raise ConfigError(
                f"the {backend.name} backend cannot draft (it has no extend/crop of its cache); "
                "use an onnxruntime artifact or a checkpoint as the draft"
            )
        self.backend, self.name = backend, name
        self.n_positions = backend.spec.n_positions
        self.step_clocks: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # see plain_step_clock
        self._key: object = None
        self._state: Any = None
        self._tokens: list[int] = []  # the tokens the draft's cache holds

    def propose(self, key: object, tokens: Sequence[int], k: int, chooser: RowChooser) -> Proposal:
        k = min(k, self.n_positions - len(tokens))
        if k <= 0:
            return Proposal([])
        logits = self._catch_up(key, tokens)
        row_procs = copy.deepcopy(chooser.processors)  # the proposals' own history, not the row's
        out, qs = [], []
        for j in range(k):
            row = procs.apply(row_procs, np.array(logits[0], dtype=np.float32))
            if chooser.config.greedy:
                token = int(np.argmax(row))
                if row[token] == -np.inf:
                    break
            else:
                q = chooser.distribution(row)
                if q is None:
                    break
                token = sampling.draw(q, chooser.rng.random())
                qs.append(q)
            if token == chooser.eos:
                out.append(token)
                break
            out.append(token)
            for processor in row_procs:
                processor.update(token)
            if j + 1 < k:
                logits = self._feed([token])
        return Proposal(out, None if chooser.config.greedy else qs)

    def forget(self, key: object) -> None:
        if key == self._key:
            self._key, self._state, self._tokens = None, None, []

    def close(self) -> None:
        self._key, self._state, self._tokens = None, None, []
        self.backend.close()

    def _catch_up(self, key: object, tokens: Sequence[int]) -> np.ndarray:
        """The draft's logits after ``tokens``: its cache cropped to the longest prefix it shares with them (the
        accepted proposals), then the rest fed in one pass."""
        if key != self._key:
            self.forget(self._key)
            self._key = key
        keep = _common_prefix(self._tokens, tokens, limit=len(tokens) - 1)
        if keep == 0:
            self._state, self._tokens = None, []
        elif keep < len(self._tokens):
            self._state = self.backend.crop(self._state, keep)
            del self._tokens[keep:]
        return self._feed(list(tokens[keep:]))

    def _feed(self, new: list[int]) -> np.ndarray:
        past = len(self._tokens)
        ids = np.asarray([new], dtype=np.int64)
        mask = np.ones((1, past + len(new)), dtype=np.int64)
        pos = np.arange(past, past + len(new), dtype=np.int64)[None, :]
        if self._state is None:
            logits, self._state = self.backend.prefill(ids, mask, pos)
        else:
            logits, self._state = self.backend.extend(self._state, ids, mask, pos)
        self._tokens.extend(new)
        return logits


def _common_prefix(a: Sequence[int], b: Sequence[int], *, limit: int) -> int:
    n = min(len(a), len(b), limit)
    if n == 0:
        return 0
    diff = np.flatnonzero(np.asarray(a[:n]) != np.asarray(b[:n]))
    return int(diff[0]) if diff.size else n


class NgramDraft:
    """Prompt lookup: the tokens after the latest earlier match of the row's last ``max_ngram`` .. 1 tokens."""

    name = NGRAM

    def __init__(self, max_ngram: int = 3, min_ngram: int = 1) -> None:
        if not 1 <= min_ngram <= max_ngram:
            raise ConfigError(f"n-gram sizes must satisfy 1 <= min <= max, got {min_ngram}..{max_ngram}")
        self.max_ngram, self.min_ngram = max_ngram, min_ngram
        self.step_clocks: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # see plain_step_clock

    def propose(self, key: object, tokens: Sequence[int], k: int, chooser: RowChooser) -> Proposal:
        return Proposal(lookup(tokens, k, self.max_ngram, self.min_ngram) if k > 0 else [])

    def forget(self, key: object) -> None:
        pass

    def close(self) -> None:
        pass


def lookup(tokens: Sequence[int], k: int, max_ngram: int = 3, min_ngram: int = 1) -> list[int]:
    """Up to ``k`` tokens that followed the latest earlier occurrence of the last n tokens (longest n first)."""
    arr = np.asarray(tokens, dtype=np.int64)
    for n in range(min(max_ngram, len(arr) - 1), min_ngram - 1, -1):
        windows = np.lib.stride_tricks.sliding_window_view(arr[:-1], n)  # every n-gram that has a successor
        hits = np.flatnonzero((windows == arr[-n:]).all(axis=1))
        if hits.size:
            start = int(hits[-1]) + n
            return arr[start : start + k].tolist()
    return []


@dataclass
class Acceptance:
    """A row's speculation, from ``k = min(FIRST_K, max_k)``: k grows by one after a round that accepted every
    proposal and shrinks by one after one that did not (transformers' heuristic schedule); speculation is off for
    the row (k = 0) once at least ``window`` proposals were made and fewer than ``min_rate`` of them accepted, or
    once its passes have emitted ``window`` tokens at no less time per token than a plain decode step takes
    (``record_time``, greedy rows): a draft that costs more than it saves is dropped, so ``--draft`` does not slow
    a greedy row down for long."""

    max_k: int
    k: int = -1  # -1: min(FIRST_K, max_k)
    min_rate: float = 0.2
    window: int = 32
    proposed: int = 0
    accepted: int = 0
    seconds: float = 0.0  # wall time of this row's speculative passes but the first (draft, verify, acceptance)
    emitted: int = 0  # tokens those passes produced
    passes: int = 0

    def __post_init__(self) -> None:
        if self.k < 0:
            self.k = min(FIRST_K, self.max_k)

    def record(self, proposed: int, accepted: int) -> None:
        self.proposed += proposed
        self.accepted += accepted
        self.k = min(self.k + 1, self.max_k) if accepted == proposed else max(self.k - 1, 1)
        if self.proposed >= self.window and self.accepted < self.min_rate * self.proposed:
            self.k = 0

    def record_time(self, seconds: float, emitted: int, plain_step_s: float | None) -> None:
        """One pass took ``seconds`` for ``emitted`` tokens; ``plain_step_s``: what one plain decode step of a
        lone row takes now (None: not known yet). The row's first pass is not counted: the draft reads the whole
        prompt in it, once per row (a long prompt would otherwise switch a good draft off)."""
        self.passes += 1
        if self.passes == 1:
            return
        self.seconds += seconds
        self.emitted += emitted
        if plain_step_s is not None and self.emitted >= self.window and self.seconds >= plain_step_s * self.emitted:
            self.k = 0


@dataclass
class StepClock:
    """Mean seconds of a plain decode step of a lone row (exponential, recent steps weigh most): what a
    speculative pass's tokens are worth. ``known`` once ``warm`` steps were seen."""

    warm: int = 2
    weight: float = 0.25
    steps: int = 0
    mean_s: float = 0.0

    def add(self, seconds: float) -> None:
        self.steps += 1
        self.mean_s = seconds if self.steps == 1 else self.mean_s + self.weight * (seconds - self.mean_s)

    @property
    def known(self) -> bool:
        return self.steps >= self.warm

    @property
    def value(self) -> float | None:
        return self.mean_s if self.known else None


def plain_step_clock(draft: Draft | None, target: Backend) -> StepClock:
    """The clock of ``target``'s plain steps that ``draft`` keeps for it, so a model is timed once, not once per engine
    (``generate`` makes one per call), and each model a draft serves (``cpm bench`` lends one to several) by its own
    steps. A new clock where the draft keeps none."""
    clocks = getattr(draft, "step_clocks", None)
    if clocks is None:
        return StepClock()
    try:
        return clocks.setdefault(target, StepClock())
    except TypeError:  # a target that cannot be weakly referenced
        return StepClock()


@dataclass
class SpeculationStats:
    """Totals over an engine's life: target verify passes, tokens proposed, accepted and emitted by them."""

    passes: int = 0
    proposed: int = 0
    accepted: int = 0
    emitted: int = 0

    def record(self, proposed: int, accepted: int, emitted: int) -> None:
        """One verify pass."""
        self.passes += 1
        self.proposed, self.accepted, self.emitted = (
            self.proposed + proposed,
            self.accepted + accepted,
            self.emitted + emitted,
        )

    def add(self, other: SpeculationStats) -> None:
        """Count ``other``'s totals in too (several engine runs of one job)."""
        for f in fields(self):
            setattr(self, f.name, getattr(self, f.name) + getattr(other, f.name))

    def reset(self) -> None:
        for f in fields(self):
            setattr(self, f.name, 0)

    @property
    def acceptance(self) -> float:
        return self.accepted / self.proposed if self.proposed else float("nan")

    @property
    def tokens_per_pass(self) -> float:
        return self.emitted / self.passes if self.passes else float("nan")


def open_draft(
    spec: str | os.PathLike[str],
    target: Backend,
    tokenizer: Any,
    *,
    backend: str = "auto",
    device: str = "cpu",
    threads: int | None = None,
) -> Draft:
    """``ngram`` (prompt lookup) or a model directory (checkpoint or artifact) that drafts for ``target``; a draft with
    another vocabulary or tokenizer is a one-line error."""
    require_verifier(target)
    if str(spec) == NGRAM:
        return NgramDraft()
    from cpm_infer.backends import load_backend
    from cpm_infer.errors import CpmError

    try:
        draft_backend, draft_tok = load_backend(backend, spec, device=device, threads=threads)
    except CpmError as exc:
        raise type(exc)(f"draft: {exc}") from exc
    try:
        check_compatible(target, tokenizer, draft_backend, draft_tok, where=str(spec))
        share_cores(target, draft_backend)
        return ModelDraft(draft_backend, name=os.path.basename(os.path.normpath(str(spec))))
    except Exception:
        draft_backend.close()
        raise


def require_verifier(target: Backend) -> None:
    """A one-line ``ConfigError`` unless ``target`` can verify a draft's proposals (``supports_speculation``)."""
    if not supports_speculation(target):
        raise ConfigError(
            f"the {target.name} backend cannot verify several tokens in one pass; speculative decoding needs "
            "an onnxruntime artifact or a checkpoint as the model"
        )


def share_cores(*backends: Backend) -> None:
    """The model and its draft take turns on the same cores: onnxruntime sessions move to one shared pool of
    threads (``OrtBackend.join_pool``); where that is not possible, runtimes whose threads spin on after a run
    (onnxruntime's per-session pools) are told to stop when it ends (``OrtBackend.quiet_threads``), so that one
    pool's spinning does not take the cores from the other's run."""
    for backend in backends:
        join = getattr(backend, "join_pool", None)
        if join is not None and join():
            continue
        quiet = getattr(backend, "quiet_threads", None)
        if quiet is not None:
            quiet()


def check_compatible(target: Backend, tokenizer: Any, draft: Backend, draft_tokenizer: Any, *, where: str) -> None:
    """The draft must share the target's vocabulary: the same logits width and the same tokenizer model."""
    if draft.spec.vocab_size != target.spec.vocab_size:
        raise DraftMismatchError(
            f"draft {where} has a vocabulary of {draft.spec.vocab_size} tokens, the target {target.spec.vocab_size}: "
            "a draft must share the target's vocabulary"
        )
    mine, theirs = _tokenizer_bytes(tokenizer), _tokenizer_bytes(draft_tokenizer)
    if mine is not None and theirs is not None and mine != theirs:
        raise DraftMismatchError(
            f"draft {where} has another tokenizer than the target: a draft must share the target's vocabulary"
        )


def _tokenizer_bytes(tokenizer: Any) -> bytes | None:
    path = getattr(tokenizer, "path", None)
    try:
        return path.read_bytes() if path is not None else None
    except OSError:
        return None
