"""The generation engine: one running batch over any ``Backend``, rows joining and leaving at every step.

Pure Python + numpy; never imports a runtime. Cut like gpt-fast: a step is ``_drop_cancelled`` ->
``_decode_running`` (one token for each running row) -> ``_admit`` (newcomers become prefill jobs, one per
distinct prompt) -> ``_prefill_step`` (each job feeds its prompt, or its next chunk; finished jobs give their
rows' first tokens and ``merge`` into the running batch); ``_advance`` is the per-token bookkeeping (stop
checks, text, events). Each row has its own settings, seeded generator and penalty state
(``cpm_infer.engine.chooser``) and reads only its own row of logits, so its tokens do not depend on what it is
batched with.

Where the backend has ``KvCacheOps`` (torch, onnxruntime), two more things happen in ``_prefill_step``:

- prefix cache (``cpm_infer.engine.prefix_cache``): a prompt starts from a copy of the longest cached prefix
  and extends it with the rest; every prefilled prompt is offered to the cache;
- chunked prefill (``prefill_chunk``): while rows are running, each step feeds at most that many prompt tokens,
  oldest prompt first, and a prompt that is done joins the running rows in the next step.

Without them (TensorRT) every newcomer is prefilled whole, all in one call, as before.

With a ``draft`` (``cpm_infer.engine.speculative``), a batch of one row decodes speculatively: ``_speculate`` asks the
draft for k tokens, the target scores the row's last token and the proposals in one pass (``extend_all``), the row
keeps the prefix ``RowChooser.verify`` accepts plus one token of its own, and the cache drops the rest. The output
is the target's (greedy: token for token; sampled: in distribution). With more rows running, the batch already
amortises the weights over its rows, and every row decodes one token per step as without a draft.

Single-threaded: one owner calls ``add`` / ``cancel`` / ``step``; a server wraps it with its own lock.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np

from cpm_infer.backends.base import Backend, supports_kv_ops
from cpm_infer.config import ConfigError, GenerationConfig
from cpm_infer.engine.batch import DecodeBatch
from cpm_infer.engine.chooser import RowChooser, TokenLogprob, choose, token_info
from cpm_infer.engine.detok import TextStream
from cpm_infer.engine.prefix_cache import PrefixCache, shared_cache
from cpm_infer.engine.processors import static_bans
from cpm_infer.engine.speculative import Acceptance, Draft, SpeculationStats, plain_step_clock, require_verifier
from cpm_infer.errors import CpmError
from cpm_infer.settings import DRAFT_TOKENS

log = logging.getLogger(__name__)


class PromptTooLongError(CpmError):
    """A prompt does not leave room for one new token in the model's context."""


class TokenizerLike(Protocol):
    eod_id: int
    unk_id: int
    pad_id: int

    @property
    def vocab_size(self) -> int: ...

    def decode(self, ids: Sequence[int]) -> str: ...


@dataclass
class GenerationResult:
    prompt_index: int
    sample_index: int
    prompt_tokens: int
    token_ids: list[int]
    text: str
    finish_reason: str  # "eos" | "length" | "stop" | "context" | a cancel reason
    logprobs: list[TokenLogprob] | None = None  # one per token of token_ids, when asked for
    score: float | None = None  # beam search: the beam's length-penalised log-probability
    cached_tokens: int = 0  # prompt tokens reused from the prefix cache (not prefilled)


@dataclass
class TokenEvent:
    """A row produced ``token_id``; ``text`` is its newly final text (may be ""; text that could
    still start a stop string is held back)."""

    row_id: int
    tag: object
    token_id: int
    text: str
    logprob: TokenLogprob | None = None


@dataclass
class FinishEvent:
    """A row ended. ``text`` is what was still held back (streamed text = the row's TokenEvent texts
    + this); ``result`` is the whole row."""

    row_id: int
    tag: object
    reason: str
    result: GenerationResult
    text: str = ""


Event = TokenEvent | FinishEvent


def check_prompt_length(index: int, prompt: Sequence[int], n_positions: int, max_prompt: int | None = None) -> None:
    if len(prompt) >= n_positions:
        raise PromptTooLongError(
            f"prompt {index} has {len(prompt)} tokens but the model's context is {n_positions}: "
            f"shorten it, or truncate it to its last tokens (--truncate)"
        )
    if max_prompt is not None and len(prompt) > max_prompt:
        raise PromptTooLongError(
            f"prompt {index} has {len(prompt)} tokens but this engine takes prompts of at most {max_prompt} "
            "(its build's --max-input): shorten it, or truncate it to its last tokens (--truncate)"
        )


def max_prompt_tokens(backend: Backend) -> int:
    """The longest prompt a backend prefills: the context minus one new token, or less where the backend says
    so (a TensorRT engine's prefill profile, ``max_prompt``)."""
    limit = backend.spec.n_positions - 1
    own = getattr(backend, "max_prompt", None)
    return min(limit, int(own)) if own else limit


def make_rng(seed: int | None, prompt_index: int, sample_index: int) -> np.random.Generator:
    if seed is None:
        return np.random.default_rng()
    return np.random.default_rng([seed, prompt_index, sample_index])


@dataclass
class _Row:
    id: int
    tag: object
    prompt: list[int]
    config: GenerationConfig
    chooser: RowChooser
    text: TextStream
    prompt_index: int
    sample_index: int
    ids: list[int] = field(default_factory=list)
    logprobs: list[TokenLogprob] | None = None
    finish_reason: str | None = None
    cached_tokens: int = 0
    speculation: Acceptance | None = None  # None: this row does not speculate

    def result(self) -> GenerationResult:
        return GenerationResult(
            prompt_index=self.prompt_index,
            sample_index=self.sample_index,
            prompt_tokens=len(self.prompt),
            token_ids=self.ids,
            text=self.text.text,
            finish_reason=self.finish_reason or "length",
            logprobs=self.logprobs,
            cached_tokens=self.cached_tokens,
        )


def fill_holes(keep: list[int]) -> list[int]:
    """``keep`` (ascending row indices) reordered so that each slot a leaving row frees below ``len(keep)`` gets one of
    the kept rows from beyond it, the others staying where they are: a backend that moves rows inside its buffers
    (the shared KV cache) then copies one row per leaver, not every row after it."""
    size, kept = len(keep), set(keep)
    movers = iter([row for row in keep if row >= size])
    return [row if row in kept else next(movers) for row in range(size)]


@dataclass
class _Prefill:
    """One distinct prompt being prefilled for its rows (the samples that share it), possibly over several steps."""

    prompt: list[int]
    rows: list[_Row]
    batch: DecodeBatch | None = None  # its one-row cache so far
    done: int = 0  # prompt tokens in that cache
    cached: int = 0  # of which came from the prefix cache
    looked_up: bool = False
    slot: int = 0  # its row in ``batch`` (prompts prefilled together share one batch)
    logits: np.ndarray | None = None  # (1, V) after its last prompt token: prefilled, waiting to join


_SHARED = object()  # Engine's default prefix cache: the backend's shared one


class Engine:
    """``prefix_cache``: a ``PrefixCache`` (shared with whoever else holds it), None for none, by default the backend's
    shared one (``prefix_cache.shared_cache``). ``prefill_chunk``: longest piece of a prompt fed in one step (0: whole
    prompts). Both apply only where the backend supports ``KvCacheOps``. ``speculation_stats``: the
    ``SpeculationStats`` to count into (default: the engine's own), as ``self.speculation``."""

    def __init__(
        self,
        backend: Backend,
        tokenizer: TokenizerLike,
        *,
        max_rows: int = 8,
        prefix_cache: PrefixCache | object | None = _SHARED,
        prefill_chunk: int = 0,
        draft: Draft | None = None,
        draft_tokens: int = DRAFT_TOKENS,
        speculation_stats: SpeculationStats | None = None,
    ) -> None:
        if max_rows < 1:
            raise ConfigError(f"max_rows must be >= 1, got {max_rows}")
        if prefill_chunk < 0:
            raise ConfigError(f"prefill_chunk must be >= 0, got {prefill_chunk}")
        if draft is not None:
            require_verifier(backend)
        if draft is not None and draft_tokens < 1:
            raise ConfigError(f"draft_tokens must be >= 1, got {draft_tokens}")
        self.draft, self.draft_tokens = draft, draft_tokens
        # Plain decode steps of a lone row, the yardstick of speculative passes (kept by the draft for this model).
        self.plain_step = plain_step_clock(draft, backend)
        # Counted into (a server keeps one across the engines it makes after a failed step).
        self.speculation = speculation_stats if speculation_stats is not None else SpeculationStats()
        ops = supports_kv_ops(backend)
        if prefix_cache is _SHARED:
            prefix_cache = shared_cache(backend) if ops else None
        self.prefix_cache: PrefixCache | None = prefix_cache if ops and prefix_cache is not None else None  # type: ignore[assignment]
        self.prefill_chunk = prefill_chunk if ops else 0
        self.backend, self.tokenizer = backend, tokenizer
        limit = getattr(backend, "max_batch", None)  # e.g. a TensorRT engine's profile
        self.max_rows = min(max_rows, limit) if limit else max_rows
        self.n_positions = backend.spec.n_positions
        self.max_prompt = max_prompt_tokens(backend)
        self.vocab = backend.spec.vocab_size
        self.tokens_last_step = 0  # tokens produced in the last step, over all rows (incl. <eod>)
        self.speculated_last_step = 0  # of which by a speculative step (its one row's tokens)
        self.prefilled_rows = 0  # prompts prefilled so far (rows that share a prompt prefill it once)
        self._next_id = 0
        self._pending: list[_Row] = []
        self._rows: list[_Row] = []  # the running batch's rows, in batch order
        self._prefilling: list[_Prefill] = []  # admitted, prompt not done yet (FIFO)
        self._batch: DecodeBatch | None = None
        self._cancelled: dict[int, str] = {}
        self._finished: list[FinishEvent] = []  # cancelled pending rows, reported at the next step

    # -- public API ------------------------------------------------------------------------------
    def add(
        self,
        prompt_ids: Sequence[int],
        config: GenerationConfig,
        *,
        seed: int | None,
        prompt_index: int = 0,
        sample_index: int = 0,
        tag: object = None,
        speculate: bool = True,
    ) -> int:
        """Queue one row (one sample of one prompt); returns its row id. It joins the running batch at
        the next ``step`` with room; its generator is seeded from (seed, prompt_index, sample_index).
        ``speculate=False``: the row never decodes speculatively (where the engine has a draft)."""
        if config.beam_search:
            raise ConfigError("beam search does not run in the continuous batch; use cpm_infer.engine.beam.beam_search")
        prompt = [int(t) for t in prompt_ids] or [self.tokenizer.eod_id]  # empty = start of a document
        check_prompt_length(prompt_index, prompt, self.n_positions, self.max_prompt)
        row = _Row(
            id=self._next_id,
            tag=tag,
            prompt=prompt,
            config=config,
            chooser=RowChooser(
                config,
                prompt,
                make_rng(seed, prompt_index, sample_index),
                vocab=self.vocab,
                banned=self._static_bans(config),
                eos=self.tokenizer.eod_id,
            ),
            text=TextStream(self.tokenizer, config.stop_strings),
            prompt_index=prompt_index,
            sample_index=sample_index,
            logprobs=[] if config.logprobs is not None else None,
            speculation=Acceptance(self.draft_tokens) if self.draft and speculate else None,
        )
        self._next_id += 1
        self._pending.append(row)
        return row.id

    def cancel(self, row_id: int, reason: str = "cancelled") -> None:
        """Drop the row before the next step; a FinishEvent with ``reason`` follows from that step."""
        for row in self._pending:
            if row.id == row_id:
                self._pending.remove(row)
                row.finish_reason = reason
                self._finished.append(self._finish_event(row))
                return
        for job in self._prefilling:  # its prompt is being prefilled: the job goes when its last row does
            for row in job.rows:
                if row.id == row_id:
                    job.rows.remove(row)
                    if not job.rows:
                        self._prefilling.remove(job)
                    row.finish_reason = reason
                    self._finished.append(self._finish_event(row))
                    return
        if any(row.id == row_id for row in self._rows):
            self._cancelled[row_id] = reason

    def step(self) -> list[Event]:
        """Drop cancelled rows, decode one token for every running row, admit newcomers and prefill (prompts or
        their next chunk; a finished prompt's rows get their first token and join the running batch). Returns
        this step's events."""
        events: list[Event] = list(self._finished)
        self._finished = []
        self.tokens_last_step = self.speculated_last_step = 0
        self._drop_cancelled(events)
        if self._rows:
            self._decode_running(events)
        self._admit()
        if self._prefilling:
            self._prefill_step(events)
        return events

    @property
    def live_rows(self) -> int:
        return len(self._rows)

    @property
    def pending_rows(self) -> int:
        """Rows waiting to join the running batch: queued, or admitted with their prompt still prefilling."""
        return len(self._pending) + sum(len(job.rows) for job in self._prefilling)

    def has_work(self) -> bool:
        return bool(self._rows or self._pending or self._prefilling or self._finished)

    # -- one step ----------------------------------------------------------------------------------
    def _drop_cancelled(self, events: list[Event]) -> None:
        if not self._cancelled:
            return
        for row in self._rows:
            if row.id in self._cancelled:
                row.finish_reason = self._cancelled[row.id]
        self._cancelled.clear()
        self._keep_unfinished(events)

    def _decode_running(self, events: list[Event]) -> None:
        if len(self._rows) == 1 and self._speculate(self._rows[0], events):
            self._keep_unfinished(events)
            return
        start = time.perf_counter()
        logits = self._batch.decode(self.backend, [row.ids[-1] for row in self._rows])
        if len(self._rows) == 1 and self.draft is not None:
            self.plain_step.add(time.perf_counter() - start)
        self._choose(logits, self._rows, events)
        self._keep_unfinished(events)

    def _speculate(self, row: _Row, events: list[Event]) -> bool:
        """One speculative step of the batch's only row; False where it does not speculate now (no draft, opted
        out, k = 0, no proposal, no room left): the caller decodes as usual."""
        spec = row.speculation
        if self.draft is None or spec is None or spec.k == 0 or not self.plain_step.known:
            return False  # the first plain steps (of the engine's life) time what a pass must beat
        start = time.perf_counter()
        tokens = row.prompt + row.ids
        room = min(self.n_positions - len(tokens), row.config.max_new_tokens - len(row.ids) - 1)
        proposal = self.draft.propose(row.id, tokens, min(spec.k, room), row.chooser)
        proposed = proposal.tokens[: max(room, 0)]
        if not proposed:
            return False
        logits = self._batch.extend_all(self.backend, [[row.ids[-1], *proposed]])[0]
        accepted = emitted = 0
        for j, raw in enumerate(logits):
            guess = proposed[j] if j < len(proposed) else None
            q = proposal.q[j] if proposal.q is not None and guess is not None else None
            token, hit = row.chooser.verify(row.chooser.process(np.array(raw, dtype=np.float32)), guess, q)
            self._advance(row, token, token_info(raw, token, row.config.logprobs, self.tokenizer.decode), events)
            emitted += 1
            accepted += hit
            if not hit or row.finish_reason is not None:
                break
        spec.record(len(proposed), accepted)
        self.speculation.record(len(proposed), accepted, emitted)
        self.tokens_last_step += emitted
        self.speculated_last_step = emitted
        self._batch.drop_last(self.backend, len(proposed) + 1 - emitted)  # the cache keeps the accepted tokens
        # Greedy rows only: their text does not depend on which steps speculated, a sampled row's draws do, and a
        # seed must give the same text each run (the acceptance rule above is deterministic, the clock is not).
        yardstick = self.plain_step.value if row.config.greedy else None
        spec.record_time(time.perf_counter() - start, emitted, yardstick)
        return True

    def _admit(self) -> None:
        """Queued rows, while they fit in ``max_rows`` with the running and prefilling ones, become prefill jobs: one
        per distinct prompt (n samples, identical prompts, a prompt already prefilling share one prefill; its
        cache is forked with ``select``, so n samples cost one prefill)."""
        room = self.max_rows - len(self._rows) - sum(len(job.rows) for job in self._prefilling)
        if not self._pending or room <= 0:
            return
        newcomers, self._pending = self._pending[:room], self._pending[room:]
        jobs = {tuple(job.prompt): job for job in self._prefilling}
        for row in newcomers:
            job = jobs.get(tuple(row.prompt))
            if job is None:
                job = jobs[tuple(row.prompt)] = _Prefill(list(row.prompt), [])
                self._prefilling.append(job)
            job.rows.append(row)

    def _prefill_step(self, events: list[Event]) -> None:
        """Feed prompts, oldest job first. While rows are running, at most ``prefill_chunk`` prompt tokens per step
        (a long prompt goes a piece at a time, so the running rows' next token waits for one piece, not a whole
        prompt), and prompts finished in one step join in the next, a step of their own (the merge is the stall
        then, not a merge and a piece). With nothing running, or no chunking (``prefill_chunk`` 0, a backend
        without ``KvCacheOps``), every prompt goes whole and joins at once. Fresh prompts that fit prefill together
        in one call; the others extend their own one-row cache. A job not started yet first looks for a cached
        prefix; a finished one gives its snapshot to the prefix cache."""
        ready = [job for job in self._prefilling if job.logits is not None]
        if ready and self._rows and self.prefill_chunk:
            self._join_ready(ready, events)
            return
        self._look_up_prefixes()
        budget = self.prefill_chunk if self._rows else 0  # 0: no limit
        left, fresh, feeding = budget, [], []
        for job in self._prefilling:
            if job.logits is not None:  # prefilled, waiting to join
                continue
            if budget and left <= 0:
                break
            rest = len(job.prompt) - job.done
            short = not self.prefill_chunk or len(job.prompt) <= self.prefill_chunk
            if job.batch is None and short and (not budget or rest <= left):
                fresh.append(job)
            else:
                feeding.append((job, min(rest, left) if budget else rest))
            left -= rest
        if fresh:
            self._prefill_fresh(fresh)
        for job, count in feeding:
            self._feed(job, count)
        ready = [job for job in self._prefilling if job.logits is not None]
        if ready and not (self._rows and self.prefill_chunk):
            self._join_ready(ready, events)

    def _look_up_prefixes(self) -> None:
        if self.prefix_cache is None:
            return
        for job in self._prefilling:
            if not job.looked_up:
                job.looked_up = True
                hit = self.prefix_cache.take(self.backend, job.prompt)
                if hit is not None:
                    job.batch, job.done = DecodeBatch.holding(hit[0], hit[1]), hit[1]
                    job.cached = hit[1]

    def _prefill_fresh(self, jobs: list[_Prefill]) -> None:
        """Whole prompts in one call, one row each."""
        logits, batch = DecodeBatch.prefill(self.backend, [job.prompt for job in jobs], self.tokenizer.pad_id)
        for i, job in enumerate(jobs):
            job.batch, job.slot, job.done, job.logits = batch, i, len(job.prompt), logits[i : i + 1]
            if self.prefix_cache is not None:
                start = batch.width - len(job.prompt)
                self.prefix_cache.store(self.backend, job.prompt, batch.state, row=i, start=start)

    def _feed(self, job: _Prefill, count: int) -> None:
        """The job's next ``count`` prompt tokens into its own one-row cache."""
        end = job.done + count
        if job.batch is None:
            logits, job.batch = DecodeBatch.prefill(self.backend, [job.prompt[:end]], self.tokenizer.pad_id)
        else:
            logits = job.batch.extend(self.backend, [job.prompt[job.done : end]])
        job.done = end
        if end == len(job.prompt):
            job.logits = logits
            if self.prefix_cache is not None:
                self.prefix_cache.store(self.backend, job.prompt, job.batch.state)

    def _join_ready(self, ready: list[_Prefill], events: list[Event]) -> None:
        """The prefilled jobs' rows: their caches in one batch (jobs prefilled apart merged together), forked into
        one row per sample with ``select`` (rows of jobs cancelled meanwhile dropped), their first tokens chosen,
        merged into the running batch."""
        batch, offsets, order, rows, parts = None, {}, [], [], []
        for job in ready:
            if id(job.batch) not in offsets:
                if batch is None:
                    batch, offsets[id(job.batch)] = job.batch, 0
                else:
                    offsets[id(job.batch)] = batch.size
                    batch.merge(self.backend, job.batch)
            for row in job.rows:
                row.cached_tokens = job.cached
                order.append(offsets[id(job.batch)] + job.slot)
                rows.append(row)
                parts.append(job.logits)
        done = {id(job) for job in ready}
        self._prefilling = [job for job in self._prefilling if id(job) not in done]
        self.prefilled_rows += len(ready)
        batch.select(self.backend, order)
        self._choose(np.concatenate(parts), rows, events)
        if self._batch is None:
            self._batch, self._rows = batch, rows
        else:  # join all newcomers, then drop those that already finished in the same select
            self._batch.merge(self.backend, batch)
            self._rows = self._rows + rows
        self._keep_unfinished(events)

    # -- bookkeeping -------------------------------------------------------------------------------
    def _choose(self, logits: np.ndarray, rows: list[_Row], events: list[Event]) -> None:
        tokens, infos = choose(logits, [row.chooser for row in rows], self.tokenizer.decode)
        self.tokens_last_step += len(rows)
        for row, token, info in zip(rows, tokens, infos, strict=True):
            self._advance(row, token, info, events)

    def _advance(self, row: _Row, token: int, info: TokenLogprob | None, events: list[Event]) -> None:
        config = row.config
        if token == self.tokenizer.eod_id and not config.ignore_eos:
            row.finish_reason = "eos"
            return
        row.ids.append(token)
        row.chooser.update(token)
        if row.logprobs is not None and info is not None:
            row.logprobs.append(info)
        text, stopped = row.text.add(token)
        events.append(TokenEvent(row.id, row.tag, token, text, info))
        if stopped or token in config.stop_token_ids:
            row.finish_reason = "stop"
        elif len(row.ids) >= config.max_new_tokens:
            row.finish_reason = "length"
        elif len(row.prompt) + len(row.ids) >= self.n_positions:
            row.finish_reason = "context"

    def _keep_unfinished(self, events: list[Event]) -> None:
        """Drop the finished rows of the running batch (one ``select``; the last rows fill the slots left), report
        them."""
        keep = fill_holes([i for i, row in enumerate(self._rows) if row.finish_reason is None])
        if len(keep) == len(self._rows):
            return
        self._finish_rows([row for row in self._rows if row.finish_reason is not None], events)
        if keep:
            self._batch.select(self.backend, keep)
            self._rows = [self._rows[i] for i in keep]
        else:
            self._batch, self._rows = None, []

    def _finish_rows(self, rows: list[_Row], events: list[Event]) -> None:
        if self.draft is not None:
            for row in rows:
                self.draft.forget(row.id)
        events.extend(self._finish_event(row) for row in rows)

    def _finish_event(self, row: _Row) -> FinishEvent:
        tail = row.text.finish()
        return FinishEvent(row.id, row.tag, row.finish_reason or "length", row.result(), tail)

    def _static_bans(self, config: GenerationConfig) -> np.ndarray:
        tok = self.tokenizer
        return static_bans(config, unk_id=tok.unk_id, tokenizer_vocab=tok.vocab_size, vocab=self.vocab)
