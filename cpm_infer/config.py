"""Model shapes (with CPM presets) and the one validated generation config shared by CLI and library."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields, replace
from typing import Any

from cpm_infer.errors import CpmError


class ConfigError(CpmError, ValueError):
    """An out-of-range or inconsistent setting."""


MAX_LOGPROBS = 20  # alternatives per step (OpenAI's limit)


@dataclass(frozen=True)
class ModelSpec:
    """The shape of a GPT-2 model: all a runtime needs to size buffers and check inputs."""

    n_layer: int
    n_head: int
    n_embd: int
    vocab_size: int = 30000
    n_positions: int = 1024

    def __post_init__(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            if not isinstance(value, int) or value <= 0:
                raise ConfigError(f"model spec: {f.name} must be a positive integer, got {value!r}")
        if self.n_embd % self.n_head:
            raise ConfigError(f"model spec: n_embd {self.n_embd} is not divisible by n_head {self.n_head}")

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head

    def parameter_count(self) -> int:
        """Parameters of GPT2LMHeadModel with a tied LM head."""
        d, v, p, n = self.n_embd, self.vocab_size, self.n_positions, self.n_layer
        per_layer = 2 * 2 * d + (d * 3 * d + 3 * d) + (d * d + d) + (d * 4 * d + 4 * d) + (4 * d * d + d)
        return v * d + p * d + n * per_layer + 2 * d

    def to_dict(self) -> dict[str, int]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ModelSpec:
        return cls(**{f.name: data[f.name] for f in fields(cls) if f.name in data})


# CPM-Generate's released sizes (TsinghuaAI): vocab 30000, context 1024.
PRESETS: dict[str, ModelSpec] = {
    "small": ModelSpec(n_layer=12, n_head=12, n_embd=768),
    "medium": ModelSpec(n_layer=24, n_head=16, n_embd=1024),
    "large": ModelSpec(n_layer=32, n_head=32, n_embd=2560),
}


def preset(name: str) -> ModelSpec:
    try:
        return PRESETS[name]
    except KeyError as exc:
        raise ConfigError(f"unknown preset {name!r}; choose one of {', '.join(PRESETS)}") from exc


@dataclass(frozen=True)
class GenerationConfig:
    """How to generate. Immutable and validated on construction; ``replace()`` derives variants.

    temperature 0 means greedy decoding (top_k/top_p are then irrelevant). ``ban_unk`` bans
    ``<unk>`` as CPM's original generate script does; ``banned_ids`` adds more.

    Penalties: ``repetition_penalty`` (CTRL, over prompt + generated ids), ``presence_penalty`` and
    ``frequency_penalty`` (OpenAI: ``logit -= presence * (count > 0) + frequency * count`` over the
    generated ids), ``no_repeat_ngram_size`` (transformers: an n-gram never occurs twice in prompt +
    generated ids). ``logprobs`` = N asks for the chosen token's log-probability and the N most likely
    alternatives at each step (the model's distribution, before penalties and temperature).
    ``num_beams`` > 1 is deterministic beam search (temperature 0), returning the
    ``num_return_sequences`` best beams of each prompt.
    """

    max_new_tokens: int = 100
    min_new_tokens: int = 0
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 0.9
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    no_repeat_ngram_size: int = 0
    ban_unk: bool = True
    banned_ids: tuple[int, ...] = ()
    stop_strings: tuple[str, ...] = ()
    seed: int | None = 0
    num_samples: int = 1
    ignore_eos: bool = False
    logprobs: int | None = None
    num_beams: int = 1
    length_penalty: float = 1.0
    early_stopping: bool = False
    num_return_sequences: int = 1

    def __post_init__(self) -> None:
        def check(ok: bool, message: str) -> None:
            if not ok:
                raise ConfigError(message)

        check(
            _is_int(self.max_new_tokens) and self.max_new_tokens >= 1,
            f"max_new_tokens must be >= 1, got {self.max_new_tokens!r}",
        )
        check(
            _is_int(self.min_new_tokens) and 0 <= self.min_new_tokens <= self.max_new_tokens,
            f"min_new_tokens must be between 0 and max_new_tokens ({self.max_new_tokens}), got {self.min_new_tokens!r}",
        )
        check(
            _is_num(self.temperature) and self.temperature >= 0,
            f"temperature must be >= 0 (0 = greedy), got {self.temperature!r}",
        )
        check(_is_int(self.top_k) and self.top_k >= 0, f"top_k must be >= 0 (0 = off), got {self.top_k!r}")
        check(_is_num(self.top_p) and 0 < self.top_p <= 1, f"top_p must be in (0, 1] (1 = off), got {self.top_p!r}")
        check(
            _is_num(self.repetition_penalty) and self.repetition_penalty > 0,
            f"repetition_penalty must be > 0 (1 = off), got {self.repetition_penalty!r}",
        )
        for name in ("presence_penalty", "frequency_penalty"):
            value = getattr(self, name)
            check(_is_num(value) and -2 <= value <= 2, f"{name} must be between -2 and 2 (0 = off), got {value!r}")
        check(
            _is_int(self.no_repeat_ngram_size) and self.no_repeat_ngram_size >= 0,
            f"no_repeat_ngram_size must be >= 0 (0 = off), got {self.no_repeat_ngram_size!r}",
        )
        check(
            all(_is_int(i) and i >= 0 for i in self.banned_ids),
            f"banned_ids must be non-negative integers, got {self.banned_ids!r}",
        )
        check(all(isinstance(s, str) and s for s in self.stop_strings), "stop_strings must be non-empty strings")
        check(
            self.seed is None or (_is_int(self.seed) and self.seed >= 0),
            f"seed must be a non-negative integer, got {self.seed!r}",
        )
        check(
            _is_int(self.num_samples) and self.num_samples >= 1, f"num_samples must be >= 1, got {self.num_samples!r}"
        )
        check(
            self.logprobs is None or (_is_int(self.logprobs) and 0 <= self.logprobs <= MAX_LOGPROBS),
            f"logprobs must be between 0 and {MAX_LOGPROBS} (or None = off), got {self.logprobs!r}",
        )
        self._check_beams(check)
        # Frozen dataclass: normalise sequences to tuples so configs hash and compare by value.
        object.__setattr__(self, "banned_ids", tuple(int(i) for i in self.banned_ids))
        object.__setattr__(self, "stop_strings", tuple(self.stop_strings))

    def _check_beams(self, check: Any) -> None:
        check(_is_int(self.num_beams) and self.num_beams >= 1, f"num_beams must be >= 1, got {self.num_beams!r}")
        check(_is_num(self.length_penalty), f"length_penalty must be a finite number, got {self.length_penalty!r}")
        check(
            isinstance(self.early_stopping, bool), f"early_stopping must be true or false, got {self.early_stopping!r}"
        )
        check(
            _is_int(self.num_return_sequences) and 1 <= self.num_return_sequences <= self.num_beams,
            f"num_return_sequences must be between 1 and num_beams ({self.num_beams}), "
            f"got {self.num_return_sequences!r}",
        )
        if self.num_beams == 1:
            return
        beams = f"beam search (num_beams {self.num_beams}) is deterministic"
        check(self.temperature == 0, f"{beams}: it cannot sample (temperature must be 0, got {self.temperature!r})")
        check(self.num_samples == 1, f"{beams}: use num_return_sequences instead of num_samples")
        check(not self.stop_strings, f"{beams}: stop_strings are not supported with beams")
        check(self.logprobs is None, f"{beams}: logprobs are not supported with beams")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    @property
    def beam_search(self) -> bool:
        return self.num_beams > 1

    def replace(self, **changes: Any) -> GenerationConfig:
        return replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["banned_ids"] = list(self.banned_ids)
        data["stop_strings"] = list(self.stop_strings)
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> GenerationConfig:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ConfigError(f"unknown generation setting(s): {', '.join(unknown)}")
        values = dict(data)
        for key in ("banned_ids", "stop_strings"):
            if key in values:
                values[key] = tuple(values[key])
        return cls(**values)


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_num(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
