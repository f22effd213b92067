"""The project's error types and the one helper that turns any exception into a one-line message.

The CLI turns a :class:`CpmError` into one line on stderr and exit code 1 (130 for :class:`Interrupted`); wrappers
raise ``from exc`` so that ``CPM_DEBUG=1`` shows the underlying cause in the traceback.
"""


class CpmError(Exception):
    """Any user-facing failure: bad input, missing files, mismatched artifacts."""


class Interrupted(CpmError):
    """Ctrl-C: the command stopped; its message says what was kept."""


def first_line(exc: BaseException | str) -> str:
    """The first non-empty line of an exception's message (or of a string); the type's name when it has none."""
    return _line(exc, 0)


def last_line(exc: BaseException | str) -> str:
    """The last non-empty line (the type's name when there is none): where a wrapper that quotes a traceback (Ray's
    task errors) names the original error."""
    return _line(exc, -1)


def _line(exc: BaseException | str, index: int) -> str:
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    if lines:
        return lines[index]
    return type(exc).__name__ if isinstance(exc, BaseException) else ""


def describe(exc: BaseException, *, last: bool = False) -> str:
    """``TypeName: first line`` (``last``: the last line; just the type's name when the message is empty), for
    unexpected errors."""
    name = type(exc).__name__
    detail = last_line(exc) if last else first_line(exc)
    return name if detail == name else f"{name}: {detail}"
