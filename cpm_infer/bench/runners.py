"""What a benchmark times: one greedy generation of ``new_tokens`` for a batch of prompt ids.

Every runner returns the same ``Timing`` (time to first token, then one duration per decode step),
measured at the point where the new tokens are on the host, so devices are synchronised.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np

from cpm_infer.backends.base import Backend
from cpm_infer.config import GenerationConfig
from cpm_infer.generate import GenerationStats, generate


@dataclass
class Timing:
    first_token_s: float
    step_s: list[float] = field(default_factory=list)
    new_tokens: int = 0  # tokens produced over the whole batch
    token_ids: list[list[int]] | None = None  # the generated ids of each row, for parity checks between runners


StepBytes = Callable[[int, float], float]  # (batch, past) -> bytes one decode step reads


class Runner(Protocol):
    name: str
    traffic: StepBytes | None  # optional: lets a row show achieved memory bandwidth

    def run(self, prompts: np.ndarray, new_tokens: int) -> Timing: ...


class IdsTokenizer:
    """The ids-only tokenizer view a benchmark needs: special ids, no text (EOS is ignored)."""

    unk_id, sep_id, pad_id, eod_id = 0, 4, 5, 7

    def __init__(self, vocab_size: int) -> None:
        self.vocab_size = vocab_size

    def decode(self, ids: Sequence[int]) -> str:
        return ""


class LoopRunner:
    """Our generation loop over any ``Backend``."""

    def __init__(self, name: str, backend: Backend, traffic: StepBytes | None = None) -> None:
        self.name, self.backend, self.traffic = name, backend, traffic
        self.tokenizer = IdsTokenizer(backend.spec.vocab_size)

    def run(self, prompts: np.ndarray, new_tokens: int) -> Timing:
        config = GenerationConfig(temperature=0, max_new_tokens=new_tokens, ignore_eos=True, ban_unk=False)
        stats = GenerationStats()
        results = generate(self.backend, prompts.tolist(), config, self.tokenizer, stats=stats)
        return Timing(stats.first_token_s, list(stats.step_s), stats.new_tokens, [r.token_ids for r in results])


class HFGenerateRunner:
    """transformers' own ``generate()``: what users of the seed scripts run today. The one way this project
    times it: a logits processor stamps the clock once per step, right after that step's forward pass, so the
    first stamp is the time to first token and the gaps between stamps are the decode steps."""

    name = "hf-generate"

    def __init__(self, model, traffic: StepBytes | None = None) -> None:
        self.model, self.traffic = model, traffic

    def run(self, prompts: np.ndarray, new_tokens: int) -> Timing:
        import torch
        from transformers import LogitsProcessor, LogitsProcessorList

        stamps: list[float] = []

        class _Clock(LogitsProcessor):  # called once per step, right after that step's forward pass
            def __call__(self, input_ids, scores):
                stamps.append(time.perf_counter())
                return scores

        device = next(self.model.parameters()).device
        ids = torch.from_numpy(prompts).to(device)
        with torch.inference_mode():
            start = time.perf_counter()
            out = self.model.generate(
                ids,
                attention_mask=torch.ones_like(ids),
                max_new_tokens=new_tokens,
                min_new_tokens=new_tokens,
                do_sample=False,
                eos_token_id=None,
                pad_token_id=IdsTokenizer.pad_id,
                logits_processor=LogitsProcessorList([_Clock()]),
            )
        generated = out[:, prompts.shape[1] :].tolist()
        return Timing(stamps[0] - start, list(np.diff(stamps)), new_tokens * len(prompts), generated)
