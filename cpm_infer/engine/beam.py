"""Beam search, step for step what transformers' ``generate(num_beams=...)`` does (its vectorised
``_beam_search`` of 5.x), over any ``Backend``.

One prompt at a time: its prompt is prefilled once and the cache copied into ``num_beams`` rows
(``select`` with repeated rows), then every step keeps the ``2 * num_beams`` best continuations of
all beams (accumulated log-probabilities), moves the finished ones (``<eod>`` or the length limit)
into a list of the ``num_beams`` best hypotheses scored ``logprob_sum / generated_len **
length_penalty``, continues with the ``num_beams`` best unfinished ones (another ``select``), and
stops when no running beam can beat the finished ones (or, with ``early_stopping``, as soon as
``num_beams`` hypotheses are done). Logits processors work on log-probabilities, as in transformers.
It does not share the engine's continuous batch.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from cpm_infer.backends.base import Backend
from cpm_infer.config import GenerationConfig
from cpm_infer.engine import processors, sampling
from cpm_infer.engine.batch import DecodeBatch
from cpm_infer.engine.core import GenerationResult, TokenizerLike

NEG = np.float32(-1.0e9)  # transformers' "impossible" score


@dataclass
class _Hypotheses:
    """The num_beams best finished sequences (scores sorted descending, like transformers' tensors)."""

    tokens: list[list[int]]
    scores: np.ndarray  # float32 (K,)
    finished: np.ndarray  # bool (K,)


def _top(scores: np.ndarray, k: int) -> np.ndarray:
    """Indices of the k largest values, descending, ties by lower index."""
    k = min(k, scores.size)
    kth = np.partition(scores, scores.size - k)[scores.size - k]
    cand = np.flatnonzero(scores >= kth)
    return cand[np.lexsort((cand, -scores[cand]))][:k]


def _process(logp: np.ndarray, prompt: list[int], beams: list[list[int]], config: GenerationConfig, ctx) -> None:
    """The rows' logits processors (the continuous batch's, built from each beam's history) on
    log-probabilities, in place, as transformers applies its processors to beams."""
    for row, generated in zip(logp, beams, strict=True):
        processors.apply(processors.build(config, prompt, generated, ctx), row)


def search_one(
    backend: Backend, prompt: Sequence[int], config: GenerationConfig, tokenizer: TokenizerLike, ban: np.ndarray
) -> list[tuple[list[int], float, bool]]:
    """The ``num_return_sequences`` best (generated ids, score, ended with <eod>) for one prompt."""
    k, prompt = config.num_beams, list(prompt)
    eos = None if config.ignore_eos else tokenizer.eod_id
    ctx = processors.RowContext(backend.spec.vocab_size, ban, tokenizer.eod_id)
    max_len = min(len(prompt) + config.max_new_tokens, backend.spec.n_positions)
    logits, batch = DecodeBatch.prefill(backend, [prompt], tokenizer.pad_id)
    batch.select(backend, [0] * k)
    logits = np.repeat(logits, k, axis=0)
    running = [[] for _ in range(k)]
    scores = np.full(k, NEG, dtype=np.float32)
    scores[0] = 0  # only the first beam's continuations count at the first step
    done = _Hypotheses([[] for _ in range(k)], np.full(k, NEG, dtype=np.float32), np.zeros(k, dtype=bool))
    improvable, cur_len = True, len(prompt)
    top_k_mask = np.arange(2 * k) < k
    while True:
        logp = sampling.log_softmax(logits.astype(np.float32))
        _process(logp, prompt, running, config, ctx)
        vocab = logp.shape[1]
        acc = (logp + scores[:, None]).reshape(-1)
        best = _top(acc, 2 * k)
        cand_lp, cand_beam, cand_tok = acc[best], best // vocab, best % vocab
        cand_seqs = [running[b] + [int(t)] for b, t in zip(cand_beam, cand_tok, strict=True)]
        hits = (cur_len + 1 >= max_len) | (cand_tok == eos if eos is not None else False)
        hits = np.broadcast_to(hits, (2 * k,))
        # the num_beams best unfinished continuations run on
        run_lp = cand_lp + hits.astype(np.float32) * NEG
        nxt = _top(run_lp, k)
        running, scores = [cand_seqs[i] for i in nxt], run_lp[nxt]
        # finished candidates among the top num_beams join the hypotheses if they score higher
        fin_lp = cand_lp / np.float32((cur_len + 1 - len(prompt)) ** config.length_penalty)
        if done.finished.all() and config.early_stopping:
            fin_lp = fin_lp + NEG
        if not improvable:
            fin_lp = fin_lp + NEG
        just = hits & top_k_mask
        fin_lp = fin_lp + (~just).astype(np.float32) * NEG
        merged = np.concatenate([done.scores, fin_lp])
        keep = _top(merged, k)
        pool = done.tokens + cand_seqs
        flags = np.concatenate([done.finished, just])
        done = _Hypotheses([pool[i] for i in keep], merged[keep], flags[keep])
        cur_len += 1
        best_running = scores[0] / np.float32((cur_len - len(prompt)) ** config.length_penalty)
        worst = np.where(done.finished, done.scores.min(), NEG)
        improvable = improvable and bool(np.any(best_running > worst))
        if not improvable or (done.finished.all() and config.early_stopping) or hits.all():
            break
        batch.select(backend, cand_beam[nxt])
        logits = batch.decode(backend, [seq[-1] for seq in running])
    out = []
    for tokens, score in zip(done.tokens[: config.num_return_sequences], done.scores, strict=False):
        ended = eos is not None and bool(tokens) and tokens[-1] == eos
        out.append((tokens[:-1] if ended else tokens, float(score), ended))
    return out


def beam_search(
    backend: Backend,
    prompts: Sequence[Sequence[int]],
    config: GenerationConfig,
    tokenizer: TokenizerLike,
    *,
    index_offset: int = 0,
    stats=None,
) -> list[GenerationResult]:
    """``num_return_sequences`` results per prompt (sample_index = rank, best first)."""
    ban = processors.static_bans(
        config, unk_id=tokenizer.unk_id, tokenizer_vocab=tokenizer.vocab_size, vocab=backend.spec.vocab_size
    )
    results = []
    for i, prompt in enumerate(prompts):
        for rank, (tokens, score, ended) in enumerate(search_one(backend, prompt, config, tokenizer, ban)):
            reason = "eos" if ended else ("length" if len(tokens) >= config.max_new_tokens else "context")
            results.append(
                GenerationResult(
                    prompt_index=index_offset + i,
                    sample_index=rank,
                    prompt_tokens=len(prompt),
                    token_ids=tokens,
                    text=tokenizer.decode(tokens),
                    finish_reason=reason,
                    score=score,
                )
            )
    if stats is not None:
        stats.batch_size = config.num_beams
    return results
