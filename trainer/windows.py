"""Documents -> token ids -> windows of ``max_len`` tokens with a stride, cached on disk.

A document becomes ``title <sep> content <eod>`` (or ``content <eod>``). Each document is cut on
its own (windows never span two documents): windows start at 0, stride, 2*stride, ... until one
reaches the end; the last may be shorter and is padded at batch time.

The cache is a directory per key (sha256 of data bytes + tokenizer bytes + max_len + stride +
layout version) holding memory-mapped numpy arrays, written to a temporary directory and renamed, so
an interrupted build never leaves a half cache behind:
``tokens.npy`` (all documents' ids, concatenated), ``doc_offsets.npy`` (D+1 offsets),
``windows.npy`` ((N, 3): start offset, length, document index) and ``meta.json``.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from cpm_infer.tokenizer import CpmTokenizer
from trainer.errors import TrainError
from trainer.formats import Document, ReadSummary, read_with_summary, resolve_files

log = logging.getLogger(__name__)

LAYOUT_VERSION = 2  # 2: documents read by cpm_infer.documents (skips counted, encodings detected)
Progress = Callable[[int, int], None]  # (documents done, documents total)


def document_ids(tokenizer: CpmTokenizer, doc: Document) -> list[int]:
    body = tokenizer.encode(doc.content)
    if doc.title:
        return [*tokenizer.encode(doc.title), tokenizer.sep_id, *body, tokenizer.eod_id]
    return [*body, tokenizer.eod_id]


def window_starts(n_tokens: int, max_len: int, stride: int) -> list[int]:
    """Start offsets covering ``n_tokens`` with windows of ``max_len`` every ``stride`` tokens."""
    if max_len < 2 or not 1 <= stride <= max_len:
        raise TrainError(f"need max_len >= 2 and 1 <= stride <= max_len, got max_len={max_len}, stride={stride}")
    starts = [0]
    while starts[-1] + max_len < n_tokens:
        starts.append(starts[-1] + stride)
    return starts


def windows_for(doc_offsets: np.ndarray, max_len: int, stride: int, docs: Sequence[int] | None = None) -> np.ndarray:
    """(N, 3) int64 windows [start, length, doc] over the selected documents."""
    rows: list[tuple[int, int, int]] = []
    for d in range(len(doc_offsets) - 1) if docs is None else docs:
        begin, end = int(doc_offsets[d]), int(doc_offsets[d + 1])
        if end - begin < 2:  # a lone <eod> predicts nothing
            continue
        for s in window_starts(end - begin, max_len, stride):
            rows.append((begin + s, min(max_len, end - begin - s), d))
    return np.asarray(rows, dtype=np.int64).reshape(-1, 3)


@dataclass(frozen=True)
class TokenCache:
    """The memory-mapped arrays of one cache entry."""

    directory: Path
    tokens: np.ndarray
    doc_offsets: np.ndarray
    windows: np.ndarray
    meta: dict

    @property
    def n_docs(self) -> int:
        return len(self.doc_offsets) - 1

    @property
    def summary(self) -> ReadSummary:
        """What reading the data files did (kept, skipped by reason, encodings), stored with the entry."""
        return ReadSummary.from_dict(self.meta["summary"])


def _file_digest(paths: Sequence[Path]) -> str:
    digest = hashlib.sha256()
    for path in paths:
        digest.update(str(path.name).encode() + b"\0")
        with path.open("rb") as handle:
            for chunk in iter(lambda: handle.read(1 << 20), b""):
                digest.update(chunk)
        digest.update(b"\0")
    return digest.hexdigest()


def cache_key(
    files: Sequence[Path], fmt: str, tokenizer_file: Path, max_len: int, stride: int, encoding: str | None = None
) -> str:
    parts = [f"v{LAYOUT_VERSION}", fmt, _file_digest(files), _file_digest([tokenizer_file]), str(max_len), str(stride)]
    parts += [encoding] if encoding else []
    return hashlib.sha256("|".join(parts).encode()).hexdigest()[:24]


def default_cache_dir() -> Path:
    env = os.environ.get("CPM_CACHE_DIR")
    if env:
        return Path(env) / "windows"
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "cpm-infer" / "windows"


def load_windows(
    paths: Sequence[str | os.PathLike[str]],
    tokenizer: CpmTokenizer,
    max_len: int,
    stride: int,
    *,
    fmt: str = "auto",
    cache_dir: str | os.PathLike[str] | None = None,
    progress: Progress | None = None,
    strict: bool = False,
    encoding: str | None = None,
) -> TokenCache:
    """The cached windows of ``paths``, building them (with progress) on a cache miss. ``strict`` refuses
    data with anything skipped or replaced, on a cache hit too (the entry keeps the read summary)."""
    window_starts(0, max_len, stride)  # validate before any work
    files = resolve_files(paths)
    root = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    key = cache_key(files, fmt, tokenizer.path, max_len, stride, encoding)
    entry = root / key
    if (entry / "meta.json").is_file():
        try:
            cache = _open(entry)
            summary = cache.summary
        except (OSError, ValueError, KeyError, TypeError, json.JSONDecodeError) as exc:
            log.warning("cache entry %s unreadable (%s); rebuilding", entry, exc)
            shutil.rmtree(entry, ignore_errors=True)
        else:
            if strict:
                summary.check_strict()
            return cache
    docs, summary = read_with_summary(files, fmt, strict=strict, encoding=encoding)
    ids = _encode_all(tokenizer, docs, progress)
    _write(
        entry,
        ids,
        tokenizer,
        max_len,
        stride,
        meta={
            "files": [str(f) for f in files],
            "format": fmt,
            "tokenizer": str(tokenizer.path),
            "summary": summary.to_dict(),
        },
    )
    log.info("cached %d documents as %s", len(docs), entry)
    return _open(entry)


def _encode_all(tokenizer: CpmTokenizer, docs: list[Document], progress: Progress | None) -> list[list[int]]:
    out: list[list[int]] = []
    for i, doc in enumerate(docs):
        out.append(document_ids(tokenizer, doc))
        if progress is not None and (i % 16 == 15 or i + 1 == len(docs)):
            progress(i + 1, len(docs))
    return out


def _write(entry: Path, ids: list[list[int]], tokenizer: CpmTokenizer, max_len: int, stride: int, meta: dict) -> None:
    tmp = entry.with_name(f".{entry.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        dtype = np.uint16 if tokenizer.vocab_size <= np.iinfo(np.uint16).max else np.int32
        lengths = np.asarray([len(x) for x in ids], dtype=np.int64)
        offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
        tokens = np.fromiter((t for doc in ids for t in doc), dtype=dtype, count=int(offsets[-1]))
        windows = windows_for(offsets, max_len, stride)
        np.save(tmp / "tokens.npy", tokens)
        np.save(tmp / "doc_offsets.npy", offsets)
        np.save(tmp / "windows.npy", windows)
        info = {
            **meta,
            "layout": LAYOUT_VERSION,
            "max_len": max_len,
            "stride": stride,
            "n_docs": len(ids),
            "n_tokens": int(offsets[-1]),
            "n_windows": len(windows),
            "vocab_size": tokenizer.vocab_size,
            "pad_id": tokenizer.pad_id,
        }
        (tmp / "meta.json").write_text(json.dumps(info, indent=2, ensure_ascii=False), encoding="utf-8")
        if entry.exists():  # another process built it meanwhile: keep theirs
            shutil.rmtree(tmp)
        else:
            tmp.rename(entry)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _open(entry: Path) -> TokenCache:
    meta = json.loads((entry / "meta.json").read_text(encoding="utf-8"))
    load = lambda name: np.load(entry / name, mmap_mode="r")  # noqa: E731
    return TokenCache(entry, load("tokens.npy"), load("doc_offsets.npy"), load("windows.npy"), meta)
