"""Zero-shot classification by likelihood, the method of the CPM paper and CPM-Generate's zero-shot scripts:
fill a prompt template with each candidate, score each filled text by its mean next-token loss under
the model, and pick the candidate with the lowest loss. No training, no label words in the model.

Examples are JSONL, one object per line::

    {"text": "...", "candidates": ["体育", "财经"], "label": "体育"}

``label`` (a candidate or its index) is optional: with labels the result has an accuracy. The template
uses ``{candidate}`` and any field of the example (``{text}``, ``{question}``...); a line may carry its
own ``template``. ``scope``: ``all`` averages the loss over every predicted token of the filled text (the
CPM paper: the combination with the lowest perplexity wins); ``candidate`` averages it from the
candidate's first token to the end (the part that differs between candidates and what follows it).
The text is tokenized as two pieces split where the candidate starts, so that boundary is exact.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from cpm_infer.backends.base import Backend
from cpm_infer.eval.logprobs import EvalError, token_logprobs
from cpm_infer.tokenizer import CpmTokenizer

SCOPES = ("all", "candidate")
DEFAULT_TEMPLATE = "{text}{candidate}"
_MARK = "\x00candidate\x00"


@dataclass
class Example:
    fields: dict[str, Any]
    candidates: list[str]
    label: int | None
    template: str | None
    where: str


@dataclass
class ExampleScore:
    where: str
    losses: list[float]  # mean loss (nats/token) per candidate
    predicted: int
    label: int | None

    @property
    def correct(self) -> bool | None:
        return None if self.label is None else self.predicted == self.label


@dataclass
class ZeroShotResult:
    scores: list[ExampleScore] = field(default_factory=list)
    scope: str = "all"

    @property
    def accuracy(self) -> float | None:
        labelled = [s for s in self.scores if s.label is not None]
        return sum(bool(s.correct) for s in labelled) / len(labelled) if labelled else None

    def to_dict(self) -> dict:
        examples = [{**asdict(s), "correct": s.correct} for s in self.scores]
        return {"scope": self.scope, "accuracy": self.accuracy, "examples": examples}


def read_examples(path: str | os.PathLike[str]) -> list[Example]:
    path = Path(path)
    if not path.is_file():
        raise EvalError(f"examples file not found: {path}")
    try:
        lines = path.read_bytes().decode("utf-8-sig").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise EvalError(f"cannot read {path} as UTF-8 text: {exc}") from exc
    examples = [_example(line, f"{path}:{n}") for n, line in enumerate(lines, 1) if line.strip()]
    if not examples:
        raise EvalError(f"{path} holds no examples")
    return examples


def _example(line: str, where: str) -> Example:
    try:
        record = json.loads(line)
    except json.JSONDecodeError as exc:
        raise EvalError(f"{where}: not a JSON object: {exc.msg}") from exc
    if not isinstance(record, dict):
        raise EvalError(f"{where}: not a JSON object")
    candidates = record.get("candidates")
    if not isinstance(candidates, list) or len(candidates) < 2 or not all(isinstance(c, str) and c for c in candidates):
        raise EvalError(f'{where}: "candidates" must be a list of at least 2 non-empty strings')
    label = record.get("label")
    if label is not None:
        if isinstance(label, str) and label in candidates:
            label = candidates.index(label)
        elif not (isinstance(label, int) and not isinstance(label, bool) and 0 <= label < len(candidates)):
            raise EvalError(f'{where}: "label" {label!r} is neither one of the candidates nor an index into them')
    template = record.get("template")
    fields = {k: v for k, v in record.items() if k not in ("candidates", "label", "template")}
    return Example(fields, candidates, label, template if isinstance(template, str) else None, where)


def split_template(template: str, example: Example) -> tuple[str, str]:
    """The filled template as (text before the candidate, text from the candidate's slot on) with the
    slot still marked; one ``{candidate}`` exactly."""
    if template.count("{candidate}") != 1:
        raise EvalError(f"the template must contain {{candidate}} exactly once: {template!r}")
    try:
        filled = template.format_map({**example.fields, "candidate": _MARK})
    except (KeyError, IndexError, ValueError) as exc:
        raise EvalError(
            f"{example.where}: the template {template!r} cannot be filled: {type(exc).__name__} {exc}"
        ) from exc
    before, _, after = filled.partition(_MARK)
    return before, after


def score_examples(
    backend: Backend,
    tokenizer: CpmTokenizer,
    examples: list[Example],
    *,
    template: str | None = None,
    scope: str = "all",
) -> ZeroShotResult:
    if scope not in SCOPES:
        raise EvalError(f"unknown scope {scope!r}; use one of {', '.join(SCOPES)}")
    result = ZeroShotResult(scope=scope)
    for example in examples:
        before, after = split_template(example.template or template or DEFAULT_TEMPLATE, example)
        head = tokenizer.encode(before) if before else []
        losses = []
        for candidate in example.candidates:
            ids = head + tokenizer.encode(candidate + after)
            if len(ids) < 2:
                raise EvalError(f"{example.where}: candidate {candidate!r} gives fewer than 2 tokens to score")
            if len(ids) > backend.spec.n_positions:
                raise EvalError(
                    f"{example.where}: {len(ids)} tokens exceed the model's context of {backend.spec.n_positions}"
                )
            logprobs = token_logprobs(backend, np.array([ids], dtype=np.int64))[0]  # [j] predicts token j + 1
            kept = logprobs[max(0, len(head) - 1) :] if scope == "candidate" else logprobs
            losses.append(float(-kept.mean()))
        result.scores.append(ExampleScore(example.where, losses, int(np.argmin(losses)), example.label))
    return result
