"""A bulk generation job: what it runs, where it writes, and what a rerun may skip.

The output is a directory: ``job.json`` (the model, the generation settings and the inputs' hashes) and part
files ``part-START-END.jsonl`` (or ``.parquet``), each holding every sample of the prompts START..END-1 and
written atomically. A rerun with the same job skips the prompts that finished parts cover; a rerun with other
settings or other inputs is refused, so one directory never mixes two jobs.
"""

from __future__ import annotations

import dataclasses
import hashlib
import itertools
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from cpm_infer.config import GenerationConfig
from cpm_infer.engine.speculative import NGRAM
from cpm_infer.errors import CpmError
from cpm_infer.settings import DRAFT_TOKENS
from cpm_infer.text import clean

FORMATS = ("jsonl", "parquet")
MANIFEST = "job.json"
MANIFEST_VERSION = 1
_PART = re.compile(r"^part-(\d{12})-(\d{12})\.(jsonl|parquet)$")


class BulkError(CpmError):
    """A bulk job that cannot run as asked (bad input, an output directory of another job)."""


@dataclass(frozen=True)
class BulkJob:
    """Everything a worker needs (sent to every actor; paths must exist on every node)."""

    model: str
    output: str
    config: GenerationConfig
    backend: str = "auto"  # resolve it (detect_backend) before describe(): the manifest names the real one
    device: str = "cpu"
    tokenizer: str | None = None
    threads: int | None = None
    batch_size: int = 8  # prompts per generate() call, as `cpm generate --batch-size`
    truncate: bool = False
    fmt: str = "jsonl"
    draft: str | None = None  # speculative decoding: a draft model directory or "ngram" (cpm_infer.engine.speculative)
    draft_tokens: int = DRAFT_TOKENS

    def __post_init__(self) -> None:
        if self.fmt not in FORMATS:
            raise BulkError(f"unknown output format {self.fmt!r}; choose one of {', '.join(FORMATS)}")
        if self.batch_size < 1:
            raise BulkError(f"batch size must be >= 1, got {self.batch_size}")
        if self.config.seed is None:
            raise BulkError("bulk generation needs a fixed seed (a rerun must reproduce what it skips)")
        if self.draft is not None and self.config.beam_search:
            raise BulkError("--draft speeds up sampling and greedy decoding, not beam search: drop one of them")
        if self.draft not in (None, NGRAM) and not Path(self.draft).is_dir():  # before Ray starts
            raise BulkError(f"draft model not found: {self.draft} (a model directory, or {NGRAM})")

    def describe(self) -> dict[str, Any]:
        """What decides the results (the manifest's identity); batch size, actors and threads do not."""
        return {
            "model": str(Path(self.model).resolve()),
            "backend": self.backend,
            "device": self.device,
            "tokenizer": str(Path(self.tokenizer).resolve()) if self.tokenizer else None,
            "truncate": self.truncate,
            "format": self.fmt,
            "config": json.loads(json.dumps(dataclasses.asdict(self.config))),
            # A draft keeps greedy output and the sampling distribution, not the samples a seed draws: it is part of
            # the identity (only when set, so outputs written without one keep theirs).
            **({"draft": self._draft_identity(), "draft_tokens": self.draft_tokens} if self.draft else {}),
        }

    def _draft_identity(self) -> str:
        return self.draft if self.draft == NGRAM else str(Path(self.draft).resolve())


def input_kind(path: Path) -> str:
    """``parquet`` for .parquet files; anything else is read as lines (plain prompts or JSON objects)."""
    return "parquet" if path.suffix.lower() in (".parquet", ".pq") else "lines"


def describe_inputs(paths: list[Path]) -> list[dict[str, Any]]:
    """Each input's path, size and SHA-256 (a rerun over changed inputs would number prompts differently)."""
    described = []
    for path in paths:
        if not path.is_file():
            raise BulkError(f"input file not found: {path}")
        digest = hashlib.sha256()
        with path.open("rb") as handle:
            for block in iter(lambda: handle.read(1 << 20), b""):
                digest.update(block)
        described.append({"path": str(path.resolve()), "bytes": path.stat().st_size, "sha256": digest.hexdigest()})
    kinds = {input_kind(p) for p in paths}
    if len(kinds) > 1:
        raise BulkError("give inputs of one kind: all Parquet, or all text/JSONL")
    return described


def open_output(job: BulkJob, inputs: list[dict[str, Any]], prompts: int | None = None) -> bool:
    """Check that the output directory is new or holds this same job; with ``prompts`` (the input's count),
    also create it with its manifest. Returns whether it holds an earlier run of this job."""
    out = Path(job.output)
    manifest = {"version": MANIFEST_VERSION, **job.describe(), "inputs": inputs, "prompts": prompts}
    path = out / MANIFEST
    if path.is_file():
        try:
            old = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            raise BulkError(f"cannot read {path}: {exc}") from exc
        new, was = _flat(manifest), _flat(old)
        keys = (new.keys() | was.keys()) - ({"prompts"} if prompts is None else set())
        changed = sorted(k for k in keys if new.get(k) != was.get(k))
        if changed:
            raise BulkError(
                f"{out} holds the output of another job (different {', '.join(changed)}); "
                "write to a new --output directory, or delete this one"
            )
        return True
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise BulkError(f"{out} exists and is not a cpm batch output directory (no {MANIFEST})")
    if prompts is not None:
        out.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{MANIFEST}.tmp-{os.getpid()}")
        tmp.write_text(json.dumps(manifest, ensure_ascii=False, indent=2) + "\n", encoding="utf-8")
        tmp.replace(path)
    return False


def part_name(start: int, end: int, fmt: str) -> str:
    return f"part-{start:012d}-{end:012d}.{fmt}"


def finished_ranges(output: str | os.PathLike[str]) -> list[tuple[int, int]]:
    """The prompt ranges [start, end) that finished parts cover, sorted (temporary files are ignored)."""
    out = Path(output)
    if not out.is_dir():
        return []
    ranges = []
    for entry in out.iterdir():
        match = _PART.match(entry.name)
        if match:
            ranges.append((int(match.group(1)), int(match.group(2))))
    return sorted(ranges)


def covered(indices: np.ndarray, ranges: list[tuple[int, int]]) -> np.ndarray:
    """A boolean mask: which prompt indices lie in one of the (disjoint, sorted) ranges."""
    if not ranges:
        return np.zeros(len(indices), dtype=bool)
    starts = np.array([r[0] for r in ranges], dtype=np.int64)
    ends = np.array([r[1] for r in ranges], dtype=np.int64)
    slot = np.searchsorted(starts, indices, side="right") - 1
    inside = slot >= 0
    inside[inside] = indices[inside] < ends[slot[inside]]
    return inside


def contiguous_runs(indices: np.ndarray) -> list[tuple[int, int]]:
    """Split sorted prompt indices into runs of consecutive values: [(start, end), ...], end exclusive."""
    if len(indices) == 0:
        return []
    breaks = np.flatnonzero(np.diff(indices) != 1) + 1
    bounds = [0, *breaks.tolist(), len(indices)]
    return [(int(indices[a]), int(indices[b - 1]) + 1) for a, b in itertools.pairwise(bounds)]


def request_from_record(prompt: object, title: object, context: object, where: str) -> dict[str, str]:
    """A prompt from a Parquet row (``prompt``, or ``title`` + optional ``context``), under the text policy of
    ``cpm_infer.text`` as text inputs are."""
    if isinstance(prompt, str):
        return {"prompt": clean(prompt, where)}
    if isinstance(title, str):
        return {"title": clean(title, where), "context": clean(context, where) if isinstance(context, str) else ""}
    raise BulkError(f'{where}: a row has neither a "prompt" nor a "title" string')


def _flat(manifest: dict[str, Any]) -> dict[str, Any]:
    """``{"config": {"seed": 1}}`` -> ``{"config.seed": 1}`` (a mismatch names the setting)."""
    flat: dict[str, Any] = {}
    for key, value in manifest.items():
        if isinstance(value, dict):
            flat.update({f"{key}.{k}": v for k, v in value.items()})
        else:
            flat[key] = value
    return flat
