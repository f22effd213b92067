"""The one policy for text that is not clean Unicode, and for reading text files as found in the wild.

Policy: a lone surrogate in a ``str`` (a cut UTF-16 string, a buggy JSON producer, a command-line
argument holding bytes that are not UTF-8) and an invalid UTF-8 byte sequence in a file or a request
body become U+FFFD, and a warning names where it happened (``file:line``, or the request field).
Nothing else of the text is changed, and nothing after a bad line is lost.

Files: a UTF-8 BOM is dropped, CRLF and CR line ends read as LF, UTF-16 with a BOM is decoded, a file
that is not UTF-8 but is valid GB18030 (which includes GBK and GB2312) is decoded as GB18030, and a
file with NUL bytes or mostly control characters is binary (``TextFile.binary``: callers skip it).
"""

from __future__ import annotations

import codecs
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path

log = logging.getLogger(__name__)

REPLACEMENT = "\ufffd"
_SHOWN = 5  # line numbers listed in one warning


def clean(text: str, where: str = "text") -> str:
    """``text`` with each lone surrogate replaced by U+FFFD (a warning names ``where``); a surrogate
    pair split into two code points is joined. Clean text is returned as it is."""
    try:
        text.encode("utf-8")
        return text
    except UnicodeEncodeError:
        pass
    # UTF-16 round trip: valid pairs become one code point, lone halves become U+FFFD.
    fixed = text.encode("utf-16-le", "surrogatepass").decode("utf-16-le", "replace")
    count = fixed.count(REPLACEMENT) - text.count(REPLACEMENT)
    log.warning("%s: %d lone surrogate(s) replaced with U+FFFD", where, count)
    return fixed


def clean_field(value: str, field_name: str) -> str:
    """``clean`` for a request field: the warning names the field (``request field 'prompt'``)."""
    return clean(value, f"request field {field_name!r}")


def split_lines(text: str) -> list[str]:
    """Lines split at LF, CRLF and CR only, so line numbers match what an editor shows (``str.splitlines``
    also splits at U+2028, form feeds and other separators that scraped text carries inside lines)."""
    lines = text.replace("\r\n", "\n").replace("\r", "\n").split("\n")
    if lines and lines[-1] == "":
        lines.pop()
    return lines


@dataclass
class TextFile:
    """A decoded text file: its lines, the encoding used, and the lines where bytes were replaced."""

    path: Path
    lines: list[str]
    encoding: str
    replaced_lines: list[int] = field(default_factory=list)  # 1-based
    binary: bool = False


def read_text_file(path: str | os.PathLike[str], encoding: str | None = None) -> TextFile:
    """Decode ``path`` by the policy above; ``encoding`` forces a codec (undecodable bytes are then
    replaced too). Binary files come back with ``binary=True`` and no lines."""
    path = Path(path)
    data = path.read_bytes()
    if encoding is not None:
        name = codecs.lookup(encoding).name
        return _decoded(path, data, name)
    if data.startswith(codecs.BOM_UTF8):
        return _decoded(path, data[len(codecs.BOM_UTF8) :], "utf-8")
    if data.startswith((codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE)):
        return _decoded(path, data, "utf-16")
    if looks_binary(data):
        return TextFile(path, [], "binary", binary=True)
    try:
        return TextFile(path, split_lines(data.decode("utf-8")), "utf-8")
    except UnicodeDecodeError:
        pass
    if _is_gb18030(data):
        return TextFile(path, split_lines(data.decode("gb18030")), "gb18030")
    return _decoded(path, data, "utf-8")


def looks_binary(data: bytes, sample: int = 8192) -> bool:
    """NUL bytes (never in UTF-8 or GB18030 text) or over 10% control characters in the first 8 KiB."""
    head = data[:sample]
    if b"\x00" in head:
        return True
    controls = sum(1 for b in head if b < 32 and b not in (9, 10, 12, 13)) + head.count(0x7F)
    return controls > len(head) // 10


def _is_gb18030(data: bytes) -> bool:
    """Valid GB18030 and not damaged UTF-8: damaged UTF-8 keeps most of its multi-byte sequences valid,
    while GBK text almost never forms them (its second bytes are rarely UTF-8 continuation bytes)."""
    try:
        data.decode("gb18030")
    except UnicodeDecodeError:
        return False
    high = sum(1 for b in data if b >= 0x80)
    lossy = data.decode("utf-8", "replace")
    bad = lossy.count(REPLACEMENT) - data.count(REPLACEMENT.encode())
    return bad * 4 > high  # well over a quarter of the non-ASCII bytes fail as UTF-8


def _decoded(path: Path, data: bytes, encoding: str) -> TextFile:
    """Decode with replacement, recording (and warning about) the lines that held undecodable bytes."""
    lines = split_lines(data.decode(encoding, "replace"))
    bad: list[int] = []
    try:
        data.decode(encoding)
    except UnicodeDecodeError:
        clean_lines = split_lines(data.decode(encoding, "ignore"))
        # Replacement never adds or removes line breaks, so lines correspond one to one; a line that
        # differs between the replacing and the ignoring decode held undecodable bytes.
        bad = [n for n, (a, b) in enumerate(zip(lines, clean_lines, strict=False), 1) if a != b]
    if bad:
        more = ""
        if len(bad) > 1:
            rest = f" and {len(bad) - _SHOWN} more" if len(bad) > _SHOWN else ""
            more = f"; also on line(s) {', '.join(map(str, bad[1:_SHOWN]))}{rest}"
        log.warning("%s:%d: invalid %s replaced with U+FFFD%s", path, bad[0], encoding.upper(), more)
    return TextFile(path, lines, encoding, bad)
