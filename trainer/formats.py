"""Training data formats -> documents: the runtime's reader (``cpm_infer.documents``, shared with ``cpm eval``).

Seed one-file-per-document files, JSONL and plain text, as found in the wild: what cannot be used is
skipped and counted by reason (``--strict`` refuses it instead, naming file and line).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable

from cpm_infer.documents import FORMATS, DataError, Document, ReadSummary, clean_text, resolve_files
from cpm_infer.documents import read_documents as read_with_summary

__all__ = [
    "FORMATS",
    "DataError",
    "Document",
    "ReadSummary",
    "clean_text",
    "read_documents",
    "read_with_summary",
    "resolve_files",
]

log = logging.getLogger(__name__)


def read_documents(
    paths: Iterable[str | os.PathLike[str]], fmt: str = "auto", *, strict: bool = False, encoding: str | None = None
) -> list[Document]:
    """The usable documents of ``paths`` (training's plain-text rule: one per line, or blank-line blocks)."""
    docs, summary = read_with_summary(paths, fmt, strict=strict, encoding=encoding)
    log.info("data: %s", summary.describe())
    return docs
