"""The generation loop: left-padded batch -> prefill -> decode steps, over any ``Backend``.

Pure Python + numpy; never imports a runtime. Each sequence (prompt x sample) has its own seeded
generator, repetition-penalty mask and stop state, so a row's output does not depend on what it was
batched with. Finished rows are dropped from the batch (``Backend.select``) so they cost nothing.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np

from cpm_infer import sampling
from cpm_infer.backends.base import Backend
from cpm_infer.config import GenerationConfig
from cpm_infer.errors import CpmError

log = logging.getLogger(__name__)

# (sequence index in the request, newly final text). Called as text becomes final.
StreamCallback = Callable[[int, str], None]
# (sequence index in the request) -> None to go on, or the finish reason that ends the sequence now.
StopCheck = Callable[[int], str | None]


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
    finish_reason: str  # "eos" | "length" | "stop" | "context" | a ``should_stop`` reason


@dataclass
class GenerationStats:
    """Wall-clock timings of one ``generate`` call (logits reach the host in each step, so the
    device is synchronised by construction)."""

    batch_size: int = 0
    padded_prompt_len: int = 0
    first_token_s: float = 0.0
    step_s: list[float] = field(default_factory=list)
    new_tokens: int = 0

    @property
    def decode_ms_per_step(self) -> float:
        return 1000 * float(np.mean(self.step_s)) if self.step_s else float("nan")


@dataclass
class _Sequence:
    prompt_index: int
    sample_index: int
    prompt_len: int
    rng: np.random.Generator
    ids: list[int] = field(default_factory=list)
    text: str = ""
    emitted: int = 0
    finish_reason: str | None = None


def left_pad(prompts: Sequence[Sequence[int]], pad_id: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Left-pad prompts into (ids, attention_mask, position_ids), each (B, T) int64."""
    width = max(len(p) for p in prompts)
    ids = np.full((len(prompts), width), pad_id, dtype=np.int64)
    mask = np.zeros((len(prompts), width), dtype=np.int64)
    for row, prompt in enumerate(prompts):
        if prompt:
            ids[row, width - len(prompt) :] = prompt
            mask[row, width - len(prompt) :] = 1
    return ids, mask, position_ids_from_mask(mask)


def position_ids_from_mask(mask: np.ndarray) -> np.ndarray:
    """Positions count real tokens only (``cumsum - 1``); padded slots get 0."""
    return np.where(mask == 1, np.cumsum(mask, axis=-1) - 1, 0).astype(np.int64)


def check_prompt_lengths(prompts: Sequence[Sequence[int]], n_positions: int) -> None:
    for index, prompt in enumerate(prompts):
        if len(prompt) >= n_positions:
            raise PromptTooLongError(
                f"prompt {index} has {len(prompt)} tokens but the model's context is {n_positions}: "
                f"shorten it, or truncate it to its last tokens (--truncate)"
            )


def truncate_prompt(ids: Sequence[int], n_positions: int, max_new_tokens: int) -> list[int]:
    """Keep the last tokens of a prompt so that ``max_new_tokens`` still fit in the context."""
    keep = max(1, n_positions - max_new_tokens)
    return list(ids[-keep:])


def generate(
    backend: Backend,
    prompts: Sequence[Sequence[int]],
    config: GenerationConfig,
    tokenizer: TokenizerLike,
    *,
    callback: StreamCallback | None = None,
    index_offset: int = 0,
    stats: GenerationStats | None = None,
    seeds: Sequence[int | None] | None = None,
    should_stop: StopCheck | None = None,
) -> list[GenerationResult]:
    """Generate ``config.num_samples`` continuations of each prompt (token ids, without the prompt).

    Results come back in order: prompt 0 samples 0..n-1, prompt 1, ... ``index_offset`` numbers the
    prompts (it seeds the per-sequence generators), so splitting a long list into batches gives the
    same output as one big batch.

    ``seeds`` (one per prompt) batches unrelated requests: prompt i then samples exactly as it would
    alone, as prompt 0 of a call with ``config.seed = seeds[i]``. ``should_stop(sequence index)`` is
    asked after every step for each live sequence; a reason string ends that sequence (it is dropped
    from the batch) with that ``finish_reason``, e.g. when a client went away.
    """
    if not prompts:
        return []
    prompts = [list(p) if len(p) else [tokenizer.eod_id] for p in prompts]  # empty = start of a document
    n_positions = backend.spec.n_positions
    check_prompt_lengths(prompts, n_positions)

    if seeds is not None and len(seeds) != len(prompts):
        raise ValueError(f"seeds has {len(seeds)} entries for {len(prompts)} prompts")
    seqs = [
        _Sequence(
            index_offset + i,
            s,
            len(p),
            _make_rng(config.seed, index_offset + i, s) if seeds is None else _make_rng(seeds[i], 0, s),
        )
        for i, p in enumerate(prompts)
        for s in range(config.num_samples)
    ]
    expanded = [prompts[seq.prompt_index - index_offset] for seq in seqs]
    ids, mask, pos = left_pad(expanded, tokenizer.pad_id)
    width = ids.shape[1]

    stats = stats if stats is not None else GenerationStats()
    stats.batch_size, stats.padded_prompt_len = len(seqs), width
    eos = tokenizer.eod_id
    stop_len = max((len(s) for s in config.stop_strings), default=0)
    track_text = callback is not None or bool(config.stop_strings)

    start = time.perf_counter()
    logits, state = backend.prefill(ids, mask, pos)
    vocab = logits.shape[-1]
    banned = [tokenizer.unk_id] if config.ban_unk else []
    banned += [i for i in config.banned_ids if i < vocab]
    banned += range(tokenizer.vocab_size, vocab)  # embedding rows the tokenizer cannot decode
    pipeline = sampling.build_pipeline(config, banned)
    seen = _seen_mask(expanded, vocab) if config.repetition_penalty != 1.0 else None

    active = np.arange(len(seqs))  # rows of the current batch -> index into seqs
    step = 0
    while True:
        logits = logits.astype(np.float32, copy=False)
        if seen is not None:
            logits = sampling.apply_repetition_penalty(logits, seen[active], config.repetition_penalty)
        if step < config.min_new_tokens and not config.ignore_eos:
            logits = sampling.ban_ids(logits, [eos])
        for process in pipeline:
            logits = process(logits)
        if config.greedy:
            chosen = sampling.greedy(logits)
        else:
            chosen = sampling.sample(logits, [seqs[i].rng for i in active])
        step += 1
        elapsed = time.perf_counter() - start
        if step == 1:
            stats.first_token_s = elapsed
        else:
            stats.step_s.append(elapsed)

        keep = []
        for row, (index, token) in enumerate(zip(active.tolist(), chosen.tolist(), strict=True)):  # Python ints
            seq = seqs[index]
            _advance(
                seq, token, config, tokenizer, eos, width + step, n_positions, track_text, stop_len, callback, index
            )
            if seq.finish_reason is None and should_stop is not None:
                seq.finish_reason = should_stop(index)
            if seq.finish_reason is None:
                keep.append(row)
                if seen is not None:
                    seen[index, token] = True
            elif callback is not None:
                _flush(seq, callback, index)
        stats.new_tokens += len(active)
        if not keep:
            break
        next_ids = chosen[keep][:, None].astype(np.int64)
        next_pos = pos[keep, -1:] + 1
        mask = np.concatenate([mask[keep], np.ones((len(keep), 1), dtype=np.int64)], axis=1)
        if len(keep) < len(active):
            state = backend.select(state, np.asarray(keep, dtype=np.int64))
        active, pos = active[keep], next_pos
        start = time.perf_counter()
        logits, state = backend.decode(state, next_ids, mask, next_pos)

    return [_finish(seq, tokenizer, track_text) for seq in seqs]


def _advance(
    seq: _Sequence,
    token: int,
    config: GenerationConfig,
    tokenizer: TokenizerLike,
    eos: int,
    total_len: int,
    n_positions: int,
    track_text: bool,
    stop_len: int,
    callback: StreamCallback | None,
    index: int,
) -> None:
    if token == eos and not config.ignore_eos:
        seq.finish_reason = "eos"
        return
    seq.ids.append(token)
    if track_text:
        before = len(seq.text)
        seq.text = tokenizer.decode(seq.ids)
        if config.stop_strings:
            # Only the new text (plus a stop string's worth before it) can contain a new match.
            window_start = max(0, min(before, len(seq.text)) - stop_len + 1)
            hits = [i for i in (seq.text.find(s, window_start) for s in config.stop_strings) if i >= 0]
            if hits:
                seq.text = seq.text[: min(hits)]
                seq.finish_reason = "stop"
                return
        if callback is not None:
            # Hold back what could still become the start of a stop string.
            final = len(seq.text) - max(stop_len - 1, 0)
            if final > seq.emitted:
                callback(index, seq.text[seq.emitted : final])
                seq.emitted = final
    if len(seq.ids) >= config.max_new_tokens:
        seq.finish_reason = "length"
    elif total_len >= n_positions:
        seq.finish_reason = "context"


def _flush(seq: _Sequence, callback: StreamCallback, index: int) -> None:
    if len(seq.text) > seq.emitted:
        callback(index, seq.text[seq.emitted :])
        seq.emitted = len(seq.text)


def _finish(seq: _Sequence, tokenizer: TokenizerLike, track_text: bool) -> GenerationResult:
    if not track_text:
        seq.text = tokenizer.decode(seq.ids)
    return GenerationResult(
        prompt_index=seq.prompt_index,
        sample_index=seq.sample_index,
        prompt_tokens=seq.prompt_len,
        token_ids=seq.ids,
        text=seq.text,
        finish_reason=seq.finish_reason or "length",
    )


def _make_rng(seed: int | None, prompt_index: int, sample_index: int) -> np.random.Generator:
    if seed is None:
        return np.random.default_rng()
    return np.random.default_rng([seed, prompt_index, sample_index])


def _seen_mask(prompts: Sequence[Sequence[int]], vocab: int) -> np.ndarray:
    seen = np.zeros((len(prompts), vocab), dtype=bool)
    for row, prompt in enumerate(prompts):
        seen[row, [t for t in prompt if t < vocab]] = True
    return seen
