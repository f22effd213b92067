"""`cpm demo`, the quickstart's main command, end to end on the bundled model: export + validation into an empty
directory (what a fresh machine does), streamed generation, the side-by-side table; a second run reuses the artifact."""

from __future__ import annotations

import pytest
from conftest import run_cli

pytest.importorskip("onnxruntime")


def test_cpm_demo_on_a_fresh_machine_then_reusing_its_artifact(monkeypatch, capsys, tmp_path):
    args = ("demo", "--out", str(tmp_path / "demo"), "--max-new-tokens", "8", "--threads", "1")
    code, out, err = run_cli(monkeypatch, capsys, *args)
    assert code == 0, err
    assert "validated: max |diff|" in err
    assert "faster than transformers' generate()" in out
    assert (tmp_path / "demo" / "bench" / "bench.md").is_file()
    code, out, err = run_cli(monkeypatch, capsys, *args)
    assert code == 0, err
    assert "reusing the ONNX artifact" in err
