"""Training data formats -> documents (title + content), with file:line in every error.

Formats:
- ``seed``: the CPM seeds' one-file-per-document layout (yangjianxin1/CPM essays)::

      ---
      标题：<title>
      日期：<date>        (optional)
      作者：<author>      (optional)
      ---
      <body ...>

- ``jsonl``: one JSON object per line with ``title`` + ``content`` (leeguandong/CPM style) or ``text``.
- ``text``: plain text; one document per line, or, where the file has blank lines, documents separated
  by blank lines (a document may then span lines).
- ``auto`` (default): ``.jsonl``/``.json`` -> jsonl; a file whose first line is ``---`` -> seed; else text.

A directory stands for the files under it (recursively, sorted, hidden files skipped).
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

from trainer.errors import DataError

log = logging.getLogger(__name__)

FORMATS = ("auto", "seed", "jsonl", "text")
_SEED_KEYS = {"标题": "title", "日期": "date", "作者": "author"}


@dataclass(frozen=True)
class Document:
    """One training document: ``title <sep> content <eod>`` when titled, else ``content <eod>``."""

    content: str
    title: str | None
    source: str  # "file:line" where it starts, for messages


def resolve_files(paths: Iterable[str | os.PathLike[str]]) -> list[Path]:
    """Expand directories; refuse missing paths and an empty selection."""
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
        raise DataError("no training data given")
    return files


def detect_format(path: Path, lines: list[str]) -> str:
    if path.suffix.lower() in (".jsonl", ".json"):
        return "jsonl"
    first = next((line for line in lines if line.strip()), "")
    return "seed" if first.strip() == "---" else "text"


def read_lines(path: Path) -> list[str]:
    """The file's lines (UTF-8, BOM tolerated); a decoding error names the line."""
    data = path.read_bytes()
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = data[: exc.start].count(b"\n") + 1
        raise DataError(f"{path}:{line}: not UTF-8 text") from exc
    return text.splitlines()


def clean_text(lines: Iterable[str]) -> str:
    """Strip each line and drop empty ones (as the seed preprocessing does); keep the newlines."""
    return "\n".join(s for s in (line.strip() for line in lines) if s)


def read_documents(paths: Iterable[str | os.PathLike[str]], fmt: str = "auto") -> list[Document]:
    """All documents of ``paths``; raises DataError for malformed input or when nothing is left."""
    if fmt not in FORMATS:
        raise DataError(f"unknown data format {fmt!r}; choose one of {', '.join(FORMATS)}")
    docs: list[Document] = []
    files = resolve_files(paths)
    for path in files:
        lines = read_lines(path)
        kind = detect_format(path, lines) if fmt == "auto" else fmt
        before = len(docs)
        docs.extend(_READERS[kind](path, lines))
        if len(docs) == before:
            if kind == "seed":
                raise DataError(f"{path}:1: empty file: no seed-format document")
            log.warning("%s holds no documents; skipped", path)
    if not docs:
        raise DataError(
            f"no documents in {', '.join(str(f) for f in files[:3])}{' ...' if len(files) > 3 else ''}: the "
            "data is empty"
        )
    return docs


def _seed(path: Path, lines: list[str]) -> Iterator[Document]:
    index = 0
    while index < len(lines) and not lines[index].strip():
        index += 1
    if index == len(lines):
        return
    if lines[index].strip() != "---":
        raise DataError(f"{path}:{index + 1}: a seed-format file starts with a '---' line")
    header: dict[str, str] = {}
    index += 1
    while True:
        if index == len(lines):
            raise DataError(f"{path}:{index}: the header is not closed by a '---' line")
        line = lines[index].strip()
        index += 1
        if line == "---":
            break
        if not line:
            continue
        cut = min((i for i in (line.find("："), line.find(":")) if i >= 0), default=-1)
        key, value = (line[:cut], line[cut + 1 :]) if cut >= 0 else (line, "")
        if cut < 0 or key.strip() not in _SEED_KEYS:
            raise DataError(
                f"{path}:{index}: expected a header line (标题：/日期：/作者：) or the closing '---', got {line[:30]!r}"
            )
        header[_SEED_KEYS[key.strip()]] = value.strip()
    title = header.get("title", "")
    if not title:
        raise DataError(f"{path}: the header has no '标题：' (title) line")
    body = clean_text(lines[index:])
    if not body:
        raise DataError(f"{path}:{index + 1}: the document has a title but no body")
    yield Document(content=body, title=title, source=f"{path}:1")


def _jsonl(path: Path, lines: list[str]) -> Iterator[Document]:
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as exc:
            raise DataError(f"{path}:{number}: invalid JSON ({exc.msg})") from exc
        if not isinstance(obj, dict):
            raise DataError(f"{path}:{number}: expected a JSON object")
        title = obj.get("title")
        body = obj.get("content") if title is not None or "content" in obj else obj.get("text")
        if not isinstance(body, str) or (title is not None and not isinstance(title, str)):
            raise DataError(f'{path}:{number}: a line needs string fields "title" + "content", or "text"')
        content = clean_text(body.splitlines())
        if not content:
            raise DataError(f"{path}:{number}: empty document")
        yield Document(
            content=content, title=(title.strip() or None) if title is not None else None, source=f"{path}:{number}"
        )


def _text(path: Path, lines: list[str]) -> Iterator[Document]:
    paragraphs = any(not line.strip() for line in _inner(lines))
    if not paragraphs:
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
            yield Document(content=clean_text(block), title=None, source=f"{path}:{start}")
            block = []


def _inner(lines: list[str]) -> list[str]:
    """Lines between the first and the last non-empty line (leading/trailing blanks do not count)."""
    marks = [i for i, line in enumerate(lines) if line.strip()]
    return lines[marks[0] : marks[-1] + 1] if marks else []


_READERS = {"seed": _seed, "jsonl": _jsonl, "text": _text}
