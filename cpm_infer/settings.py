"""One declaration of every generation setting: name, type, default, range, help, the front doors that take
it and whether beam search uses it. Everything else is derived from ``SETTINGS``:

- ``GenerationConfig`` (``cpm_infer.config``): its fields, defaults and range checks;
- the options of ``cpm generate`` and ``cpm batch`` (``cpm_infer.cli.gen_options``);
- the request fields of ``POST /v1/completions`` with their OpenAPI ranges (``cpm_infer.serve.schemas``);
- the keys of ``cpm bench --sampling`` (``cpm_infer.bench.runners``).

Adding a setting is one ``Setting`` here plus, where it changes the logits, its processor in
``cpm_infer.engine.processors`` (``tests/test_settings.py`` proves it reaches every door it names).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

DOORS = frozenset({"generate", "batch", "serve", "bench"})
CLI = frozenset({"generate", "batch"})
REQUEST = CLI | {"serve"}  # most settings: the bench's --sampling takes only what changes the choice of tokens
MAX_LOGPROBS = 20  # alternatives per step (OpenAI's limit)
MAX_BIAS = 100.0  # OpenAI's logit_bias range; -100 bans the token
# Speculative decoding (--draft-tokens of cpm generate, cpm serve, cpm bench; cpm_infer.engine.speculative): the most
# tokens a draft proposes per pass by default and at all, and the k a row starts with (it then adapts).
DRAFT_TOKENS, MAX_DRAFT_TOKENS, FIRST_K = 8, 16, 4
DRAFT_TOKENS_HELP = (
    f"Most tokens the draft proposes per pass (a row starts at {FIRST_K}: +1 after a pass that accepted all, -1 "
    "after one that did not)."
)

_SAME = object()  # "as the setting's default"


@dataclass(frozen=True)
class Range:
    """Bounds of a number (None = unbounded), as JSON Schema and pydantic say them."""

    ge: float | None = None
    gt: float | None = None
    le: float | None = None
    lt: float | None = None

    def contains(self, value: float) -> bool:
        return (
            (self.ge is None or value >= self.ge)
            and (self.gt is None or value > self.gt)
            and (self.le is None or value <= self.le)
            and (self.lt is None or value < self.lt)
        )

    def describe(self) -> str:
        low, high = _num(self.ge if self.ge is not None else self.gt), _num(self.le if self.le is not None else self.lt)
        if self.ge is not None and self.le is not None:
            return f"between {low} and {high}"
        if low is not None and high is not None:
            return f"in {'[' if self.ge is not None else '('}{low}, {high}{']' if self.le is not None else ')'}"
        if low is not None:
            return f"{'>=' if self.ge is not None else '>'} {low}"
        return f"{'<=' if self.le is not None else '<'} {high}" if high is not None else "a finite number"

    def pydantic(self) -> dict[str, float]:
        return {k: v for k, v in (("ge", self.ge), ("gt", self.gt), ("le", self.le), ("lt", self.lt)) if v is not None}


@dataclass(frozen=True)
class Setting:
    """One generation setting.

    ``kind``: int, float, bool, ids (token ids), strings, or bias (token id -> float). ``optional``: None is a
    value (off, or a random seed). ``beams``: "yes" (beam search uses it), "ignored" (a sampling setting with no
    effect on beams; the CLI refuses it there) or "no" (beam search refuses any value but ``beam_value``).
    ``doors``: the front doors that take it. ``flag``/``api``: the name on the command line / in the request
    where it differs; ``api_range``/``api_default``: the HTTP API's own (OpenAI's) where they differ.
    """

    name: str
    kind: str
    default: Any
    help: str
    range: Range = Range()
    optional: bool = False
    off: str = ""  # what the neutral value means, e.g. "0 = off"
    beams: str = "yes"
    beam_value: Any = _SAME
    doors: frozenset[str] = REQUEST
    flag: str | None = None
    short: str | None = None
    api: str | None = None
    api_range: Range | None = None
    api_default: Any = _SAME
    api_nullable: bool = False  # null in a request means the default (OpenAI's sampling fields)
    api_note: str = ""  # what the request's default means, where it is not the CLI's
    max_items: int = 1024  # ids, strings, bias: the longest list a request may send
    metavar: str | None = None

    @property
    def cli_flag(self) -> str:
        return self.flag or "--" + self.name.replace("_", "-")

    @property
    def api_name(self) -> str:
        return self.api or self.name

    @property
    def request_default(self) -> Any:
        return self.default if self.api_default is _SAME else self.api_default

    @property
    def beam_default(self) -> Any:
        return self.default if self.beam_value is _SAME else self.beam_value

    @property
    def annotation(self) -> Any:
        """The Python type of the config's field."""
        base = _TYPES[self.kind]
        return base | None if self.optional else base

    @property
    def numeric(self) -> bool:
        return self.kind in ("int", "float")

    def check(self, value: Any) -> str | None:
        """Why ``value`` is not valid for this setting, or None."""
        if value is None and self.optional:
            return None
        if self.kind == "bool":
            return None if isinstance(value, bool) else f"{self.name} must be true or false, got {value!r}"
        if self.kind == "ids":
            ok = all(_is_int(i) and i >= 0 for i in value)
            return None if ok else f"{self.name} must be non-negative integers, got {value!r}"
        if self.kind == "strings":
            return None if all(isinstance(s, str) and s for s in value) else f"{self.name} must be non-empty strings"
        if self.kind == "bias":
            value = list(value.items()) if isinstance(value, dict) else value
            ok = all(_is_int(i) and i >= 0 and _is_num(b) and -MAX_BIAS <= b <= MAX_BIAS for i, b in value)
            return None if ok else f"{self.name} must map token ids to biases between -100 and 100, got {value!r}"
        typed = _is_int(value) if self.kind == "int" else _is_num(value)
        if typed and self.range.contains(value):
            return None
        note = [self.off] if self.off else []
        if self.optional:
            note.append("or None = off")
        extra = f" ({', '.join(note)})" if note else ""
        return f"{self.name} must be {self.range.describe()}{extra}, got {value!r}"

    def normalise(self, value: Any) -> Any:
        """The config's frozen form: tuples for lists (configs hash and compare by value)."""
        if self.kind == "ids":
            return tuple(int(i) for i in value)
        if self.kind == "strings":
            return tuple(value)
        if self.kind == "bias":
            items = value.items() if isinstance(value, dict) else value
            return tuple(sorted((int(i), float(b)) for i, b in items))
        return value


S = Setting
SETTINGS: tuple[Setting, ...] = (
    S(
        "max_new_tokens",
        "int",
        100,
        "New tokens per sample.",
        Range(ge=1),
        short="-n",
        api="max_tokens",
        api_default=None,
        api_note="omitted = the server's --default-max-new-tokens",
    ),
    S(
        "min_new_tokens",
        "int",
        0,
        "Generate at least this many tokens before <eod> may end a sample (at most max_new_tokens).",
        Range(ge=0),
        api="min_tokens",
    ),
    S(
        "temperature",
        "float",
        1.0,
        "Divide the logits by this before sampling.",
        Range(ge=0),
        off="0 = greedy",
        short="-t",
        beams="no",
        beam_value=0.0,
        api_range=Range(ge=0, le=2),
        api_nullable=True,
        doors=DOORS,
    ),
    S(
        "top_k",
        "int",
        0,
        "Sample among the k most likely tokens.",
        Range(ge=0),
        off="0 = off",
        beams="ignored",
        doors=DOORS,
    ),
    S(
        "top_p",
        "float",
        0.9,
        "Sample among the most likely tokens whose mass reaches p (nucleus).",
        Range(gt=0, le=1),
        off="1 = off",
        beams="ignored",
        beam_value=1.0,
        api_nullable=True,
        doors=DOORS,
    ),
    S(
        "min_p",
        "float",
        0.0,
        "Drop tokens less likely than min_p times the most likely one (after temperature).",
        Range(ge=0, le=1),
        off="0 = off",
        beams="ignored",
        doors=DOORS,
    ),
    S(
        "typical_p",
        "float",
        1.0,
        "Locally typical sampling: keep the tokens whose surprise is closest to the entropy, up to this mass.",
        Range(gt=0, le=1),
        off="1 = off",
        beams="ignored",
        doors=DOORS,
    ),
    S(
        "repetition_penalty",
        "float",
        1.0,
        "CTRL-style penalty on every token of the prompt and the text so far.",
        Range(gt=0),
        off="1 = off",
        api_range=Range(gt=0, le=100),
        doors=DOORS,
    ),
    S(
        "presence_penalty",
        "float",
        0.0,
        "Subtracted once from the logit of every token generated so far.",
        Range(ge=-2, le=2),
        off="0 = off",
        api_nullable=True,
        doors=DOORS,
    ),
    S(
        "frequency_penalty",
        "float",
        0.0,
        "Subtracted from a token's logit once per time it was generated.",
        Range(ge=-2, le=2),
        off="0 = off",
        api_nullable=True,
        doors=DOORS,
    ),
    S(
        "no_repeat_ngram_size",
        "int",
        0,
        "Never repeat an n-gram of this size (prompt and text so far).",
        Range(ge=0),
        off="0 = off",
        api_range=Range(ge=0, le=64),
        doors=DOORS,
    ),
    S(
        "logit_bias",
        "bias",
        (),
        "Added to a token's logit before sampling, as ID=BIAS (repeatable); -100 bans the token.",
        flag="--logit-bias",
        metavar="ID=BIAS",
        max_items=300,  # OpenAI's limit
        api_default=None,
    ),
    S("ban_unk", "bool", True, "Never generate <unk> (as CPM's own generate script).", flag="--ban-unk/--allow-unk"),
    S("banned_ids", "ids", (), "Token id never to generate (repeatable).", flag="--ban-id"),
    S(
        "stop_strings",
        "strings",
        (),
        "Stop at this string (repeatable).",
        flag="--stop",
        api="stop",
        beams="no",
        max_items=4,  # OpenAI's limit
        api_default=None,
    ),
    S(
        "stop_token_ids",
        "ids",
        (),
        "Stop once this token id is generated, keeping it (repeatable; vLLM's stop_token_ids).",
        flag="--stop-token-id",
        beams="no",
        max_items=64,
    ),
    S(
        "seed",
        "int",
        0,
        "Prompt i, sample s is seeded by (seed, i, s): same seed, same text.",
        Range(ge=0),
        optional=True,
        api_default=None,
        api_range=Range(ge=0, le=2**53 - 1),  # integers every JSON client reads exactly (I-JSON)
        api_note="omitted = a fresh random seed",
    ),
    S("num_samples", "int", 1, "Samples per prompt.", Range(ge=1), api="n", beams="no", api_nullable=True),
    S("ignore_eos", "bool", False, "Do not stop at <eod>."),
    S(
        "logprobs",
        "int",
        None,
        "Per token: its log-probability and the N most likely alternatives (JSONL output).",
        Range(ge=0, le=MAX_LOGPROBS),
        optional=True,
        beams="no",
    ),
    S("num_beams", "int", 1, "Beam search with this many beams.", Range(ge=1), off="1 = off", doors=CLI),
    S(
        "length_penalty",
        "float",
        1.0,
        "Beam score = log-probability sum / length ** this.",
        Range(),
        doors=CLI,
    ),
    S("early_stopping", "bool", False, "Beam search ends once num_beams hypotheses are done.", doors=CLI),
    S("num_return_sequences", "int", 1, "Best beams returned per prompt.", Range(ge=1), doors=CLI),
)
del S
BY_NAME: dict[str, Setting] = {s.name: s for s in SETTINGS}


def for_door(door: str) -> tuple[Setting, ...]:
    """The settings ``door`` takes, in declaration order."""
    if door not in DOORS:
        raise ValueError(f"unknown front door {door!r}")
    return tuple(s for s in SETTINGS if door in s.doors)


_TYPES: dict[str, Any] = {
    "int": int,
    "float": float,
    "bool": bool,
    "ids": tuple[int, ...],
    "strings": tuple[str, ...],
    "bias": tuple[tuple[int, float], ...],
}


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_num(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _num(value: float | None) -> str | None:
    if value is None:
        return None
    return str(int(value)) if float(value).is_integer() else str(value)


__all__ = ["BY_NAME", "DOORS", "MAX_BIAS", "MAX_LOGPROBS", "SETTINGS", "Range", "Setting", "for_door"]
