"""The one TensorRT logger of the process.

TensorRT keeps the first ``ILogger`` it is given (the builder, runtime and parser of later calls
share it), so a logger per build would lose later builds' messages. This module creates one, lazily,
that forwards to Python logging; code that needs the errors of one operation (the builder's one-line
failure) collects them with ``capture_errors()`` around that operation.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from cpm_infer.errors import first_line

log = logging.getLogger("cpm_infer.tensorrt")

_lock = threading.Lock()
_logger: Any = None
_module: Any = None  # the tensorrt module _logger was made for
_captures: list[list[str]] = []  # error lists of the operations running now


def get_logger(trt: Any) -> Any:
    """The process-wide ``trt.ILogger`` (created on first use; a different ``tensorrt`` module object,
    which only tests make, gets its own)."""
    global _logger, _module
    with _lock:
        if _logger is None or _module is not trt:
            _logger, _module = _make(trt), trt
        return _logger


@contextmanager
def capture_errors() -> Iterator[list[str]]:
    """Collect the first line of every TensorRT error logged inside the ``with`` block."""
    messages: list[str] = []
    with _lock:
        _captures.append(messages)
    try:
        yield messages
    finally:
        with _lock:
            _captures.remove(messages)


def _make(trt: Any) -> Any:
    levels = {
        trt.ILogger.Severity.INTERNAL_ERROR: logging.ERROR,
        trt.ILogger.Severity.ERROR: logging.ERROR,
        trt.ILogger.Severity.WARNING: logging.WARNING,
        trt.ILogger.Severity.INFO: logging.DEBUG,
        trt.ILogger.Severity.VERBOSE: logging.DEBUG,
    }

    class _Logger(trt.ILogger):
        def __init__(self) -> None:
            trt.ILogger.__init__(self)  # required by the Python API for custom loggers

        def log(self, severity: Any, msg: str) -> None:
            level = levels.get(severity, logging.INFO)
            if level >= logging.ERROR:
                first = first_line(msg)
                with _lock:
                    for messages in _captures:
                        messages.append(first)
            log.log(level, "TensorRT: %s", msg)

    return _Logger()
