"""TensorRT optimization profiles, derived from the KV contract's dynamic axes (``cpm_infer.kv``).

One engine, two profiles:

- profile 0, **prefill**: ``seq`` 1..max_input, ``past`` exactly 0, ``total`` = ``seq``.
- profile 1, **decode**: ``seq`` exactly 1, ``past`` 1..max_total-1, ``total`` = ``past`` + 1.

Why two profiles and not one: TensorRT picks kernels for each profile's ``opt`` shape. Prefill is a
batch of long GEMMs (``seq`` rows per sequence), decode is GEMV-like with one row and a long past;
a single profile would tune one phase at the other's expense. Why not two engines: the profiles of
one engine share its weights, so GPU memory holds one copy, and one build times both phases.

The zero-length ``past`` of prefill is an empty tensor. TensorRT accepts empty tensors (developer
guide, "Working with Empty Tensors": zero-length dimensions follow the ordinary rules, e.g. a concat
with an empty input is the other input) provided an empty I/O tensor is still bound to a non-null
address; the runtime binds a preallocated KV buffer there. (Stated from the documentation: no GPU
was available where this was written.)
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from cpm_infer import kv
from cpm_infer.config import ModelSpec
from cpm_infer.errors import CpmError

PREFILL, DECODE = 0, 1
PROFILE_NAMES = ("prefill", "decode")
DIMS = (kv.BATCH, kv.SEQ, kv.PAST, kv.TOTAL)


class ProfileError(CpmError):
    """Engine limits that cannot form valid profiles, or inputs outside the engine's profiles."""


@dataclass(frozen=True)
class DimRange:
    min: int
    opt: int
    max: int

    def __post_init__(self) -> None:
        if not 0 <= self.min <= self.opt <= self.max:
            raise ProfileError(f"invalid profile range min={self.min} opt={self.opt} max={self.max}")

    def contains(self, value: int) -> bool:
        return self.min <= value <= self.max

    def to_list(self) -> list[int]:
        return [self.min, self.opt, self.max]


@dataclass(frozen=True)
class Profile:
    """Ranges of the symbolic dimensions (``batch``, ``seq``, ``past``, ``total``) of one phase."""

    name: str
    dims: dict[str, DimRange]

    def shapes(self, spec: ModelSpec) -> dict[str, tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]]:
        """(min, opt, max) shape of every graph input, for ``IOptimizationProfile.set_shape``."""
        return {name: _input_shapes(spec, name, self.dims) for name in kv.input_names(spec.n_layer)}

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "dims": {d: r.to_list() for d, r in self.dims.items()}}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Profile:
        try:
            return cls(str(data["name"]), {str(d): DimRange(*map(int, r)) for d, r in data["dims"].items()})
        except (KeyError, TypeError, ValueError) as exc:
            raise ProfileError(f"malformed profile in manifest: {exc}") from exc


@dataclass(frozen=True)
class EngineLimits:
    """The user-facing limits an engine is built for (``--max-batch/--max-input/--max-total``)."""

    max_batch: int
    max_input: int
    max_total: int

    def check(self, spec: ModelSpec) -> None:
        if self.max_batch < 1:
            raise ProfileError(f"--max-batch must be at least 1, got {self.max_batch}")
        if self.max_input < 1:
            raise ProfileError(f"--max-input must be at least 1, got {self.max_input}")
        if self.max_total > spec.n_positions:
            raise ProfileError(
                f"--max-total {self.max_total} exceeds the model's context of {spec.n_positions} positions"
            )
        if self.max_total <= self.max_input:
            raise ProfileError(
                f"--max-total {self.max_total} must exceed --max-input {self.max_input} (room for at least "
                "one new token)"
            )

    def to_dict(self) -> dict[str, int]:
        return {"max_batch": self.max_batch, "max_input": self.max_input, "max_total": self.max_total}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> EngineLimits:
        try:
            return cls(int(data["max_batch"]), int(data["max_input"]), int(data["max_total"]))
        except (KeyError, TypeError, ValueError) as exc:
            raise ProfileError(f"manifest lacks valid engine limits: {exc}") from exc


def make_profiles(spec: ModelSpec, limits: EngineLimits, *, opt_batch: int = 1, opt_input: int = 128) -> list[Profile]:
    """[prefill, decode] for ``limits``. ``opt`` favours batch-1 latency and short prompts: the
    shapes an interactive ``cpm generate`` sees most."""
    limits.check(spec)
    batch = DimRange(1, min(max(opt_batch, 1), limits.max_batch), limits.max_batch)
    seq_opt = min(opt_input, limits.max_input)
    past_opt = max(1, min(limits.max_total - 1, limits.max_total // 2))
    prefill = {
        kv.BATCH: batch,
        kv.SEQ: DimRange(1, seq_opt, limits.max_input),
        kv.PAST: DimRange(0, 0, 0),
        kv.TOTAL: DimRange(1, seq_opt, limits.max_input),
    }
    decode = {
        kv.BATCH: batch,
        kv.SEQ: DimRange(1, 1, 1),
        kv.PAST: DimRange(1, past_opt, limits.max_total - 1),
        kv.TOTAL: DimRange(2, past_opt + 1, limits.max_total),
    }
    return [Profile(PROFILE_NAMES[PREFILL], prefill), Profile(PROFILE_NAMES[DECODE], decode)]


def _static_shape(spec: ModelSpec, name: str) -> tuple[int, ...]:
    """The input's shape with -1 where the contract has a dynamic axis."""
    if name in (kv.INPUT_IDS, kv.ATTENTION_MASK, kv.POSITION_IDS):
        return (-1, -1)
    return kv.kv_shape(spec, -1, -1)


def _input_shapes(spec: ModelSpec, name: str, dims: dict[str, DimRange]):
    axes = kv.dynamic_axes(spec.n_layer)[name]
    static = _static_shape(spec, name)
    shapes: list[tuple[int, ...]] = []
    for pick in ("min", "opt", "max"):
        shape = []
        for i, size in enumerate(static):
            if i in axes:
                shape.append(getattr(dims[axes[i]], pick))
            elif size < 0:
                raise ProfileError(f"input {name} axis {i} is dynamic but has no name in cpm_infer.kv.dynamic_axes")
            else:
                shape.append(size)
        shapes.append(tuple(shape))
    return shapes[0], shapes[1], shapes[2]


def check_fits(profile: Profile, *, batch: int, seq: int, past: int) -> None:
    """Raise a one-line ProfileError if a call's shapes fall outside ``profile`` (before TensorRT does)."""
    values = {kv.BATCH: batch, kv.SEQ: seq, kv.PAST: past, kv.TOTAL: past + seq}
    flags = {kv.BATCH: "--max-batch", kv.SEQ: "--max-input", kv.PAST: "--max-total", kv.TOTAL: "--max-total"}
    what = {kv.BATCH: "a batch of", kv.SEQ: "a prompt of", kv.PAST: "a past of", kv.TOTAL: "a total length of"}
    for dim in DIMS:
        rng = profile.dims[dim]
        if not rng.contains(values[dim]):
            if values[dim] > rng.max:
                raise ProfileError(
                    f"{what[dim]} {values[dim]} exceeds the engine's {profile.name} limit of {rng.max}; "
                    f"rebuild the engine with a larger {flags[dim]}"
                )
            raise ProfileError(
                f"{profile.name}: {dim} {values[dim]} is outside the engine profile {rng.min}..{rng.max}"
            )
