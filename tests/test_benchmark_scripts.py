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


def _serve_load():
    import importlib.util

    spec = importlib.util.spec_from_file_location("serve_load", ROOT / "benchmarks" / "serve_load.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_serve_load_summaries():
    sl = _serve_load()
    assert sl.pct([1.0, 2.0, 3.0, 4.0], 50) == 2.0 and sl.pct([1.0, 2.0, 3.0, 4.0], 99) == 4.0
    assert sl.ratio(3.0, 2.0) == 1.5 and sl.ratio(1.0, None) is None and sl.ratio(1.0, float("nan")) is None
    assert sl.parse_scenarios("probe, closed-16,soak") == ["probe", "closed", "soak"]
    with pytest.raises(Exception, match="unknown scenario"):
        sl.parse_scenarios("probe,warp")
    series = [(0.0, 100.0), (290.0, 110.0), (310.0, 111.0), (1800.0, 115.5)]
    rss = sl.rss_summary(series, 1800)
    assert rss["rss_base_at_s"] == 290.0 and rss["rss_end_mb"] == 115.5 and rss["rss_end_over_base"] == 1.05
    assert sl.rss_summary([(0.0, 10.0), (6.0, 12.0), (12.0, 12.0)], 12)["rss_base_at_s"] == 6.0  # short: half way


def test_serve_load_engine_closed_loop():
    """The in-process driver keeps ``clients`` rows in flight, adding one whenever one finishes."""
    from cpm_infer.engine import FinishEvent, GenerationResult

    sl = _serve_load()

    class FakeEngine:  # a row finishes after as many steps as its "prompt" says, one token per step
        def __init__(self) -> None:
            self.rows: dict[int, list] = {}
            self.next_id = self.most = 0

        def add(self, ids, config, *, seed):
            self.rows[self.next_id] = [ids[0], 0, seed]
            self.next_id += 1
            self.most = max(self.most, len(self.rows))

        def has_work(self) -> bool:
            return bool(self.rows)

        def step(self):
            events = []
            for row_id, row in list(self.rows.items()):
                row[1] += 1
                if row[1] == row[0]:
                    del self.rows[row_id]
                    result = GenerationResult(0, 0, 1, [7] * row[0], "", "length")
                    events.append(FinishEvent(row_id, None, "length", result))
            return events

    engine = FakeEngine()
    items = [([n], None, i) for i, n in enumerate([3, 1, 4, 1, 5, 9, 2, 6])]
    out = sl.engine_closed_loop(engine, items, clients=3)
    assert out["requests"] == 8 and out["tokens"] == 31 and engine.most == 3 and engine.next_id == 8


def test_serve_memory(tmp_path, checkpoint):
    """A real `cpm serve` on an --optimize artifact (shared KV buffers): the KV set aside is what the formula says,
    and the RSS is read at start, through a burst and after it."""
    from cpm_infer.checkpoint import open_checkpoint
    from export.onnx_export import export_onnx

    artifact = export_onnx(checkpoint, tmp_path / "fused", optimize=True).path
    out = tmp_path / "memory.json"
    result = _script("benchmarks/serve_memory.py", "--model", str(artifact), "--max-batch", "3", "--out", str(out),
                     cwd=ROOT)  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr
    got = json.loads(out.read_text())
    spec = open_checkpoint(checkpoint).spec
    assert got["kv_reserved_mib"] * 2**20 == 4 * spec.n_positions * spec.n_layer * 2 * spec.n_embd * 4  # 3 -> 4 rows
    assert got["rss_after_warmup_mib"] > 0 and got["rss_peak_under_burst_mib"] >= got["rss_after_warmup_mib"]
    assert len(got["burst_prompt_tokens"]) == 3


def test_engine_steps(tmp_path, checkpoint):
    """Steps timed with their phases while prompts join (an --optimize artifact: shared KV, the reserve)."""
    from export.onnx_export import export_onnx

    artifact = export_onnx(checkpoint, tmp_path / "fused", optimize=True).path
    out = tmp_path / "steps.json"
    args = ["--model", str(artifact), "--reserve", "--rows", "3", "--prompt", "40", "--every", "6", "--steps", "30"]
    result = _script("benchmarks/engine_steps.py", *args, "--prefill-chunk", "8", "--out", str(out), cwd=ROOT)
    assert result.returncode == 0, result.stdout + result.stderr
    got = json.loads(out.read_text())
    assert got["kv_reserved_mib"] > 0 and 0 < got["step_ms"]["p50"] <= got["step_ms"]["max"]
    phases = {name for step in got["slowest"] for name in step["phases_ms"]}
    assert {"_decode_running", "_feed", "batch.merge"} <= phases


def test_first_token_profile(tmp_path, checkpoint):
    """The graph run and the prefix cache's copy are found in the profile, and the rest is what is left."""
    from cpm_infer.bench.setup import ensure_artifact

    art = ensure_artifact(checkpoint, tmp_path / "art", say=lambda _: None)
    out = tmp_path / "profile.json"
    script = str(ROOT / "benchmarks" / "peers" / "first_token_profile.py")
    proc = _script(script, str(art), "--prompt", "40", "--runs", "2", "--json", str(out), cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    (row,) = json.loads(out.read_text())
    assert row["graph_ms"] > 0 and row["prefix_cache_store_ms"] > 0  # 40 tokens: long enough to be kept
    assert row["other_ms"] >= 0 and row["profiled_call_ms"] >= row["graph_ms"] + row["prefix_cache_store_ms"]
