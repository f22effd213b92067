"""The benchmark scripts run on cpm_infer.bench (no sys.path hacks): end to end on a tiny checkpoint."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

pytest.importorskip("onnxruntime")
pytest.importorskip("onnx")


def _script(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run(
        [sys.executable, *args], capture_output=True, text=True, env=env, cwd=cwd, timeout=600, check=False
    )


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory, tiny_vocab) -> Path:
    from test_export_onnx import save_random_checkpoint

    return save_random_checkpoint(tiny_vocab, tmp_path_factory.mktemp("ckpt") / "tiny-random")


def test_ort_vs_eager(tmp_path, checkpoint):
    out = tmp_path / "out"
    args = ["--checkpoint", str(checkpoint), "--work-dir", str(tmp_path / "work"), "--out-dir", str(out)]
    args += ["--repeats", "1", "--prompt-len", "4", "--new-tokens", "5", "--pasts", "8", "40", "--past-steps", "2"]
    proc = _script(str(ROOT / "benchmarks" / "ort_vs_eager.py"), *args, "--past-repeats", "1", "--machine", "t",
                   cwd=tmp_path)  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    data = json.loads((out / "ort_vs_eager-t.json").read_text())
    assert set(data["median"]) == {"hf-generate", "torch", "ort", "ort-plain"}
    assert all(m["decode_ms_per_token"] > 0 and m["first_token_ms"] > 0 for m in data["median"].values())
    assert set(data["decode_ms_per_token_at_past"]) == {"torch", "ort", "ort-plain"}
    assert all(set(v) == {"8", "40"} for v in data["decode_ms_per_token_at_past"].values())
    assert data["greedy_tokens_equal"]["torch"] and data["greedy_tokens_equal"]["ort"]
    md = (out / "ort_vs_eager-t.md").read_text()
    assert "| hf-generate |" in md and "decode at past 40 (ms/token)" in md


def test_ctranslate2_peers(tmp_path, checkpoint):
    pytest.importorskip("ctranslate2")
    out = tmp_path / "out"
    args = ["--checkpoint", str(checkpoint), "--work-dir", str(tmp_path / "work"), "--out-dir", str(out)]
    args += ["--quantize", "", "--batch", "1,2", "--prompt-len", "4", "--new-tokens", "4", "--repeats", "1"]
    proc = _script(str(ROOT / "benchmarks" / "peers" / "ctranslate2_bench.py"), *args, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    data = json.loads((out / "bench.json").read_text())
    names = {r["backend"] for r in data["results"]}
    assert names == {"torch", "ort", "ct2-float32", "ct2-int8"}  # quantized ORT artifacts: test_quantize
    assert data["baseline"] == "torch" and all(r["tokens_per_s"] > 0 for r in data["results"])
