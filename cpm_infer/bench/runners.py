"""What a benchmark times: one generation of ``new_tokens`` for a batch of prompt ids, greedy or sampled.

Every runner returns the same ``Timing`` (time to first token, then one duration per decode step),
measured at the point where the new tokens are on the host, so devices are synchronised. A runner
generates under one ``Sampling`` mode (``with_sampling`` makes the variant for another one).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np

from cpm_infer.backends.base import Backend
from cpm_infer.config import ConfigError, GenerationConfig
from cpm_infer.engine.generate import GenerationStats, TokenizerLike, generate
from cpm_infer.engine.speculative import Draft, SpeculationStats
from cpm_infer.errors import CpmError
from cpm_infer.settings import DRAFT_TOKENS, for_door

# Settings a --sampling mode may set (cpm_infer.settings; the rest of the benchmark's config is fixed: EOS
# ignored, no bans), and what `cpm generate` samples with by default.
SAMPLING_KEYS = {s.name: int if s.kind == "int" else float for s in for_door("bench")}
CLI_DEFAULTS = {s.name: s.default for s in for_door("bench") if s.beam_default != s.default}  # the ones on


@dataclass(frozen=True)
class Sampling:
    """A named set of sampling settings: ``greedy``, ``default`` (the CLI's) or given ``key=value,...``."""

    label: str
    settings: tuple[tuple[str, float | int], ...] = ()

    @property
    def greedy(self) -> bool:
        return dict(self.settings).get("temperature", 1.0) == 0

    def describe(self) -> str:
        if self.label == "greedy":
            return "greedy (argmax)"
        text = ", ".join(f"{k} {v}" for k, v in self.settings)
        return f"{text} (the CLI defaults)" if self.label == "default" else text

    def config(self, new_tokens: int) -> GenerationConfig:
        base = GenerationConfig(max_new_tokens=new_tokens, ignore_eos=True, ban_unk=False, seed=0)
        return base.replace(**dict(self.settings))


GREEDY = Sampling("greedy", (("temperature", 0.0),))


def parse_sampling(text: str) -> Sampling:
    """``greedy`` | ``default`` | ``key=value,key=value`` (keys from SAMPLING_KEYS), validated."""
    text = text.strip()
    if text == "greedy":
        return GREEDY
    if text == "default":
        return Sampling("default", tuple(CLI_DEFAULTS.items()))
    settings: dict[str, float | int] = {}
    for item in filter(None, (part.strip() for part in text.split(","))):
        key, eq, value = item.partition("=")
        if not eq or key.strip() not in SAMPLING_KEYS:
            raise CpmError(
                f"--sampling takes greedy, default or key=value pairs with keys {', '.join(SAMPLING_KEYS)}; "
                f"got {item!r}"
            )
        try:
            settings[key.strip()] = SAMPLING_KEYS[key.strip()](value)
        except ValueError as exc:
            raise CpmError(f"--sampling: {key.strip()} must be a number, got {value!r}") from exc
    if not settings:
        raise CpmError("--sampling needs greedy, default or key=value settings")
    mode = Sampling(",".join(f"{k}={v}" for k, v in settings.items()), tuple(settings.items()))
    try:
        mode.config(1)
    except ConfigError as exc:
        raise CpmError(f"--sampling {text}: {exc}") from exc
    return mode


@dataclass
class Timing:
    first_token_s: float
    step_s: list[float] = field(default_factory=list)
    new_tokens: int = 0  # tokens produced over the whole batch
    token_ids: list[list[int]] | None = None  # the generated ids of each row, for parity checks between runners
    speculation: SpeculationStats | None = None  # with a draft: verify passes, tokens proposed and accepted


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
    """Our generation loop over any ``Backend`` (with the real tokenizer when given: streaming text is part
    of what a user's generation costs)."""

    def __init__(
        self,
        name: str,
        backend: Backend,
        traffic: StepBytes | None = None,
        *,
        sampling: Sampling = GREEDY,
        tokenizer: TokenizerLike | None = None,
        draft: Draft | None = None,
        draft_tokens: int = DRAFT_TOKENS,
    ) -> None:
        self.name, self.backend, self.traffic, self.sampling = name, backend, traffic, sampling
        self.tokenizer = tokenizer or IdsTokenizer(backend.spec.vocab_size)
        self.draft, self.draft_tokens = draft, draft_tokens

    def with_sampling(self, sampling: Sampling) -> LoopRunner:
        return LoopRunner(
            self.name,
            self.backend,
            self.traffic,
            sampling=sampling,
            tokenizer=self.tokenizer,
            draft=self.draft,
            draft_tokens=self.draft_tokens,
        )

    def run(self, prompts: np.ndarray, new_tokens: int) -> Timing:
        stats = GenerationStats()
        config = self.sampling.config(new_tokens)
        results = generate(
            self.backend,
            prompts.tolist(),
            config,
            self.tokenizer,
            stats=stats,
            draft=self.draft,
            draft_tokens=self.draft_tokens,
        )
        ids = [r.token_ids for r in results]
        return Timing(stats.first_token_s, list(stats.step_s), stats.new_tokens, ids, stats.speculation)


class HFGenerateRunner:
    """transformers' own ``generate()``: what users of the seed scripts run today. The one way this project
    times it: a logits processor stamps the clock once per step, right after that step's forward pass, so the
    first stamp is the time to first token and the gaps between stamps are the decode steps."""

    name = "hf-generate"

    def __init__(self, model, traffic: StepBytes | None = None, *, sampling: Sampling = GREEDY) -> None:
        self.model, self.traffic, self.sampling = model, traffic, sampling

    def with_sampling(self, sampling: Sampling) -> HFGenerateRunner | None:
        """The same runner sampling like ``sampling`` (None: transformers has no presence/frequency penalty)."""
        settings = dict(sampling.settings)
        if settings.get("presence_penalty") or settings.get("frequency_penalty"):
            return None
        return HFGenerateRunner(self.model, self.traffic, sampling=sampling)

    def _sampling_kwargs(self) -> dict:
        if self.sampling.greedy:
            return {"do_sample": False}
        settings = {**CLI_DEFAULTS, **dict(self.sampling.settings)}
        # top_k always: transformers' own default is 50, ours is off
        kwargs = {"do_sample": True, "temperature": settings["temperature"], "top_p": settings["top_p"], "top_k": 0}
        for key in ("top_k", "min_p", "typical_p"):  # transformers' names
            if key in settings:
                kwargs[key] = settings[key]
        for key in ("repetition_penalty", "no_repeat_ngram_size"):
            if key in settings:
                kwargs[key] = settings[key]
        return kwargs

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
                **self._sampling_kwargs(),
                eos_token_id=None,
                pad_token_id=IdsTokenizer.pad_id,
                logits_processor=LogitsProcessorList([_Clock()]),
            )
        generated = out[:, prompts.shape[1] :].tolist()
        return Timing(stamps[0] - start, list(np.diff(stamps)), new_tokens * len(prompts), generated)
