"""Text of a growing token sequence, a few tokens of work per step (never the whole sequence again).

``IncrementalDetokenizer`` decodes a small window: the ids whose text is already out (left context,
so a tokenizer that renders a piece differently after another one still gets it right) plus the new
ones. New text is released only when the window's text still starts with what was released and does
not end in U+FFFD (an incomplete UTF-8 sequence of byte pieces: the next piece changes it). Then the
window moves on, so each step decodes a constant number of ids. For the CPM vocabulary the released
pieces concatenate to exactly ``tokenizer.decode(all ids)`` (tests: the golden file, random ids).

``TextStream`` adds stop strings on top: it searches only the text that is not out yet (a stop string
cannot start in released text, see ``add``) and holds back the last ``len(longest stop) - 1``
characters, which could still become the start of one.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

REPLACEMENT = "\ufffd"


class Decoder(Protocol):
    def decode(self, ids: Sequence[int]) -> str: ...


class IncrementalDetokenizer:
    def __init__(self, tokenizer: Decoder) -> None:
        self._decode = tokenizer.decode
        self.ids: list[int] = []
        self._prefix = 0  # ids[_prefix:_read]: released already, decoded again as left context
        self._read = 0  # ids[_read:]: not released yet
        self._prefix_text = ""

    def add(self, token: int) -> str:
        """Append ``token``; return the text that became final (may be "")."""
        self.ids.append(int(token))
        text = self._decode(self.ids[self._prefix :])
        if len(text) <= len(self._prefix_text) or text.endswith(REPLACEMENT):
            return ""
        if not text.startswith(self._prefix_text):  # the new piece changed released text: wait for more
            return ""
        new = text[len(self._prefix_text) :]
        self._prefix, self._read = self._read, len(self.ids)
        self._prefix_text = self._decode(self.ids[self._prefix : self._read])
        return new

    def flush(self) -> str:
        """The held-back text (e.g. an unfinished byte sequence) at the end of the sequence."""
        text = self._decode(self.ids[self._prefix :])
        new = text[len(self._prefix_text) :] if text.startswith(self._prefix_text) else ""
        self._prefix = self._read = len(self.ids)
        self._prefix_text = ""
        return new


class TextStream:
    """Released text of one row, with stop strings: ``add`` returns (newly final text, stopped)."""

    def __init__(self, tokenizer: Decoder, stop_strings: Sequence[str] = ()) -> None:
        self.detok = IncrementalDetokenizer(tokenizer)
        self.stops = tuple(stop_strings)
        self._hold = max((len(s) for s in self.stops), default=1) - 1
        self._parts: list[str] = []
        self._pending = ""  # decoded, not released: could still start a stop string
        self.stopped = False

    def add(self, token: int) -> tuple[str, bool]:
        # A stop string cannot start in released text: released text ends at least len(stop) - 1
        # characters before the end of what was known, so a match starting there would have been
        # complete, and found, then. Searching the pending text is enough.
        return self._push(self.detok.add(token))

    def finish(self) -> str:
        """Release everything still held (the sequence ended); returns it."""
        if self.stopped:
            return ""
        out, _ = self._push(self.detok.flush(), final=True)
        return out

    def _push(self, new: str, final: bool = False) -> tuple[str, bool]:
        if self.stopped:
            return "", True
        pending = self._pending + new
        if self.stops and pending:
            hits = [i for i in (pending.find(s) for s in self.stops) if i >= 0]
            if hits:
                self.stopped = True
                self._pending = ""
                return self._release(pending[: min(hits)]), True
        cut = len(pending) if final else max(0, len(pending) - self._hold)
        self._pending = pending[cut:]
        return self._release(pending[:cut]), False

    def _release(self, text: str) -> str:
        if text:
            self._parts.append(text)
        return text

    @property
    def text(self) -> str:
        """Everything released so far."""
        return "".join(self._parts)
