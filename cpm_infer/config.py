"""Model shapes (with CPM presets) and the one validated generation config shared by CLI and library."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields, make_dataclass, replace
from dataclasses import field as dataclass_field
from typing import Any

from cpm_infer.errors import CpmError
from cpm_infer.settings import BY_NAME, MAX_LOGPROBS, SETTINGS


class ConfigError(CpmError, ValueError):
    """An out-of-range or inconsistent setting."""


__all__ = ["MAX_LOGPROBS", "ConfigError", "GenerationConfig", "ModelSpec", "preset"]


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


class _GenerationConfigBase:
    """How to generate. Immutable and validated on construction; ``replace()`` derives variants. Its fields,
    defaults and ranges are the declaration in ``cpm_infer.settings`` (each field's help is there).

    temperature 0 means greedy decoding (top_k/top_p/min_p are then irrelevant). ``ban_unk`` bans ``<unk>`` as
    CPM's original generate script does; ``banned_ids`` adds more. ``logprobs`` = N asks for the chosen token's
    log-probability and the N most likely alternatives at each step (the model's distribution, before
    penalties and temperature). ``num_beams`` > 1 is deterministic beam search (temperature 0), returning the
    ``num_return_sequences`` best beams of each prompt.
    """

    def __post_init__(self) -> None:
        for setting in SETTINGS:
            problem = setting.check(getattr(self, setting.name))
            if problem:
                raise ConfigError(problem)
            # Frozen dataclass: sequences become tuples so configs hash and compare by value.
            object.__setattr__(self, setting.name, setting.normalise(getattr(self, setting.name)))
        if self.min_new_tokens > self.max_new_tokens:
            raise ConfigError(
                f"min_new_tokens must be between 0 and max_new_tokens ({self.max_new_tokens}), "
                f"got {self.min_new_tokens!r}"
            )
        if self.num_return_sequences > self.num_beams:
            raise ConfigError(
                f"num_return_sequences must be between 1 and num_beams ({self.num_beams}), "
                f"got {self.num_return_sequences!r}"
            )
        if self.num_beams > 1:
            self._check_beams()

    def _check_beams(self) -> None:
        beams = f"beam search (num_beams {self.num_beams}) is deterministic"
        for setting in SETTINGS:
            value = getattr(self, setting.name)
            if setting.beams != "no" or value == setting.beam_default:
                continue
            if setting.name == "temperature":
                raise ConfigError(f"{beams}: it cannot sample (temperature must be 0, got {value!r})")
            if setting.name == "num_samples":
                raise ConfigError(f"{beams}: use num_return_sequences instead of num_samples")
            raise ConfigError(f"{beams}: {setting.name} is not supported with beams")

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
        for setting in SETTINGS:
            if setting.kind in ("ids", "strings", "bias"):
                data[setting.name] = [list(v) if setting.kind == "bias" else v for v in data[setting.name]]
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> GenerationConfig:
        unknown = sorted(set(data) - set(BY_NAME))
        if unknown:
            raise ConfigError(f"unknown generation setting(s): {', '.join(unknown)}")
        return cls(**data)


GenerationConfig = make_dataclass(
    "GenerationConfig",
    [(s.name, s.annotation, dataclass_field(default=s.default)) for s in SETTINGS],
    bases=(_GenerationConfigBase,),
    frozen=True,
)
GenerationConfig.__module__ = __name__  # pickles (Ray ships configs to actors) by this module's name
GenerationConfig.__doc__ = _GenerationConfigBase.__doc__


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_num(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
