"""INT8 / INT4 quantized export: parity with float32, the quality gate, the manifest, refusals, CLI."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from conftest import run_cli

from tests.conftest import CORPUS

pytest.importorskip("onnxruntime")
pytest.importorskip("torch")

# Quantized vs float32 graph, max |log p| difference over all positions (nats). Measured on this
# tiny model: int8 0.015, int4 0.12 (initializer_range 0.02; wider random inits amplify errors).
LOGPROB_TOLERANCE = {"int8": 0.05, "int8-per-channel": 0.05, "int4": 0.3}


def _checkpoint(tiny_vocab: Path, out: Path, *, seed: int = 0, init: float = 0.02) -> Path:
    """A 2-layer, 64-wide GPT-2, by default with GPT-2's own init (0.02)."""
    import torch
    import transformers

    from cpm_infer.config import ModelSpec
    from cpm_infer.tokenizer import CpmTokenizer
    from cpm_infer.torch_model import hf_config, save_checkpoint

    tok = CpmTokenizer(tiny_vocab)
    spec = ModelSpec(n_layer=2, n_head=4, n_embd=64, vocab_size=tok.vocab_size, n_positions=128)
    torch.manual_seed(seed)
    model = transformers.GPT2LMHeadModel(
        hf_config(spec, tok.eod_id, tok.pad_id, base={"initializer_range": init})
    ).eval()
    return save_checkpoint(model, tiny_vocab, out)


@pytest.fixture(scope="module")
def gate_text(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("gate") / "gate.txt"
    path.write_text((CORPUS + "\n") * 3, encoding="utf-8")  # ~1850 predicted tokens with the tiny vocab
    return path


@pytest.fixture(scope="module")
def fp32_artifact(tiny_vocab, tmp_path_factory) -> Path:
    from export.onnx_export import export_onnx

    root = tmp_path_factory.mktemp("quant")
    return export_onnx(_checkpoint(tiny_vocab, root / "ckpt"), root / "fp32", optimize=True).path


@pytest.fixture(scope="module")
def quantized(fp32_artifact, gate_text, tmp_path_factory) -> dict[str, Path]:
    from export.onnx_export import export_onnx
    from export.quantize import QuantizeOptions

    root = tmp_path_factory.mktemp("quantized")
    out = {
        s: export_onnx(fp32_artifact, root / s, quantize=QuantizeOptions(s, gate_text)).path for s in ("int8", "int4")
    }
    per_channel = QuantizeOptions("int8", gate_text, per_channel=True)
    out["int8-per-channel"] = export_onnx(fp32_artifact, root / "int8-per-channel", quantize=per_channel).path
    return out


def _vocab(artifact: Path) -> int:
    from cpm_infer.artifact import read_manifest

    return read_manifest(artifact).spec.vocab_size


def _logprobs(artifact: Path, ids: np.ndarray) -> np.ndarray:
    from cpm_infer.backends import load_backend

    backend, _ = load_backend("ort", artifact)
    mask = np.ones_like(ids)
    pos = np.broadcast_to(np.arange(ids.shape[1]), ids.shape).copy()
    logits = backend.logits_all(ids, mask, pos).astype(np.float64)
    peak = logits.max(-1, keepdims=True)
    return logits - peak - np.log(np.exp(logits - peak).sum(-1, keepdims=True))


@pytest.mark.parametrize("scheme", ["int8", "int8-per-channel", "int4"])
def test_quantized_logprobs_close_to_fp32(fp32_artifact, quantized, scheme):
    ids = np.random.default_rng(0).integers(0, _vocab(fp32_artifact), size=(2, 40))
    diff = np.abs(_logprobs(quantized[scheme], ids) - _logprobs(fp32_artifact, ids)).max()
    assert 0 < diff <= LOGPROB_TOLERANCE[scheme]  # > 0: the weights really changed


@pytest.mark.parametrize("scheme", ["int8", "int4"])
def test_manifest_records_scheme_and_gate(quantized, scheme):
    from cpm_infer.artifact import read_manifest

    manifest = read_manifest(quantized[scheme])
    q = manifest.details["quantization"]
    assert manifest.graph_files == {"model": f"model_{scheme}.onnx"}  # float32 graphs are not shipped
    assert q["scheme"] == scheme and q["lm_head"] == scheme
    if scheme == "int4":
        assert (q["block_size"], q["symmetric"], q["accuracy_level"], q["embedding"]) == (128, True, 4, "int4")
        assert q["operators"] == {"MatMulNBits": 9, "GatherBlockQuantized": 1}  # 4 per layer + LM head
    else:  # llama.cpp q8_0's layout: 8-bit blocks of 32 on every matrix, LM head included; embedding float32
        assert (q["block_size"], q["symmetric"], q["accuracy_level"], q["embedding"]) == (32, True, 4, "float32")
        assert q["operators"] == {"MatMulNBits": 9} and "per_channel" not in q
    assert f"MatMulNBits, bits {scheme[-1]}" in q["method"]
    gate = q["gate"]
    assert gate["passed"] and not gate["forced"] and gate["tokens"] > 1000
    assert gate["increase"] == pytest.approx(gate["quantized_perplexity"] / gate["fp32_perplexity"] - 1)
    assert gate["threshold"] == {"int8": 0.02, "int4": 0.10}[scheme]


def test_int8_per_channel_manifest(quantized):
    """--per-channel: quantize_dynamic's scheme, MatMulInteger on per-column int8 weights, activations per tensor."""
    from cpm_infer.artifact import read_manifest

    manifest = read_manifest(quantized["int8-per-channel"])
    q = manifest.details["quantization"]
    assert manifest.graph_files == {"model": "model_int8.onnx"}
    assert (q["per_channel"], q["reduce_range"], q["weight_type"], q["embedding"]) == (True, True, "QInt8", "float32")
    assert q["operators"]["MatMulInteger"] == 9 and "MatMulInteger" in q["method"] and "block_size" not in q
    assert q["lm_head"] == "int8" and q["gate"]["passed"] and q["gate"]["threshold"] == 0.02


def test_int8_config_refusals():
    from export.quantize import QuantizeError, QuantizeOptions, config_for

    with pytest.raises(QuantizeError, match="keeps the embedding float32"):
        config_for("int8", embedding="int8")
    with pytest.raises(QuantizeError, match="needs a block size"):
        config_for("int4", block_size=None)
    assert config_for("int8", block_size=64).bits == 8 and config_for("int4").bits == 4
    assert not QuantizeOptions("int8", per_channel=True).config().block_wise
    for options, says in [
        (QuantizeOptions("int4", per_channel=True), "applies to int8"),
        (QuantizeOptions("int8", block_size=32, per_channel=True), "exclude each other"),
    ]:
        with pytest.raises(QuantizeError, match=says):
            options.config()


def test_int4_with_int8_lm_head(fp32_artifact, gate_text, tmp_path):
    """int4 body, 8-bit LM head (llama.cpp keeps q4_0 files' output matrix at 6 bits): the head's MatMulNBits has
    bits 8 and blocks of 32, every other matrix bits 4."""
    import onnx
    from onnx import helper

    from cpm_infer.artifact import read_manifest
    from export.onnx_export import export_onnx
    from export.quantize import QuantizeOptions

    options = QuantizeOptions("int4", gate_text, block_size=32, lm_head="int8")
    art = export_onnx(fp32_artifact, tmp_path / "int4-head8", quantize=options).path
    q = read_manifest(art).details["quantization"]
    assert q["operators"] == {"MatMulNBits": 9, "GatherBlockQuantized": 1}
    graph = onnx.load(str(art / "model_int4.onnx"), load_external_data=False)
    bits = {
        n.input[1]: {a.name: helper.get_attribute_value(a) for a in n.attribute}
        for n in graph.graph.node
        if n.op_type == "MatMulNBits"
    }
    head = [name for name in bits if name.startswith("lm_head")]
    assert len(head) == 1 and (bits[head[0]]["bits"], bits[head[0]]["block_size"]) == (8, 32)
    assert all((v["bits"], v["block_size"]) == (4, 32) for k, v in bits.items() if k != head[0])
    ids = np.random.default_rng(0).integers(0, _vocab(fp32_artifact), size=(2, 40))
    reference = _logprobs(fp32_artifact, ids)
    diff = np.abs(_logprobs(art, ids) - reference).max()
    assert 0 < diff <= LOGPROB_TOLERANCE["int4"]


def test_quantized_weights_are_smaller(fp32_artifact, quantized):
    def graph_bytes(path: Path) -> int:
        from cpm_infer.artifact import read_manifest

        return (path / read_manifest(path).graph_files["model"]).stat().st_size

    fp32, int8, int4 = graph_bytes(fp32_artifact), graph_bytes(quantized["int8"]), graph_bytes(quantized["int4"])
    assert int4 < int8 < fp32


def test_gate_refuses_and_force_writes(fp32_artifact, tiny_vocab, gate_text, tmp_path):
    """A 'quantized' graph far worse than the reference is refused; forced, it is kept with its numbers."""
    from cpm_infer.artifact import read_manifest
    from cpm_infer.tokenizer import CpmTokenizer
    from export.onnx_export import export_onnx
    from export.quality_gate import QualityGateError, run_gate

    # A wide init (0.3) makes a confidently wrong model: perplexity far above the vocab size.
    wide = export_onnx(_checkpoint(tiny_vocab, tmp_path / "ckpt", init=0.3), tmp_path / "wide").path
    spec = read_manifest(fp32_artifact).spec
    tok = CpmTokenizer(tiny_vocab)
    worse, better = wide / "model.onnx", fp32_artifact / "model_optimized.onnx"
    with pytest.raises(QualityGateError, match=r"^quality gate FAILED: perplexity .* refusing the export") as err:
        run_gate(better, worse, spec, tok, scheme="int4", gate_file=gate_text)
    assert "\n" not in str(err.value)
    forced = run_gate(better, worse, spec, tok, scheme="int4", gate_file=gate_text, force=True)
    assert forced.quantized_perplexity > 10 * forced.fp32_perplexity and not forced.passed and forced.forced
    same = run_gate(better, better, spec, tok, scheme="int8", gate_file=gate_text, threshold=0.0)
    assert same.passed and same.increase == 0


def test_gate_file_too_short_refused(fp32_artifact, tmp_path):
    from export.onnx_export import export_onnx
    from export.quantize import QuantizeOptions

    short = tmp_path / "short.txt"
    short.write_text(CORPUS.splitlines()[0], encoding="utf-8")
    out = tmp_path / "q"
    with pytest.raises(Exception, match=r"predicted tokens; at least 1000 are needed") as err:
        export_onnx(fp32_artifact, out, quantize=QuantizeOptions("int8", short))
    assert "\n" not in str(err.value) and not out.exists()
    assert not list(tmp_path.glob(".q.tmp-*"))  # nothing half-written


def test_requantizing_refused(quantized, tmp_path):
    from export.onnx_export import export_onnx
    from export.quantize import QuantizeError, QuantizeOptions

    with pytest.raises(QuantizeError, match=r"is already quantized \(int8\)"):
        export_onnx(quantized["int8"], tmp_path / "again", quantize=QuantizeOptions("int4"))


def test_quantize_refuses_fp16_gpu_and_unknown_scheme(fp32_artifact, tmp_path):
    from export.onnx_export import export_onnx
    from export.quantize import QuantizeError, QuantizeOptions

    for kwargs, message in (({"fp16": True}, "drop --fp16"), ({"device": "cuda"}, "CPU provider")):
        with pytest.raises(QuantizeError, match=message):
            export_onnx(fp32_artifact, tmp_path / "x", quantize=QuantizeOptions("int8"), **kwargs)
    with pytest.raises(QuantizeError, match="unknown quantization scheme 'int3'"):
        export_onnx(fp32_artifact, tmp_path / "x", quantize=QuantizeOptions("int3"))


def test_untie_lm_head_keeps_logits(fp32_artifact, tmp_path):
    """The LM head rewrite alone (no quantization) changes nothing but the graph structure."""
    import onnx

    from cpm_infer.artifact import read_manifest
    from export.quantize_graph import untie_lm_head

    manifest = read_manifest(fp32_artifact)
    model = onnx.load(str(fp32_artifact / "model.onnx"))
    assert untie_lm_head(model, manifest.spec) is not None
    assert not [n for n in model.graph.node if n.op_type == "Gemm"]
    onnx.save(model, str(tmp_path / "model.onnx"))
    for name in ("manifest.json", "spiece.model"):
        (tmp_path / name).write_bytes((fp32_artifact / name).read_bytes())
    data = json.loads((tmp_path / "manifest.json").read_text())
    data["graph_files"] = {"model": "model.onnx"}
    (tmp_path / "manifest.json").write_text(json.dumps(data))
    ids = np.random.default_rng(1).integers(0, manifest.spec.vocab_size, size=(1, 20))
    np.testing.assert_allclose(_logprobs(tmp_path, ids), _logprobs(fp32_artifact, ids), atol=1e-5)


def test_cli_quantized_export_and_generate(tiny_vocab, gate_text, tmp_path, monkeypatch, capsys):
    """cpm export onnx CKPT OUT --quantize int4 from a checkpoint, gate printed, then cpm generate on it."""
    ckpt = _checkpoint(tiny_vocab, tmp_path / "ckpt")
    out = tmp_path / "int4"
    code, stdout, err = run_cli(
        monkeypatch,
        capsys,
        "export",
        "onnx",
        str(ckpt),
        str(out),
        "--optimize",
        "--quantize",
        "int4",
        "--gate-file",
        str(gate_text),
    )
    assert code == 0, err
    assert "quality gate passed: perplexity" in " ".join(stdout.split())
    code, stdout, err = run_cli(
        monkeypatch, capsys, "generate", "-m", str(out), "-p", "话说天下大势", "-n", "8", "-t", "0"
    )
    assert code == 0 and stdout.strip(), err
    code, _, err = run_cli(
        monkeypatch, capsys, "export", "onnx", str(out), str(tmp_path / "again"), "--quantize", "int8"
    )
    assert code == 1 and err.startswith("error: ") and "already quantized (int4)" in err and err.count("\n") == 1


def test_cli_int4_recipe_flags(fp32_artifact, gate_text, tmp_path, monkeypatch, capsys):
    """--block-size 32 --lm-head float32: the int4 recipe closest to float32 (the one that matches llama.cpp
    q4_0's quality in the peer run), recorded in the manifest; values that do not apply are one-line errors."""
    from cpm_infer.artifact import read_manifest

    def export(out: str, *extra: str) -> tuple[int, str]:
        code, _, err = run_cli(monkeypatch, capsys, "export", "onnx", str(fp32_artifact), str(tmp_path / out), *extra)
        return code, err

    code, err = export("int4-b32", "--quantize", "int4", "--gate-file", str(gate_text), "--block-size", "32",
                       "--lm-head", "float32")  # fmt: skip
    assert code == 0, err
    details = read_manifest(tmp_path / "int4-b32").details["quantization"]
    assert details["block_size"] == 32 and details["lm_head"] == "float32"
    code, err = export("int4-head8", "--quantize", "int4", "--gate-file", str(gate_text), "--block-size", "32",
                       "--lm-head", "int8")  # fmt: skip
    assert code == 0, err
    details = read_manifest(tmp_path / "int4-head8").details["quantization"]
    assert (details["block_size"], details["lm_head"], details["lm_head_block_size"]) == (32, "int8", 32)
    for extra, says in [
        (("--quantize", "int4", "--block-size", "24"), "power of two >= 16"),
        (("--quantize", "int4", "--lm-head", "int2"), "float32, int8 or quantized"),
        (("--quantize", "int8", "--block-size", "8"), "power of two >= 16"),
        (("--lm-head", "float32"), "apply with --quantize"),
        (("--per-channel",), "apply with --quantize"),
        (("--quantize", "int4", "--per-channel"), "applies to int8"),
    ]:
        code, err = export("refused", *extra)
        assert code == 1 and says in err and "Traceback" not in err, err
        assert not (tmp_path / "refused").exists()
