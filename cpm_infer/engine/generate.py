"""``generate()``: a list of prompts in, their results out, over the engine (``cpm_infer.engine``).

All rows join one batch at the first step and leave as they finish, so a call behaves like the plain
prefill-then-decode loop it replaces. Beam search (``num_beams`` > 1) runs in ``cpm_infer.engine.beam``.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field

import numpy as np

from cpm_infer.backends.base import Backend
from cpm_infer.config import GenerationConfig
from cpm_infer.engine.batch import left_pad, position_ids_from_mask
from cpm_infer.engine.core import (
    Engine,
    FinishEvent,
    GenerationResult,
    PromptTooLongError,
    TokenizerLike,
    check_prompt_length,
    max_prompt_tokens,
)
from cpm_infer.engine.speculative import Draft, SpeculationStats
from cpm_infer.settings import DRAFT_TOKENS

__all__ = [
    "GenerationResult",
    "GenerationStats",
    "PromptTooLongError",
    "TokenizerLike",
    "check_prompt_lengths",
    "generate",
    "generate_iter",
    "left_pad",
    "position_ids_from_mask",
]

# (sequence index in the request, newly final text). Called as text becomes final.
StreamCallback = Callable[[int, str], None]
# (sequence index in the request) -> None to go on, or the finish reason that ends the sequence now.
StopCheck = Callable[[int], str | None]


@dataclass
class GenerationStats:
    """Wall-clock timings of one ``generate`` call (logits reach the host in each step, so the
    device is synchronised by construction). A speculative step that made e tokens of its row counts in
    ``step_s`` as e steps of a 1/e share each (so p50 is a time per token, as for a batch of one)."""

    batch_size: int = 0
    padded_prompt_len: int = 0
    first_token_s: float = 0.0
    step_s: list[float] = field(default_factory=list)
    new_tokens: int = 0
    speculation: SpeculationStats | None = None  # with a draft: passes, proposed, accepted

    @property
    def decode_ms_per_step(self) -> float:
        return 1000 * float(np.mean(self.step_s)) if self.step_s else float("nan")


def check_prompt_lengths(prompts: Sequence[Sequence[int]], n_positions: int, max_prompt: int | None = None) -> None:
    for index, prompt in enumerate(prompts):
        check_prompt_length(index, prompt, n_positions, max_prompt)


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
    draft: Draft | None = None,
    draft_tokens: int = DRAFT_TOKENS,
) -> list[GenerationResult]:
    """Generate ``config.num_samples`` continuations of each prompt (token ids, without the prompt).

    Results come back in order: prompt 0 samples 0..n-1, prompt 1, ... ``index_offset`` numbers the
    prompts (it seeds the per-sequence generators), so splitting a long list into batches gives the
    same output as one big batch.

    ``seeds`` (one per prompt) batches unrelated requests: prompt i then samples exactly as it would
    alone, as prompt 0 of a call with ``config.seed = seeds[i]``. ``should_stop(sequence index)`` is
    asked after every step for each live sequence; a reason string ends that sequence (it is dropped
    from the batch) with that ``finish_reason``, e.g. when a client went away. ``draft``: speculative decoding
    while one sequence runs (``cpm_infer.engine.speculative``).
    """
    groups = generate_iter(
        backend,
        prompts,
        config,
        tokenizer,
        callback=callback,
        index_offset=index_offset,
        stats=stats,
        seeds=seeds,
        should_stop=should_stop,
        draft=draft,
        draft_tokens=draft_tokens,
    )
    return [result for group in groups for result in group]


def generate_iter(
    backend: Backend,
    prompts: Sequence[Sequence[int]],
    config: GenerationConfig,
    tokenizer: TokenizerLike,
    *,
    max_rows: int | None = None,
    callback: StreamCallback | None = None,
    index_offset: int = 0,
    stats: GenerationStats | None = None,
    seeds: Sequence[int | None] | None = None,
    should_stop: StopCheck | None = None,
    draft: Draft | None = None,
    draft_tokens: int = DRAFT_TOKENS,
) -> Iterator[list[GenerationResult]]:
    """``generate``, yielding each prompt's results (its samples) in prompt order as soon as it and all
    prompts before it are done. At most ``max_rows`` sequences run at once (default: all of them); the
    others wait and join the running batch as sequences leave it (continuous batching)."""
    if not prompts:
        return
    if seeds is not None and len(seeds) != len(prompts):
        raise ValueError(f"seeds has {len(seeds)} entries for {len(prompts)} prompts")
    prompts = [list(p) if len(p) else [tokenizer.eod_id] for p in prompts]  # empty = start of a document
    check_prompt_lengths(prompts, backend.spec.n_positions, max_prompt_tokens(backend))
    if config.beam_search:
        from cpm_infer.engine.beam import beam_search

        for i, prompt in enumerate(prompts):
            yield beam_search(backend, [prompt], config, tokenizer, index_offset=index_offset + i, stats=stats)
        return

    stats = stats if stats is not None else GenerationStats()
    n = config.num_samples
    stats.batch_size, stats.padded_prompt_len = len(prompts) * n, max(len(p) for p in prompts)
    engine = Engine(backend, tokenizer, max_rows=max_rows or len(prompts) * n, draft=draft, draft_tokens=draft_tokens)
    if draft is not None:
        stats.speculation = engine.speculation
    index_of: dict[int, int] = {}  # row id -> sequence index in the request
    for i, prompt in enumerate(prompts):
        for s in range(n):
            seed, prompt_index = (config.seed, index_offset + i) if seeds is None else (seeds[i], 0)
            index_of[engine.add(prompt, config, seed=seed, prompt_index=prompt_index, sample_index=s)] = len(index_of)
    results: dict[int, GenerationResult] = {}
    live, ready, first = set(index_of), 0, True
    while engine.has_work():
        start = time.perf_counter()
        events = engine.step()
        elapsed = time.perf_counter() - start
        if engine.tokens_last_step:
            if first:
                stats.first_token_s, first = elapsed, False
            elif engine.speculated_last_step:  # one pass made several tokens of its row: time per token
                stats.step_s.extend([elapsed / engine.speculated_last_step] * engine.speculated_last_step)
            else:
                stats.step_s.append(elapsed)
            stats.new_tokens += engine.tokens_last_step
        for event in events:
            index = index_of[event.row_id]
            if callback is not None and event.text:
                callback(index, event.text)
            if isinstance(event, FinishEvent):
                live.discard(event.row_id)
                event.result.prompt_index = index_offset + index // n
                results[index] = event.result
        while ready < len(prompts) and all(ready * n + s in results for s in range(n)):
            yield [results.pop(ready * n + s) for s in range(n)]
            ready += 1
        if should_stop is not None:
            for row in live:
                reason = should_stop(index_of[row])
                if reason is not None:
                    engine.cancel(row, reason)
