"""Batch generation jobs: a prompt file in, a JSONL of results out, resumable after a crash.

Every result record is written with one ``write`` call on an append-only file, so a process killed at
any moment leaves only complete lines (a torn last line, possible after a power loss or a full disk,
is cut off when the file is reopened). Each record carries its prompt's ``index``; ``--resume`` skips
the prompts whose samples are all in the file and generates the others with their own index, hence
their own seeds: the final file holds what an uninterrupted run would have written.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cpm_infer.errors import CpmError
from cpm_infer.text import clean, read_text_file

log = logging.getLogger(__name__)


class JobError(CpmError):
    """A prompt file or a results file cannot be used (the message names the file, and the line)."""


def read_requests(path: Path, encoding: str | None = None) -> list[dict]:
    """Prompts of ``path``: one per line, or JSON lines with ``prompt`` or ``title`` (+ ``context``).
    Text that is not clean Unicode follows ``cpm_infer.text`` (replaced, with a warning naming the line)."""
    if not path.is_file():
        raise JobError(f"input file not found: {path}")
    try:
        text = read_text_file(path, encoding)
    except (OSError, LookupError) as exc:
        raise JobError(f"cannot read {path}: {exc}") from exc
    if text.binary:
        raise JobError(f"{path} is a binary file, not prompts (one per line, or JSON lines)")
    requests = list(_requests(path, text.lines))
    if not requests:
        raise JobError(f"{path} holds no prompts: the file is empty")
    return requests


def _requests(path: Path, lines: list[str]) -> Iterator[dict]:
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        where = f"{path}:{number}"
        if not line.lstrip().startswith("{"):
            yield {"prompt": clean(line, where)}
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as exc:
            raise JobError(f"{where}: invalid JSON ({exc.msg})") from exc
        if isinstance(obj, dict) and isinstance(obj.get("prompt"), str):
            yield {"prompt": clean(obj["prompt"], where)}
        elif isinstance(obj, dict) and isinstance(obj.get("title"), str):
            yield {"title": clean(obj["title"], where), "context": clean(str(obj.get("context", "")), where)}
        else:
            raise JobError(f'{where}: a JSON line needs a "prompt" or a "title" string')


@dataclass(frozen=True)
class Run:
    """Consecutive prompts generated in one call: ``start`` numbers them (and so seeds them)."""

    start: int
    count: int


def pending_runs(n_prompts: int, batch_size: int, done: set[int]) -> list[Run]:
    """The prompts still to generate, in batches at the same boundaries as a fresh run (so a batch only
    loses the prompts already done), each cut into consecutive runs."""
    runs = []
    for base in range(0, n_prompts, batch_size):
        todo = [i for i in range(base, min(base + batch_size, n_prompts)) if i not in done]
        for i in todo:
            if runs and runs[-1].start + runs[-1].count == i and runs[-1].start >= base:
                runs[-1] = Run(runs[-1].start, runs[-1].count + 1)
            else:
                runs.append(Run(i, 1))
    return runs


class ResultsFile:
    """Append-only JSONL of result records; one ``os.write`` per record, nothing half-written on error."""

    def __init__(self, path: Path, fd: int) -> None:
        self.path = path
        self._fd = fd
        self.written = 0

    @classmethod
    def open(cls, path: Path, requests: list[dict], num_samples: int, resume: bool) -> tuple[ResultsFile, set[int]]:
        """Open ``path`` for writing; with ``resume``, keep its complete records and return the prompt
        indices that have all their samples (a torn last line is cut off)."""
        done: set[int] = set()
        if resume and path.exists():
            done = _completed(path, requests, num_samples)
            fd = os.open(path, os.O_WRONLY | os.O_APPEND)
        else:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_APPEND, 0o644)
        return cls(path, fd), done

    def write(self, records: Iterable[dict]) -> None:
        """Append the records; if any write fails (disk full), the file is cut back to where it was."""
        data = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records).encode("utf-8")
        size = os.fstat(self._fd).st_size
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(self._fd, view) :]
        except OSError as exc:
            os.ftruncate(self._fd, size)
            raise JobError(f"cannot write {self.path}: {exc.strerror or exc}; it keeps the records before") from exc
        self.written += data.count(b"\n")

    def close(self) -> None:
        os.close(self._fd)

    def __enter__(self) -> ResultsFile:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _completed(path: Path, requests: list[dict], num_samples: int) -> set[int]:
    """Indices of prompts whose ``num_samples`` records are all in ``path``; refuses a file written for
    other prompts. A torn last line and the records of prompts left incomplete are removed, so the
    rerun writes each of those prompts whole."""
    data = path.read_bytes()
    cut = data.rfind(b"\n") + 1
    if cut < len(data):
        log.warning("%s: its last line is incomplete (%d bytes); removed", path, len(data) - cut)
    lines = data[:cut].decode("utf-8", "replace").splitlines()
    samples: dict[int, set[int]] = {}
    indices = []
    for number, line in enumerate(lines, 1):
        try:
            record = json.loads(line)
            index, sample = int(record["index"]), int(record["sample"])
        except (json.JSONDecodeError, KeyError, TypeError, ValueError) as exc:
            raise JobError(f"{path}:{number}: not a result record of `cpm generate`; cannot --resume it") from exc
        if not 0 <= index < len(requests) or any(record.get(k) != v for k, v in requests[index].items()):
            raise JobError(f"{path}:{number}: this record is for another prompt than prompt {index} of the input")
        samples.setdefault(index, set()).add(sample)
        indices.append(index)
    done = {i for i, got in samples.items() if got >= set(range(num_samples))}
    keep = [line for line, index in zip(lines, indices, strict=True) if index in done]
    if len(keep) < len(lines) or cut < len(data):
        tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
        tmp.write_text("".join(line + "\n" for line in keep), encoding="utf-8")
        os.replace(tmp, path)
    return done


def result_record(request: dict, result: Any, **extra: Any) -> dict:
    """One output record of ``cpm generate --output`` and ``cpm batch``: the prompt's index and fields, the
    text and how it ended, the beam's score and the logprobs where there are any, then ``extra``."""
    record = {
        "index": result.prompt_index,
        **request,
        "sample": result.sample_index,
        **extra,
        "text": result.text,
        "finish_reason": result.finish_reason,
        "prompt_tokens": result.prompt_tokens,
        "new_tokens": len(result.token_ids),
    }
    if result.score is not None:
        record["score"] = result.score
    if result.logprobs is not None:
        record["logprobs"] = [
            {
                "token_id": step.token_id,
                "text": step.token_text,
                "logprob": step.logprob,
                "top": [{"token_id": i, "text": t, "logprob": v} for i, t, v in step.top],
            }
            for step in result.logprobs
        ]
    return record
