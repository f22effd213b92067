"""Documents from data files as found in the wild, for training and evaluation alike.

Formats:
- ``seed``: the CPM seeds' one-file-per-document layout (yangjianxin1/CPM essays)::

      ---
      标题：<title>       (``标题:`` with an ASCII colon too; empty: the document is its body)
      日期：<date>        (optional; other ``key：value`` fields are ignored)
      ---
      <body ...>

- ``jsonl``: one JSON object per line with ``content`` (and an optional ``title``) or ``text``.
- ``text``: plain text. ``blocks=False`` (training): one document per line, or, where the file has
  blank lines, documents separated by blank lines (lines stripped). ``blocks=True`` (evaluation):
  documents separated by blank lines, lines kept as written; a file without blank lines is one document.
- ``auto``: ``.jsonl``/``.json`` -> jsonl; a file whose first line is ``---`` -> seed; else text.

Files are decoded by ``cpm_infer.text`` (BOM, CRLF, GB18030 detected, invalid bytes replaced with a
warning). What cannot be used is skipped and counted by reason in a ``ReadSummary``: an empty or binary
file, an empty document, a title without a body (it would teach the model to end an essay right after
its title; the seeds' preprocessing kept it as ``title <sep> <eod>`` only because it did not check), a
malformed header, a JSON line that is not a document. ``strict`` turns the first skip, or the first
replaced byte, into a ``DataError`` naming file and line.
"""

from __future__ import annotations

import json
import logging
import os
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from cpm_infer.errors import CpmError
from cpm_infer.text import TextFile, clean, read_text_file

log = logging.getLogger(__name__)

FORMATS = ("auto", "seed", "jsonl", "text")
TITLE_KEYS = ("标题", "title")


class DataError(CpmError):
    """Data is missing, empty or (with ``strict``) not clean; the message names file and line."""


@dataclass(frozen=True)
class Document:
    """One document: ``title <sep> content`` when titled, else ``content``."""

    content: str
    title: str | None = None
    source: str = ""  # "file:line" where it starts, for messages


@dataclass(frozen=True)
class Skip:
    where: str  # "file:line" or "file"
    reason: str  # short, the summary's key
    detail: str  # what exactly, for the strict error


@dataclass
class ReadSummary:
    """What reading the data did: documents read, kept, skipped by reason, encodings, replaced lines."""

    files: int = 0
    kept: int = 0
    skipped: Counter = field(default_factory=Counter)  # reason -> documents
    first: dict[str, str] = field(default_factory=dict)  # reason -> first "file:line"
    encodings: Counter = field(default_factory=Counter)  # encoding -> files
    replaced: list[str] = field(default_factory=list)  # "file:line" of lines with replaced bytes

    @property
    def read(self) -> int:
        return self.kept + sum(self.skipped.values())

    def describe(self) -> str:
        """One line for the user, e.g. ``3 files, 12 documents read: 10 kept, 2 skipped (empty file 2)``."""
        text = f"{self.files} file(s), {self.read} document(s) read: {self.kept} kept"
        if self.skipped:
            reasons = ", ".join(f"{reason} {n} (first: {self.first[reason]})" for reason, n in self.skipped.items())
            text += f", {sum(self.skipped.values())} skipped ({reasons})"
        other = {enc: n for enc, n in self.encodings.items() if enc != "utf-8"}
        if other:
            text += "; decoded as " + ", ".join(f"{enc.upper()}: {n} file(s)" for enc, n in other.items())
        if self.replaced:
            text += f"; {len(self.replaced)} line(s) with invalid bytes replaced by U+FFFD (first: {self.replaced[0]})"
        return text

    def to_dict(self) -> dict:
        return {
            "files": self.files,
            "kept": self.kept,
            "skipped": dict(self.skipped),
            "first": dict(self.first),
            "encodings": dict(self.encodings),
            "replaced": self.replaced[:100],
            "replaced_lines": len(self.replaced),
        }

    @classmethod
    def from_dict(cls, data: dict) -> ReadSummary:
        replaced = list(data.get("replaced", []))
        replaced += ["..."] * (int(data.get("replaced_lines", len(replaced))) - len(replaced))
        return cls(
            files=int(data["files"]),
            kept=int(data["kept"]),
            skipped=Counter(data.get("skipped", {})),
            first=dict(data.get("first", {})),
            encodings=Counter(data.get("encodings", {})),
            replaced=replaced,
        )

    def check_strict(self) -> None:
        """Raise the error ``strict`` reading would have raised for this data (e.g. for a cached read)."""
        if self.skipped:
            reason = next(iter(self.skipped))
            raise DataError(f"{self.first[reason]}: {reason} (--strict refuses data that would be skipped)")
        if self.replaced:
            raise DataError(f"{self.replaced[0]}: invalid bytes (--strict refuses text that needs replacing)")


def resolve_files(paths: Iterable[str | os.PathLike[str]]) -> list[Path]:
    """Expand directories (recursively, sorted, hidden files skipped); refuse missing paths and an empty selection."""
    files: list[Path] = []
    for raw in paths:
        path = Path(raw)
        if path.is_dir():
            found = sorted(
                p
                for p in path.rglob("*")
                if p.is_file() and not any(part.startswith(".") for part in p.relative_to(path).parts)
            )
            if not found:
                raise DataError(f"data directory {path} holds no files")
            files.extend(found)
        elif path.is_file():
            files.append(path)
        else:
            raise DataError(f"data path not found: {path}")
    if not files:
        raise DataError("no data given")
    return files


def read_documents(
    paths: Iterable[str | os.PathLike[str]],
    fmt: str = "auto",
    *,
    strict: bool = False,
    encoding: str | None = None,
    blocks: bool = False,
) -> tuple[list[Document], ReadSummary]:
    """All usable documents of ``paths`` and what was skipped; raises DataError when nothing is usable
    (or, with ``strict``, at the first skip or replaced byte)."""
    if fmt not in FORMATS:
        raise DataError(f"unknown data format {fmt!r}; choose one of {', '.join(FORMATS)}")
    files = resolve_files(paths)
    docs: list[Document] = []
    summary = ReadSummary(files=len(files))
    first_skip: Skip | None = None
    for path in files:
        text = _read(path, encoding)
        if not text.binary:
            summary.encodings[text.encoding] += 1
        summary.replaced.extend(f"{path}:{n}" for n in text.replaced_lines)
        if strict and text.replaced_lines:
            summary.check_strict()
        for item in _parse(text, fmt, blocks):
            if isinstance(item, Document):
                docs.append(item)
                summary.kept += 1
                continue
            if strict:
                raise DataError(f"{item.where}: {item.detail} (--strict refuses it; without, it is skipped)")
            log.info("%s: %s; skipped", item.where, item.detail)
            summary.skipped[item.reason] += 1
            summary.first.setdefault(item.reason, item.where)
            first_skip = first_skip or item
    if not docs:
        if first_skip is not None and summary.read == 1:
            raise DataError(f"{first_skip.where}: {first_skip.detail}: no usable documents")
        shown = ", ".join(str(f) for f in files[:3]) + (" ..." if len(files) > 3 else "")
        raise DataError(f"no usable documents in {shown}: {summary.describe()}")
    return docs, summary


def _read(path: Path, encoding: str | None) -> TextFile:
    try:
        return read_text_file(path, encoding)
    except LookupError as exc:
        raise DataError(f"unknown encoding {encoding!r}") from exc
    except OSError as exc:
        raise DataError(f"cannot read {path}: {exc.strerror or exc}") from exc


def _parse(text: TextFile, fmt: str, blocks: bool) -> Iterator[Document | Skip]:
    path, lines = text.path, text.lines
    if text.binary:
        yield Skip(str(path), "binary file", "a binary file, not text")
        return
    if not any(line.strip() for line in lines):
        yield Skip(f"{path}:1", "empty file", "the file holds no text")
        return
    kind = fmt if fmt != "auto" else detect_format(path, lines)
    if kind == "seed":
        yield _seed(path, lines)
    elif kind == "jsonl":
        yield from _jsonl(path, lines)
    else:
        yield from _text(path, lines, blocks)


def detect_format(path: Path, lines: list[str]) -> str:
    if path.suffix.lower() in (".jsonl", ".json"):
        return "jsonl"
    first = next((line for line in lines if line.strip()), "")
    return "seed" if first.strip() == "---" else "text"


def clean_text(lines: Iterable[str]) -> str:
    """Strip each line and drop empty ones (as the seed preprocessing does); keep the newlines."""
    return "\n".join(s for s in (line.strip() for line in lines) if s)


def _document(content: str, title: str | None, where: str) -> Document | Skip:
    title = (title or "").strip() or None
    if content:
        return Document(content=content, title=title, source=where)
    if title:
        return Skip(where, "title without body", "the document has a title but no body")
    return Skip(where, "empty document", "the document is empty")


def _seed(path: Path, lines: list[str]) -> Document | Skip:
    index = next(i for i, line in enumerate(lines) if line.strip())
    start = f"{path}:{index + 1}"
    if lines[index].strip() != "---":
        return Skip(start, "malformed header", "a seed-format file starts with a '---' line")
    title = None
    for number in range(index + 2, len(lines) + 1):
        line = lines[number - 1].strip()
        if line == "---":
            return _document(clean_text(lines[number:]), title, f"{path}:1")
        if not line:
            continue
        cut = min((i for i in (line.find("："), line.find(":")) if i >= 0), default=-1)
        if cut < 0:
            return Skip(f"{path}:{number}", "malformed header", f"expected 'key：value' or '---', got {line[:30]!r}")
        if line[:cut].strip().lower() in TITLE_KEYS:
            title = line[cut + 1 :].strip()
    return Skip(f"{path}:{len(lines)}", "malformed header", "the header is not closed by a '---' line")


def _jsonl(path: Path, lines: list[str]) -> Iterator[Document | Skip]:
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        where = f"{path}:{number}"
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as exc:
            yield Skip(where, "invalid JSON", f"invalid JSON ({exc.msg})")
            continue
        body = obj.get("content", obj.get("text")) if isinstance(obj, dict) else None
        title = obj.get("title") if isinstance(obj, dict) else None
        if not isinstance(body, str) or not isinstance(title, str | None):
            yield Skip(where, "not a document record", 'a line needs string fields "content" (+ "title"), or "text"')
            continue
        yield _document(clean_text(clean(body, where).splitlines()), clean(title or "", where), where)


def _text(path: Path, lines: list[str], blocks: bool) -> Iterator[Document]:
    marks = [i for i, line in enumerate(lines) if line.strip()]
    inner = lines[marks[0] : marks[-1] + 1]
    if not blocks and all(line.strip() for line in inner):
        for number, line in enumerate(lines, 1):
            if line.strip():
                yield Document(content=line.strip(), title=None, source=f"{path}:{number}")
        return
    block: list[str] = []
    start = 0
    for number, line in enumerate([*lines, ""], 1):
        if line.strip():
            if not block:
                start = number
            block.append(line)
        elif block:
            # Evaluation scores text as written (indents kept); training cleans it like the seeds.
            content = "\n".join(block) if blocks else clean_text(block)
            yield Document(content=content, title=None, source=f"{path}:{start}")
            block = []
