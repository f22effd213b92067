"""Errors keep their cause: one line normally, the whole chain with CPM_DEBUG=1."""

from __future__ import annotations

import ast
import os
import subprocess
import sys
from pathlib import Path

import pytest

from cpm_infer.errors import CpmError, Interrupted, describe, first_line, last_line

ROOT = Path(__file__).resolve().parents[1]


def test_first_line_and_describe():
    assert first_line(ValueError("  bad value\n  at line 3\n")) == "bad value"
    assert first_line(RuntimeError()) == "RuntimeError"
    assert first_line("\n") == ""
    assert first_line("TensorRT: parse failed\nmore") == "TensorRT: parse failed"
    assert describe(KeyError("x")) == "KeyError: 'x'"
    assert describe(RuntimeError("")) == "RuntimeError"
    assert issubclass(Interrupted, CpmError)


def test_last_line_names_the_wrapped_error():
    """Ray quotes the remote traceback in a task error: its last line names the original error."""
    wrapped = RuntimeError('ray::f() (pid=1)\n  File "x.py", line 3, in f\n    raise ValueError\nValueError: boom\n')
    assert last_line(wrapped) == "ValueError: boom"
    assert describe(wrapped, last=True) == "RuntimeError: ValueError: boom"
    assert last_line(RuntimeError()) == "RuntimeError" and describe(KeyError(), last=True) == "KeyError"


def test_no_raise_from_none_in_the_tree():
    """``raise ... from None`` would hide the cause from CPM_DEBUG=1; every wrapper chains ``from exc``."""
    found = []
    for package in ("cpm_infer", "export", "trainer", "benchmarks"):
        for path in (ROOT / package).rglob("*.py"):
            for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
                if isinstance(node, ast.Raise) and isinstance(node.cause, ast.Constant) and node.cause.value is None:
                    found.append(f"{path.relative_to(ROOT)}:{node.lineno}")
    assert not found, found


def _cpm(args: list[str], debug: bool) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    env.pop("CPM_DEBUG", None)
    if debug:
        env["CPM_DEBUG"] = "1"
    return subprocess.run(
        [sys.executable, "-m", "cpm_infer.cli.app", *args], capture_output=True, text=True, env=env, timeout=120
    )


@pytest.mark.parametrize("debug", [False, True])
def test_debug_shows_the_chained_cause(tmp_path, debug):
    (tmp_path / "config.json").write_text("{not json", encoding="utf-8")
    result = _cpm(["info", str(tmp_path)], debug)
    assert result.returncode == 1
    if not debug:
        assert result.stderr.strip().splitlines() == [
            f"error: cannot read {tmp_path / 'config.json'}: Expecting property name enclosed in double quotes: "
            "line 1 column 2 (char 1)"
        ]
        assert "Traceback" not in result.stderr
    else:
        # the original JSON error, then the chain marker, then the project's wrapper
        cause = result.stderr.index("json.decoder.JSONDecodeError")
        marker = result.stderr.index("The above exception was the direct cause of the following exception")
        wrapper = result.stderr.index("cpm_infer.checkpoint.CheckpointError: cannot read")
        assert cause < marker < wrapper
