"""The reference side of a validation: the cases, run once through the reference model and recorded.

Recorded first, so that the model that produced it (eager transformers for ONNX exports, the ONNX graph
on ONNX Runtime for TensorRT engines) can be freed before the candidate is loaded: one model in memory
at a time. Cases: batch 1, batch 4 and a left-padded batch 3, each a prefill then decode steps that
feed the reference's greedy token (teacher forcing: one near-tie does not derail later steps).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from cpm_infer.config import ModelSpec
from cpm_infer.engine.generate import left_pad


def validation_cases(spec: ModelSpec, seed: int = 0) -> list[tuple[str, list[list[int]]]]:
    """(name, prompts): batch 1, batch 4, and a left-padded batch of uneven prompts."""
    rng = np.random.default_rng(seed)
    length = max(2, min(8, spec.n_positions // 4))

    def prompt(n: int) -> list[int]:
        return rng.integers(0, spec.vocab_size, size=n).tolist()

    return [
        ("batch 1", [prompt(length)]),
        ("batch 4", [prompt(length) for _ in range(4)]),
        ("left-padded batch 3", [prompt(length), prompt(max(1, length // 2)), prompt(1)]),
    ]


@dataclass
class Step:
    """One step of a case as the reference ran it."""

    case: str
    step: str
    ids: np.ndarray
    mask: np.ndarray
    pos: np.ndarray
    logits: np.ndarray  # (B, T, V) every position (eager), or (B, V) the last one (a backend)
    presents: list[np.ndarray] | None = None  # eager: every present key/value, (B, nh, L, hs)

    @property
    def last_logits(self) -> np.ndarray:
        return self.logits[:, -1, :] if self.logits.ndim == 3 else self.logits


@dataclass
class Reference:
    name: str
    cases: list[list[Step]]


def _trajectory(spec: ModelSpec, run, *, decode_steps: int, max_batch: int | None, seed: int) -> list[list[Step]]:
    """Drive ``run(cache, ids, mask, pos) -> (logits, presents, cache)`` through every case."""
    cases = []
    for case, prompts in validation_cases(spec, seed):
        if max_batch is not None and len(prompts) > max_batch:
            prompts, case = prompts[:max_batch], f"{case} (first {max_batch})"
        ids, mask, pos = left_pad(prompts, pad_id=0)
        cache, steps = None, []
        for step in range(decode_steps + 1):
            logits, presents, cache = run(cache, ids, mask, pos)
            name = f"prefill (seq {ids.shape[1]})" if step == 0 else f"decode {step} (past {mask.shape[1] - 1})"
            steps.append(Step(case, name, ids, mask, pos, logits, presents))
            ids = steps[-1].last_logits.argmax(-1)[:, None].astype(np.int64)
            pos = pos[:, -1:] + 1
            mask = np.concatenate([mask, np.ones((len(prompts), 1), dtype=np.int64)], axis=1)
        cases.append(steps)
    return cases


def record_eager(model: Any, spec: ModelSpec, *, decode_steps: int = 3, seed: int = 0) -> Reference:
    """transformers' GPT2LMHeadModel with its DynamicCache: all-position logits and every present."""
    import torch

    model.eval()
    device = next(model.parameters()).device

    def run(cache, ids, mask, pos):
        with torch.inference_mode():
            out = model(
                input_ids=torch.from_numpy(ids).to(device),
                attention_mask=torch.from_numpy(mask).to(device),
                position_ids=torch.from_numpy(pos).to(device),
                cache=cache,
                use_cache=True,
            )
        layers = out.cache.layers
        presents = [getattr(layer, part).float().cpu().numpy() for layer in layers for part in ("keys", "values")]
        return out.logits.float().cpu().numpy(), presents, out.cache

    return Reference("eager PyTorch", _trajectory(spec, run, decode_steps=decode_steps, max_batch=None, seed=seed))


def record_backend(
    backend: Any, spec: ModelSpec, name: str, *, decode_steps: int = 3, max_batch: int | None = None, seed: int = 0
) -> Reference:
    """Any ``Backend``: last-position logits only."""

    def run(state, ids, mask, pos):
        logits, state = backend.prefill(ids, mask, pos) if state is None else backend.decode(state, ids, mask, pos)
        return np.array(logits, dtype=np.float32), None, state

    return Reference(name, _trajectory(spec, run, decode_steps=decode_steps, max_batch=max_batch, seed=seed))
