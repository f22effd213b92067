"""One TensorRT logger per process (TensorRT keeps the first ILogger it is given)."""

from __future__ import annotations

import logging
from types import SimpleNamespace

from cpm_infer.backends.trt.logger import capture_errors, get_logger


def fake_trt() -> SimpleNamespace:
    class Severity:
        INTERNAL_ERROR, ERROR, WARNING, INFO, VERBOSE = range(5)

    class ILogger:
        def __init__(self) -> None:
            pass

    ILogger.Severity = Severity
    return SimpleNamespace(ILogger=ILogger)


def test_every_caller_gets_the_same_logger_and_captures_its_own_errors(caplog) -> None:
    trt = fake_trt()
    first, second = get_logger(trt), get_logger(trt)
    assert first is second
    first.log(trt.ILogger.Severity.ERROR, "before any capture")
    with capture_errors() as outer:
        first.log(trt.ILogger.Severity.ERROR, "parser failed\nstack line")
        with capture_errors() as inner:
            second.log(trt.ILogger.Severity.INTERNAL_ERROR, "build failed")
        second.log(trt.ILogger.Severity.WARNING, "just a warning")
    assert outer == ["parser failed", "build failed"]
    assert inner == ["build failed"]
    with caplog.at_level(logging.DEBUG, logger="cpm_infer.tensorrt"):
        first.log(trt.ILogger.Severity.INFO, "info goes to debug")
    assert any(r.levelno == logging.DEBUG and "info goes to debug" in r.message for r in caplog.records)
