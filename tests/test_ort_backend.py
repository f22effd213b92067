"""The ONNX Runtime backend: parity with eager (prefill, decode, padded batch, dropped rows), cache vs
no cache, IO binding vs none, 64 greedy tokens through the CLI, runs without torch, one-line errors."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from cpm_infer.engine.generate import left_pad, position_ids_from_mask

ort = pytest.importorskip("onnxruntime")
pytest.importorskip("onnx")
pytest.importorskip("torch")

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory, tiny_vocab) -> Path:
    """A tiny checkpoint with every parameter random (biases and LayerNorms too)."""
    from test_export_onnx import save_random_checkpoint

    return save_random_checkpoint(tiny_vocab, tmp_path_factory.mktemp("ckpt") / "tiny-random")


@pytest.fixture(scope="module")
def artifact(tmp_path_factory, tiny_checkpoint) -> Path:
    from export.onnx_export import export_onnx

    return export_onnx(tiny_checkpoint, tmp_path_factory.mktemp("ort") / "tiny-onnx").path


@pytest.fixture(scope="module")
def fused_artifact(tmp_path_factory, tiny_checkpoint) -> Path:
    """--optimize: the backend runs model_optimized.onnx (GroupQueryAttention with the KV cache shared
    between past and present, SkipLayerNorm, FastGelu)."""
    from export.onnx_export import export_onnx

    return export_onnx(tiny_checkpoint, tmp_path_factory.mktemp("ort") / "tiny-fused", optimize=True).path


@pytest.fixture(scope="module")
def backends(artifact, tiny_checkpoint):
    from cpm_infer.backends import load_backend

    torch_backend, tok = load_backend("torch", tiny_checkpoint)
    bound, _ = load_backend("ort", artifact)
    from cpm_infer.backends.ort_backend import load

    unbound, _ = load(artifact, io_binding=False)
    return torch_backend, bound, unbound, tok


def _run_cli(*args: str, block: str = "") -> subprocess.CompletedProcess:
    from test_export_onnx import BLOCKER as source  # the import-blocking CLI runner

    env = {**os.environ, "BLOCK": block or "nothing-blocked"}
    env.pop("CPM_DEBUG", None)
    return subprocess.run(
        [sys.executable, "-c", source, *args], capture_output=True, text=True, env=env, cwd=ROOT, timeout=120
    )


def _steps(backend, prompts, tokens, select_at=None, rows=None):
    """Prefill then decode ``tokens`` (B, S) column by column; optionally drop rows. Logits per step."""
    ids, mask, pos = left_pad(prompts, pad_id=0)
    logits, state = backend.prefill(ids, mask, pos)
    out = [logits]
    for step in range(tokens.shape[1]):
        if step == select_at:
            state = backend.select(state, rows)
            tokens, mask, pos = tokens[rows], mask[rows], pos[rows]
        mask = np.concatenate([mask, np.ones((len(mask), 1), dtype=np.int64)], axis=1)
        pos = pos[:, -1:] + 1
        logits, state = backend.decode(state, tokens[:, step : step + 1], mask, pos)
        out.append(logits)
    return out


PROMPTS = [[11, 12, 13, 14, 15, 16, 17], [21, 22, 23], [31]]
TOKENS = np.array([[40, 41, 42, 43, 44], [50, 51, 52, 53, 54], [60, 61, 62, 63, 64]], dtype=np.int64)


def test_prefill_decode_and_padded_batch_match_eager(backends):
    torch_backend, bound, _, _ = backends
    for ref, got in zip(_steps(torch_backend, PROMPTS, TOKENS), _steps(bound, PROMPTS, TOKENS), strict=True):
        assert got.dtype == np.float32 and got.shape == ref.shape
        np.testing.assert_allclose(got, ref, atol=1e-4, rtol=1e-4)


def test_fused_graph_matches_eager_with_padding_and_dropped_rows(backends, fused_artifact):
    from cpm_infer.backends.ort_backend import load

    torch_backend = backends[0]
    fused, _ = load(fused_artifact)
    assert "model_optimized.onnx" in fused.session._model_path
    for ref, got in zip(
        _steps(torch_backend, PROMPTS, TOKENS, 2, np.array([0, 2])),
        _steps(fused, PROMPTS, TOKENS, 2, np.array([0, 2])),
        strict=True,
    ):
        np.testing.assert_allclose(got, ref, atol=1e-4, rtol=1e-4)


def test_fused_graph_across_kv_buffer_growth(backends, fused_artifact):
    """The shared KV buffers start at 64 slots and grow (new buffers, re-bound) while decoding; rows
    dropped after the growth get new buffers too."""
    from cpm_infer.backends.ort_backend import load

    torch_backend = backends[0]
    fused, _ = load(fused_artifact)
    prompts = [list(range(10, 68)), list(range(20, 50))]
    tokens = np.arange(100, 124, dtype=np.int64).reshape(2, 12)
    for ref, got in zip(
        _steps(torch_backend, prompts, tokens, 9, np.array([1])),
        _steps(fused, prompts, tokens, 9, np.array([1])),
        strict=True,
    ):
        np.testing.assert_allclose(got, ref, atol=1e-4, rtol=1e-4)


def _feeds(spec, ids, keep):
    from cpm_infer import kv

    mask = np.ones_like(ids)
    empty = np.zeros(kv.kv_shape(spec, ids.shape[0], 0), dtype=np.float32)
    feeds = {kv.INPUT_IDS: ids, kv.ATTENTION_MASK: mask, kv.POSITION_IDS: position_ids_from_mask(mask)}
    return {**feeds, **dict.fromkeys(kv.past_names(spec.n_layer), empty), kv.LOGITS_TO_KEEP: np.array([keep])}


@pytest.mark.parametrize("which", ["plain", "fused"])
def test_logits_to_keep_returns_the_last_positions_of_every_position(backends, artifact, fused_artifact, which):
    """0 = every position; n = the last n (n past the sequence: every one); the presents do not depend on it."""
    from cpm_infer.backends.ort_backend import load

    backend, _ = load(fused_artifact if which == "fused" else artifact, io_binding=False)
    ids = np.array([[11, 12, 13, 14, 15, 16, 17], [21, 22, 23, 24, 25, 26, 27]], dtype=np.int64)
    every = backend.session.run(None, _feeds(backend.spec, ids, 0))
    assert every[0].shape == (2, 7, backend.spec.vocab_size)
    for keep, positions in ((1, 1), (3, 3), (7, 7), (50, 7)):
        got = backend.session.run(None, _feeds(backend.spec, ids, keep))
        assert got[0].shape == (2, positions, backend.spec.vocab_size)
        np.testing.assert_allclose(got[0], every[0][:, -positions:], atol=1e-5, rtol=1e-5)
        for a, b in zip(got[1:], every[1:], strict=True):
            np.testing.assert_array_equal(a, b)


def test_a_graph_without_logits_to_keep_still_runs(backends, artifact, tmp_path):
    """Artifacts exported before ``logits_to_keep`` (every position, always) load and give the same logits."""
    from cpm_infer import kv
    from cpm_infer.artifact import read_manifest, write_manifest
    from cpm_infer.backends.ort_backend import load
    from export.tensorrt.builder import engine_graph

    old = tmp_path / "old"
    shutil.copytree(artifact, old)
    (old / "model.onnx").write_bytes(engine_graph(artifact / "model.onnx"))  # the input made a constant 0
    manifest = read_manifest(old)
    manifest.inputs, manifest.dynamic_axes = kv.input_names(2), kv.dynamic_axes(2)
    write_manifest(old, manifest)
    for io_binding in (True, False):
        backend, _ = load(old, io_binding=io_binding)
        assert not backend.keep
        for ref, got in zip(_steps(backends[1], PROMPTS, TOKENS), _steps(backend, PROMPTS, TOKENS), strict=True):
            np.testing.assert_allclose(got, ref, atol=1e-5, rtol=1e-5)


def test_dropping_rows_matches_eager(backends):
    torch_backend, bound, unbound, _ = backends
    rows = np.array([0, 2])
    ref = _steps(torch_backend, PROMPTS, TOKENS, select_at=2, rows=rows)
    for backend in (bound, unbound):
        for r, g in zip(ref, _steps(backend, PROMPTS, TOKENS, select_at=2, rows=rows), strict=True):
            np.testing.assert_allclose(g, r, atol=1e-4, rtol=1e-4)


def test_io_binding_equals_plain_run(backends):
    _, bound, unbound, _ = backends
    for a, b in zip(
        _steps(bound, PROMPTS, TOKENS, 3, np.array([1, 2])),
        _steps(unbound, PROMPTS, TOKENS, 3, np.array([1, 2])),
        strict=True,
    ):
        np.testing.assert_array_equal(a, b)


def test_cache_equals_no_cache(backends):
    """Decoding with the cache gives the logits of running the whole sequence again from scratch."""
    _, bound, _, _ = backends
    cached = _steps(bound, PROMPTS, TOKENS)
    ids, mask, _ = left_pad([p + t for p, t in zip(PROMPTS, TOKENS.tolist(), strict=True)], pad_id=0)
    for n in range(TOKENS.shape[1] + 1):
        width = ids.shape[1] - TOKENS.shape[1] + n  # prompt + first n tokens
        m = mask[:, :width]
        full, _ = bound.prefill(ids[:, :width], m, position_ids_from_mask(m))
        np.testing.assert_allclose(cached[n], full, atol=1e-4, rtol=1e-4)


def test_kv_buffers_are_reused_across_steps(backends):
    _, bound, _, _ = backends
    ids, mask, pos = left_pad([[5, 6, 7]], pad_id=0)
    _, state = bound.prefill(ids, mask, pos)
    seen = set()
    for step in range(20):
        mask = np.concatenate([mask, [[1]]], axis=1)
        pos = pos[:, -1:] + 1
        _, state = bound.decode(state, np.array([[8 + step]]), mask, pos)
        seen.update(id(b) for b in state.buffers[0])
    # Two ping-pong buffers, grown geometrically: a handful of allocations over 20 steps, not 20.
    assert len(seen) <= 8 and state.past == 23


def test_cli_greedy_64_tokens_equal_eager(artifact, tiny_checkpoint, monkeypatch, capsys):
    from cpm_infer.cli.app import main

    def cli(*args: str) -> str:
        monkeypatch.setattr(
            sys,
            "argv",
            ["cpm", "generate", "-p", "话说天下大势，分久必合", "-n", "64", "-t", "0", "--ignore-eos", *args],
        )
        with pytest.raises(SystemExit) as done:
            main()
        assert done.value.code in (0, None)
        return capsys.readouterr().out

    eager = cli("-m", str(tiny_checkpoint), "--backend", "torch")
    onnx = cli("-m", str(artifact))  # backend auto-detected from manifest.json
    assert onnx == eager and len(eager.strip()) > 10


def test_library_greedy_tokens_equal_for_batches(backends):
    from cpm_infer.config import GenerationConfig
    from cpm_infer.engine.generate import generate

    torch_backend, bound, _, tok = backends
    prompts = [tok.encode(t) for t in ("话说天下大势", "滚滚长江东逝水，浪花淘尽英雄", "周末")]
    # A stop string this tiny model emits at different steps: rows drop out of the batch one by one.
    cfg = GenerationConfig(max_new_tokens=64, temperature=0, stop_strings=("又惊",))
    ref = generate(torch_backend, prompts, cfg, tok)
    got = generate(bound, prompts, cfg, tok)
    assert [r.token_ids for r in got] == [r.token_ids for r in ref]
    assert len({len(r.token_ids) for r in ref}) > 1  # rows did finish at different steps (select ran)


def test_runs_where_torch_cannot_be_imported(artifact):
    probe = _run_cli("generate", "-m", str(artifact), "-p", "话说", "-n", "8", "-t", "0", block="torch,transformers")
    assert probe.returncode == 0, probe.stderr
    assert probe.stdout.strip()
    # Same command with the torch backend must fail on the blocked import: the block is real.
    failed = _run_cli("generate", "-m", str(artifact), "--backend", "torch", "-p", "话说", block="torch,transformers")
    assert failed.returncode == 1 and "cpm-infer[torch]" in failed.stderr


def test_missing_onnxruntime_names_the_extra(artifact):
    proc = _run_cli("generate", "-m", str(artifact), "-p", "话说", block="onnxruntime")
    assert proc.returncode == 1 and proc.stderr.count("\n") == 1
    assert "pip install 'cpm-infer[ort]'" in proc.stderr


def test_cuda_without_gpu_is_one_line_error(artifact):
    if "CUDAExecutionProvider" in ort.get_available_providers():
        pytest.skip("onnxruntime has a CUDA provider here")
    proc = _run_cli("generate", "-m", str(artifact), "-p", "话说", "--device", "cuda")
    assert proc.returncode == 1 and proc.stderr.count("\n") == 1 and "no CUDA provider" in proc.stderr


def test_threads_setting_reaches_the_session(artifact):
    from cpm_infer.backends.ort_backend import load

    backend, _ = load(artifact, threads=1)
    assert backend.session.get_session_options().intra_op_num_threads == 1


@pytest.mark.parametrize("edit", ["layers", "heads", "graph"])
def test_manifest_not_matching_graph_is_one_line_error(artifact, tmp_path, edit):
    from cpm_infer.artifact import Manifest, read_manifest, write_manifest
    from cpm_infer.backends.ort_backend import load
    from cpm_infer.config import ModelSpec
    from cpm_infer.errors import CpmError

    broken = tmp_path / "broken"
    shutil.copytree(artifact, broken)
    m = read_manifest(broken)
    if edit == "graph":  # the graph file of another model under the same name
        (broken / "model.onnx").write_bytes(b"not an onnx graph")
        match = "onnxruntime cannot load"
    else:
        spec = m.spec.to_dict() | ({"n_layer": 3} if edit == "layers" else {"n_head": 2})
        m = Manifest(
            format="onnx",
            spec=ModelSpec(**spec),
            dtype=m.dtype,
            graph_files=m.graph_files,
            tokenizer_file=m.tokenizer_file,
            source_sha256=m.source_sha256,
        )
        write_manifest(broken, m)
        match = "manifest does not match the graph"
    with pytest.raises(CpmError, match=match) as info:
        load(broken)
    assert "\n" not in str(info.value)


def test_manifest_errors(artifact, tmp_path):
    from cpm_infer.artifact import ManifestError, read_manifest

    broken = tmp_path / "broken"
    shutil.copytree(artifact, broken)
    data = json.loads((broken / "manifest.json").read_text())
    (broken / "manifest.json").write_text(json.dumps({**data, "format": "tensorrt"}))
    with pytest.raises(ManifestError, match="tensorrt artifact, not onnx"):
        read_manifest(broken, expected_format="onnx")
    (broken / "manifest.json").write_text(json.dumps({**data, "schema_version": 99}))
    with pytest.raises(ManifestError, match="schema_version 99"):
        read_manifest(broken)
    (broken / "manifest.json").write_text(json.dumps({**data, "inputs": data["inputs"][:-1]}))
    with pytest.raises(ManifestError, match="KV contract"):
        read_manifest(broken)
    (broken / "manifest.json").write_text(json.dumps(data))
    (broken / "spiece.model").unlink()
    with pytest.raises(ManifestError, match="names spiece.model, which is missing"):
        read_manifest(broken)


def test_close_is_idempotent_and_final(artifact):
    from cpm_infer.backends.base import BackendClosedError
    from cpm_infer.backends.ort_backend import load

    backend, _ = load(artifact)
    ids, mask, pos = left_pad([[5, 6, 7]], pad_id=0)
    backend.prefill(ids, mask, pos)
    backend.close()
    backend.close()
    with pytest.raises(BackendClosedError, match="onnxruntime backend is closed"):
        backend.prefill(ids, mask, pos)
    with pytest.raises(BackendClosedError):
        backend.logits_all(ids, mask, pos)
