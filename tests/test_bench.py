"""The benchmark harness on tiny models: metrics, sweeps, reports, skipped backends."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
from conftest import run_cli as _cli

from cpm_infer.bench import harness, report
from cpm_infer.bench.runners import Timing


class FixedRunner:
    def __init__(self, name, first, steps, sleep=0.0):
        self.name, self.first, self.steps, self.sleep = name, first, steps, sleep
        self.calls = []

    def run(self, prompts, new_tokens):
        import time

        self.calls.append((prompts.shape, new_tokens))
        time.sleep(self.sleep)
        return Timing(self.first, list(self.steps[: new_tokens - 1]), new_tokens * len(prompts))


def test_measure_computes_percentiles_and_excludes_warmup():
    runner = FixedRunner("x", 0.05, [0.001 * i for i in range(1, 11)], sleep=0.01)
    case = harness.Case(batch=2, prompt_len=4, new_tokens=11, sweep="base")
    m = harness.measure(runner, case, np.zeros((2, 4), dtype=np.int64), repeats=2, warmup=1)
    assert runner.calls[0][1] == 4 and len(runner.calls) == 3  # one short warm-up, two timed runs
    assert m.ttft_ms == pytest.approx(50.0)
    assert m.decode_p50_ms == pytest.approx(5.5)
    assert m.decode_p90_ms == pytest.approx(np.percentile(np.arange(1, 11), 90))
    assert m.decode_mean_ms == pytest.approx(5.5)
    assert 0 < m.tokens_per_s <= 22 / 0.01  # 22 tokens per run, each run sleeps >= 10 ms
    assert m.peak_rss_mb > 10


def test_cases_and_context_limit():
    cases = harness.build_cases(
        batches=[1, 4], prompt_lens=[16, 32], new_tokens=[8], contexts=[16, 100], n_positions=128
    )
    assert [(c.sweep, c.batch, c.prompt_len, c.new_tokens) for c in cases] == [
        ("base", 1, 16, 8),
        ("batch", 4, 16, 8),
        ("prompt", 1, 32, 8),
        ("context", 1, 16, 8),
        ("context", 1, 100, 8),
    ]
    with pytest.raises(harness.BenchError, match="exceeds the model's context of 128"):
        harness.build_cases(batches=[1], prompt_lens=[16], new_tokens=[8], contexts=[125], n_positions=128)
    with pytest.raises(harness.BenchError, match="positive"):
        harness.build_cases(batches=[0], prompt_lens=[16], new_tokens=[8], contexts=[], n_positions=128)


def test_same_prompts_for_every_backend():
    case = harness.Case(2, 5, 3, "base")
    assert np.array_equal(harness.make_prompts(case, 100), harness.make_prompts(case, 100))


def test_ratios_and_reports(tmp_path):
    def m(backend, decode, ttft, sweep="base", batch=1):
        return harness.Measurement(backend, batch, 16, 8, sweep, ttft, decode, decode, decode, 100.0, 50.0, None, 1)

    results = [
        m("hf-generate", 10.0, 40.0),
        m("torch", 8.0, 40.0),
        m("ort", 4.0, 10.0),
        m("hf-generate", 20.0, 80.0, "batch", 4),
        m("ort", 5.0, 20.0, "batch", 4),
    ]
    rows = report.with_ratios(results)
    assert [r["decode_speedup"] for r in rows] == [1.0, 1.25, 2.5, 1.0, 4.0]
    assert rows[2]["ttft_speedup"] == 4.0
    written = report.write_reports(
        results, tmp_path, command="cpm bench x", env=report.environment(), skipped={"trt": "absent"}
    )
    names = sorted(p.name for p in written["files"])
    assert names == ["bench.json", "bench.md", "throughput_vs_batch.png"]
    data = json.loads((tmp_path / "bench.json").read_text())
    assert data["baseline"] == "hf-generate" and data["skipped"] == {"trt": "absent"} and len(data["results"]) == 5
    md = (tmp_path / "bench.md").read_text()
    assert "| ort | base | 1 | 16 | 8 | 10.0 | 4.00 |" in md and "trt: absent" in md
    assert (tmp_path / "throughput_vs_batch.png").read_bytes()[:4] == b"\x89PNG"


def test_cli_end_to_end_with_skips(monkeypatch, capsys, tmp_path, tiny_checkpoint):
    out = tmp_path / "bench"
    code, stdout, err = _cli(
        monkeypatch,
        capsys,
        "bench",
        "-m",
        str(tiny_checkpoint),
        "--backends",
        "hf,torch,ort,trt",
        "--new-tokens",
        "4",
        "--batch",
        "1,2",
        "--context",
        "8,32",
        "--repeats",
        "1",
        "-o",
        str(out),
    )
    assert code == 0, err
    data = json.loads((out / "bench.json").read_text())
    backends = {r["backend"] for r in data["results"]}
    assert backends == {"hf-generate", "torch", "ort"}
    assert all(r["gb_per_s"] > 0 for r in data["results"])  # achieved bandwidth beside every row
    assert "GB/s" in (out / "bench.md").read_text()
    assert "trt" in data["skipped"]
    assert {p.name for p in out.iterdir()} >= {
        "bench.json",
        "bench.md",
        "decode_vs_context.png",
        "throughput_vs_batch.png",
    }
    assert "decode x" in stdout


def test_cli_refuses_sweep_beyond_context(monkeypatch, capsys, tiny_checkpoint, tmp_path):
    code, _, err = _cli(
        monkeypatch,
        capsys,
        "bench",
        "-m",
        str(tiny_checkpoint),
        "--backends",
        "torch",
        "--context",
        "500",
        "-o",
        str(tmp_path / "b"),
    )
    assert code == 1 and "exceeds the model's context of 128" in err and err.count("\n") == 1


def test_mismatched_artifact_is_skipped_with_reason(monkeypatch, capsys, tmp_path, tiny_checkpoint, tiny_vocab):
    from conftest import make_tiny_model

    from cpm_infer.tokenizer import CpmTokenizer
    from cpm_infer.torch_model import save_checkpoint
    from export.onnx_export import export_onnx

    tok = CpmTokenizer(tiny_vocab)
    other = save_checkpoint(
        make_tiny_model(tok.vocab_size, seed=9, eod_id=tok.eod_id, pad_id=tok.pad_id), tiny_vocab, tmp_path / "other"
    )
    artifact = export_onnx(other, tmp_path / "other-onnx").path
    code, _, err = _cli(
        monkeypatch,
        capsys,
        "bench",
        "-m",
        str(tiny_checkpoint),
        "--backends",
        "torch,ort",
        "--onnx",
        str(artifact),
        "--new-tokens",
        "3",
        "--context",
        "",
        "--repeats",
        "1",
        "-o",
        str(tmp_path / "b"),
    )
    assert code == 0, err
    assert "skipped ort" in err and "other weights" in err
    # same weights, another tokenizer file
    same = tmp_path / "same-onnx"
    shutil.copytree(export_onnx(tiny_checkpoint, tmp_path / "mine").path, same)
    (same / "spiece.model").write_bytes((tiny_vocab.parent / "corpus.txt").read_bytes())
    code, _, err = _cli(
        monkeypatch,
        capsys,
        "bench",
        "-m",
        str(tiny_checkpoint),
        "--backends",
        "ort",
        "--onnx",
        str(same),
        "--new-tokens",
        "3",
        "--context",
        "",
        "--repeats",
        "1",
        "-o",
        str(tmp_path / "b2"),
    )
    assert code == 1 and "another tokenizer" in err


def test_bench_leaves_no_export_behind(monkeypatch, capsys, tmp_path, tiny_checkpoint):
    """The ONNX export made for the ort rows lives in a temp dir that is removed when the run ends."""
    import tempfile

    scratch = tmp_path / "tmp"
    scratch.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(scratch))
    out = tmp_path / "b"
    args = ("bench", "-m", str(tiny_checkpoint), "--backends", "torch,ort", "--new-tokens", "2", "--context", "")
    code, _, err = _cli(monkeypatch, capsys, *args, "--repeats", "1", "-o", str(out))
    assert code == 0, err
    data = json.loads((out / "bench.json").read_text())
    assert {r["backend"] for r in data["results"]} == {"torch", "ort"}
    assert data["environment"]["device"] == "auto" and data["environment"]["devices"] == {"torch": "cpu", "ort": "cpu"}
    assert list(scratch.iterdir()) == []


class FakeGpuPeak:
    def __init__(self, runner):
        self.runner, self.events = runner, []

    def reset(self):
        self.events.append(("reset", len(self.runner.calls)))

    def read(self):
        self.events.append(("read", len(self.runner.calls)))
        return 123.0


def test_gpu_peak_is_reset_per_row_and_shown_only_where_measured(tmp_path):
    runner = FixedRunner("torch", 0.01, [0.001] * 8)
    peak = FakeGpuPeak(runner)
    case = harness.Case(1, 4, 5, "base")
    prompts = np.zeros((1, 4), dtype=np.int64)
    measured = harness.measure(runner, case, prompts, repeats=2, gpu_peak=peak)
    assert peak.events == [("reset", 1), ("read", 3)]  # after the warm-up, around the timed runs
    other = harness.measure(FixedRunner("ort", 0.01, [0.001] * 8), case, prompts, repeats=1)
    assert measured.gpu_peak_mb == 123.0 and other.gpu_peak_mb is None
    rows = report.with_ratios([measured, other])
    md = report.markdown(rows, report.environment(), "cpm bench")
    assert "| RSS MB | GPU MB | decode x |" in md and "GPU MB = peak GPU memory" in md
    assert "| 123 |" in md and md.count("| - |") >= 1
    cpu_only = report.markdown(report.with_ratios([other]), report.environment(), "cpm bench")
    assert "GPU MB" not in cpu_only


def test_ensure_artifact_reexports_an_older_graph_format(tmp_path, tiny_checkpoint):
    """A benchmark's work dir reuses an export of the same weights only when this code wrote its graph."""
    from cpm_infer.artifact import read_manifest, write_manifest
    from cpm_infer.bench.setup import ensure_artifact
    from export.onnx_export import GRAPH_FORMAT

    said: list[str] = []

    def exports() -> int:
        return sum(line.startswith(f"exporting {tmp_path}") for line in said)

    art = ensure_artifact(tiny_checkpoint, tmp_path / "art", say=said.append)
    assert exports() == 1 and read_manifest(art).details["graph_format"] == GRAPH_FORMAT
    ensure_artifact(tiny_checkpoint, art, say=said.append)
    assert exports() == 1  # reused
    manifest = read_manifest(art)
    manifest.details["graph_format"] = GRAPH_FORMAT - 1
    write_manifest(art, manifest)
    ensure_artifact(tiny_checkpoint, art, say=said.append)
    assert exports() == 2 and read_manifest(art).details["graph_format"] == GRAPH_FORMAT
