"""INT8 / INT4 quantized export: parity with float32, the quality gate, the manifest, refusals, CLI."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
from conftest import run_cli

from tests.conftest import CORPUS

pytest.importorskip("onnxruntime")
pytest.importorskip("torch")

# Quantized vs float32 graph, max |log p| difference over all positions (nats). Measured on this tiny model
# (seeds 0-2): int8 0.007-0.008, int4 0.042-0.044, int4 --fast 0.104-0.130 (the former default, which the int4
# bound excludes), int4 --fast --block-size 32 --lm-head int8 0.071-0.077 (initializer_range 0.02; wider random
# inits amplify errors).
LOGPROB_TOLERANCE = {"int8": 0.05, "int8-per-channel": 0.05, "int4": 0.07, "int4-fast": 0.3}


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
    fast = QuantizeOptions("int4", gate_text, fast=True)
    out["int4-fast"] = export_onnx(fp32_artifact, root / "int4-fast", quantize=fast).path
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


@pytest.mark.parametrize("scheme", ["int8", "int8-per-channel", "int4", "int4-fast"])
def test_quantized_logprobs_close_to_fp32(fp32_artifact, quantized, scheme):
    ids = np.random.default_rng(0).integers(0, _vocab(fp32_artifact), size=(2, 40))
    diff = np.abs(_logprobs(quantized[scheme], ids) - _logprobs(fp32_artifact, ids)).max()
    assert 0 < diff <= LOGPROB_TOLERANCE[scheme]  # > 0: the weights really changed
    if scheme == "int4-fast":  # the former default does not meet the int4 default's bound
        assert diff > LOGPROB_TOLERANCE["int4"]


def _precisions(details: dict) -> dict[str, list[tuple]]:
    """matrix -> [(precision, block size, zero points, algorithm, layers)] from a manifest's ``matrices``."""
    return {
        matrix: [
            (e["precision"], e.get("block_size"), e.get("zero_points"), e.get("algorithm"), e.get("layers"))
            for e in entries
        ]
        for matrix, entries in details["matrices"].items()
    }


def _matmul_bits(artifact: Path) -> dict[str, tuple[int, int, bool]]:
    """weight -> (bits, block size, has zero points) of every MatMulNBits in the artifact's graph."""
    import onnx
    from onnx import helper

    from cpm_infer.artifact import read_manifest

    graph = onnx.load(str(artifact / read_manifest(artifact).graph_files["model"]), load_external_data=False)
    out = {}
    for node in graph.graph.node:
        if node.op_type == "MatMulNBits":
            attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
            weight = re.sub(r"_Q\d+(G\d+)?$", "", node.input[1])  # the quantizers' suffix on the float weight's name
            out[weight] = (attrs["bits"], attrs["block_size"], len(node.input) > 3 and bool(node.input[3]))
    return out


@pytest.mark.parametrize("scheme", ["int8", "int4"])
def test_manifest_records_scheme_and_gate(quantized, scheme):
    from cpm_infer.artifact import read_manifest

    manifest = read_manifest(quantized[scheme])
    q = manifest.details["quantization"]
    assert manifest.graph_files == {"model": f"model_{scheme}.onnx"}  # float32 graphs are not shipped
    assert q["scheme"] == scheme and q["recipe"] == "default" and q["embedding"] == "float32"
    assert q["operators"] == {"MatMulNBits": 9}  # 4 per layer + LM head; the embedding Gather stays float32
    if scheme == "int4":  # blocks of 128 without zero points: 4-bit, the first block and the LM head 8-bit
        assert (q["block_size"], q["symmetric"], q["accuracy_level"], q["algorithm"]) == (128, True, 4, "rtn")
        assert (q["lm_head"], q["int8_matrices"], q["int8_block_size"], q["lm_head_block_size"]) == (
            "int8",
            ["h.0"],
            128,
            128,
        )
        assert "MatMulNBits, bits 4 and 8" in q["method"]
        int4, int8 = ("int4", 128, False, "rtn", [1]), ("int8", 128, False, "rtn", [0])
        assert _precisions(q) == {
            **{matrix: [int8, int4] for matrix in ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")},
            "lm_head": [("int8", 128, False, "rtn", None)],
            "embedding": [("float32", None, None, None, None)],
        }
        bits = _matmul_bits(quantized[scheme])
        assert {w: b for w, b in bits.items() if w.startswith("blocks.0.") or w.startswith("lm_head")} == {
            **{f"blocks.0.{w}": (8, 128, False) for w in ("attn_w", "proj_w", "fc_w", "mlp_proj_w")},
            "lm_head.weight_t": (8, 128, False),
        }
        assert all(b == (4, 128, False) for w, b in bits.items() if w.startswith("blocks.1."))
    else:  # 8-bit k-quant blocks of 64 with zero points; the LM head q8_0's symmetric blocks of 32; embedding float32
        assert (q["block_size"], q["symmetric"], q["accuracy_level"], q["algorithm"]) == (64, False, 4, "k_quant")
        assert (q["lm_head"], q["lm_head_block_size"]) == ("int8", 32)
        assert "per_channel" not in q and "int8_block_size" not in q and "MatMulNBits, bits 8" in q["method"]
        assert {e["precision"] for entries in q["matrices"].values() for e in entries} == {"int8", "float32"}
        bits = _matmul_bits(quantized[scheme])
        assert bits.pop("lm_head.weight_t") == (8, 32, False)
        assert set(bits.values()) == {(8, 64, True)}
    gate = q["gate"]
    assert gate["passed"] and not gate["forced"] and gate["tokens"] > 1000
    assert gate["increase"] == pytest.approx(gate["quantized_perplexity"] / gate["fp32_perplexity"] - 1)
    assert gate["threshold"] == {"int8": 0.02, "int4": 0.10}[scheme]
    # The KL half of the gate: measured on this tiny model int8 1.3e-6, int4 4.3-4.8e-5 (--fast 2.5-2.8e-4).
    assert gate["kl_threshold"] == {"int8": 0.0198, "int4": 0.0953}[scheme] and gate["kl_positions"] == 1024
    assert 0 < gate["kl_mean"] < {"int8": 1e-5, "int4": 1.5e-4}[scheme]


def test_int4_fast_is_the_former_default(quantized):
    """--fast: every matrix and the embedding 4-bit, blocks of 128, no zero points (faster, further from float32)."""
    from cpm_infer.artifact import read_manifest

    q = read_manifest(quantized["int4-fast"]).details["quantization"]
    assert (q["recipe"], q["lm_head"], q["embedding"], q["block_size"], q["symmetric"]) == (
        "fast",
        "int4",
        "int4",
        128,
        True,
    )
    assert q["operators"] == {"MatMulNBits": 9, "GatherBlockQuantized": 1} and q["int8_matrices"] == []
    assert {e["precision"] for entries in q["matrices"].values() for e in entries} == {"int4"}
    assert set(_matmul_bits(quantized["int4-fast"]).values()) == {(4, 128, False)}
    assert 1.5e-4 < q["gate"]["kl_mean"] < q["gate"]["kl_threshold"]


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


def test_quant_config_precisions_and_refusals():
    """Which precision each matrix gets, and the settings that do not go together (one-line errors)."""
    from export.quant_config import Precision, QuantizeError, config_for, matrix_of, parse_selector
    from export.quantize import QuantizeOptions

    assert matrix_of("blocks.11.mlp_proj_w") == ("mlp.c_proj", 11) and matrix_of("lm_head.weight_t") is None
    assert [parse_selector(s) for s in ("mlp.c_fc", "h.3", "h.3.attn.c_attn")] == [
        ("mlp.c_fc", None),
        (None, 3),
        ("attn.c_attn", 3),
    ]
    default = config_for("int4")
    assert default.precision("attn.c_attn", 0) == default.precision("lm_head") == Precision(8, 128, False)
    assert default.precision("attn.c_attn", 5) == Precision(4, 128, False) and default.precision("embedding") is None
    kq = config_for("int4", algorithm="k_quant", symmetric=False, block_size=64, int8_matrices=["mlp.c_proj"])
    assert kq.precision("mlp.c_fc", 0) == Precision(4, 64, True, "k_quant")
    assert kq.precision("mlp.c_proj", 3) == Precision(8, 128, False)
    assert config_for("int4", float32_matrices=["h.1.mlp.c_fc"]).precision("mlp.c_fc", 1) is None
    int8 = config_for("int8")  # k-quant's search at 8 bits; the LM head symmetric round to nearest as q8_0
    assert int8.precision("mlp.c_fc", 0) == Precision(8, 64, True, "k_quant")
    assert int8.precision("lm_head") == Precision(8, 32, False)
    like_body = QuantizeOptions("int8", lm_head="quantized").config()
    assert like_body.precision("lm_head") == Precision(8, 64, True, "k_quant")
    assert QuantizeOptions("int8", lm_head="int8").config() == int8
    per_channel = QuantizeOptions("int8", per_channel=True).config()
    assert per_channel.precision("mlp.c_fc", 0) == per_channel.precision("lm_head") == Precision(8, None, False)
    fast = QuantizeOptions("int4", fast=True).config()
    assert fast.recipe == "fast" and fast.precision("embedding") == fast.precision("lm_head") == Precision(
        4, 128, False
    )
    assert QuantizeOptions("int4", int8_matrices=()).config().precision("mlp.c_fc", 0) == Precision(4, 128, False)
    for make, says in [
        (lambda: config_for("int4", algorithm="k_quant"), "needs zero points"),
        (lambda: config_for("int4", algorithm="gptq", symmetric=False), "unknown algorithm 'gptq'"),
        (lambda: config_for("int8", algorithm="k_quant", symmetric=False, block_size=None), "needs a block size"),
        (lambda: config_for("int8", int8_matrices=["h.0"]), "8-bit matrices apply to int4"),
        (lambda: config_for("int4", int8_matrices=["h.0.mlp"]), "unknown matrix selector 'h.0.mlp'"),
        (lambda: config_for("int4", int8_block_size=48), "powers of two >= 16, got 48"),
        (lambda: config_for("int8", lm_head_block_size=24), "powers of two >= 16, got 24"),
        (lambda: config_for("int4", lm_head_block_size=32), "LM head applies to int8 in blocks"),
        (lambda: config_for("int4", "turbo"), "no recipe 'turbo'"),
        (lambda: QuantizeOptions("int8", fast=True).config(), "--fast applies to int4"),
        (lambda: QuantizeOptions("int8", int8_matrices=("h.0",)).config(), "--int8-matrices applies to int4"),
    ]:
        with pytest.raises(QuantizeError, match=says) as err:
            make()
        assert "\n" not in str(err.value)


def _whole_model_nodes_and_tensors(model) -> tuple[list, dict]:
    from onnx import numpy_helper

    nodes = sorted((n.op_type, n.name, tuple(n.input), tuple(n.output), str(n.attribute)) for n in model.graph.node)
    return nodes, {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}


def _streamed(path: Path) -> tuple[list, dict]:
    import onnx
    from onnx import numpy_helper

    model = onnx.load(str(path), load_external_data=False)
    nodes = sorted((n.op_type, n.name, tuple(n.input), tuple(n.output), str(n.attribute)) for n in model.graph.node)
    return nodes, {t.name: numpy_helper.to_array(t, str(path.parent)) for t in model.graph.initializer}


def test_streamed_int4_default_equals_onnx_runtime_whole_model(fp32_artifact, tmp_path):
    """The default int4 recipe node by node = ORT's MatMulNBitsQuantizer on the whole model, run twice: 8 bits on
    the first block and the untied LM head, then 4 bits on the other MatMuls (symmetric blocks of 128 both)."""
    import onnx
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    from cpm_infer.artifact import read_manifest
    from export.quant_config import config_for
    from export.quantize_graph import quantize_graph, untie_lm_head

    spec = read_manifest(fp32_artifact).spec
    quantize_graph(fp32_artifact / "model_optimized.onnx", tmp_path / "streamed.onnx", spec, config_for("int4"))
    model = onnx.load(str(fp32_artifact / "model_optimized.onnx"))
    head = untie_lm_head(model, spec)
    weights = {t.name for t in model.graph.initializer}
    matmuls = [n for n in model.graph.node if n.op_type == "MatMul" and n.input[1] in weights]
    eight = [n.name for n in matmuls if n.name == head or n.input[1].startswith("blocks.0.")]
    assert len(eight) == 5
    for bits, block, include in ((8, 128, eight), (4, 128, [n.name for n in matmuls if n.name not in eight])):
        quantizer = MatMulNBitsQuantizer(
            model,
            bits=bits,
            block_size=block,
            is_symmetric=True,
            accuracy_level=4,
            nodes_to_exclude=[n.name for n in model.graph.node if n.op_type == "MatMul" and n.name not in include],
            op_types_to_quantize=("MatMul",),
        )
        quantizer.process()
        model = quantizer.model.model
    want_nodes, want = _whole_model_nodes_and_tensors(model)
    got_nodes, got = _streamed(tmp_path / "streamed.onnx")
    assert got_nodes == want_nodes and sorted(got) == sorted(want)
    assert all(np.array_equal(got[k], want[k]) for k in want)


def test_streamed_k_quant_equals_onnx_runtime_whole_model(fp32_artifact, tmp_path, monkeypatch):
    """k-quant node by node, in slices of a few output columns = ORT's MatMulNBitsQuantizer with
    KQuantWeightOnlyQuantConfig on the whole model (zero points, float32 LM head and embedding)."""
    import onnx
    from onnxruntime.quantization.matmul_nbits_quantizer import KQuantWeightOnlyQuantConfig, MatMulNBitsQuantizer

    from cpm_infer.artifact import read_manifest
    from export import quantize_graph as qg
    from export.quant_config import config_for

    spec = read_manifest(fp32_artifact).spec
    kq = {"algorithm": "k_quant", "symmetric": False, "block_size": 32, "embedding": "float32", "lm_head": "float32"}
    config = config_for("int4", "fast", **kq)
    monkeypatch.setattr(qg, "KQUANT_CHUNK", 32 * 2 * 5)  # 5 columns of a 64-row matrix per k-quant call
    info = qg.quantize_graph(fp32_artifact / "model_optimized.onnx", tmp_path / "streamed.onnx", spec, config)
    assert info["matrices"]["attn.c_attn"] == [
        {"precision": "int4", "block_size": 32, "zero_points": True, "algorithm": "k_quant", "layers": [0, 1]}
    ]
    model = onnx.load(str(fp32_artifact / "model_optimized.onnx"))
    quantizer = MatMulNBitsQuantizer(
        model, block_size=32, is_symmetric=False, accuracy_level=4, algo_config=KQuantWeightOnlyQuantConfig()
    )
    quantizer.process()
    want_nodes, want = _whole_model_nodes_and_tensors(quantizer.model.model)
    got_nodes, got = _streamed(tmp_path / "streamed.onnx")
    assert got_nodes == want_nodes and sorted(got) == sorted(want)
    assert all(np.array_equal(got[k], want[k]) for k in want)


def test_kl_gate_refuses_and_records(fp32_artifact, quantized, tiny_vocab, gate_text):
    """The KL half of the gate refuses on its own (perplexity within its limit) and reports in one line."""
    from cpm_infer.artifact import read_manifest
    from cpm_infer.tokenizer import CpmTokenizer
    from export.quality_gate import QualityGateError, run_gate

    spec, tok = read_manifest(fp32_artifact).spec, CpmTokenizer(tiny_vocab)
    fp32, int4 = fp32_artifact / "model_optimized.onnx", quantized["int4-fast"] / "model_int4.onnx"
    with pytest.raises(QualityGateError, match=r"next-token KL from float32 .* \(limit 1e-05\)") as err:
        run_gate(fp32, int4, spec, tok, scheme="int4", gate_file=gate_text, kl_threshold=1e-5)
    assert "\n" not in str(err.value) and "refusing the export" in str(err.value)
    forced = run_gate(fp32, int4, spec, tok, scheme="int4", gate_file=gate_text, kl_threshold=1e-5, force=True)
    assert not forced.passed and forced.increase <= forced.threshold and forced.kl_mean > 1e-5
    assert forced.to_dict()["kl_threshold"] == 1e-5 and forced.kl_positions == 1024


def test_int4_with_int8_lm_head(fp32_artifact, gate_text, tmp_path):
    """--fast --block-size 32 --lm-head int8: int4 body, 8-bit LM head (llama.cpp keeps q4_0 files' output matrix at
    6 bits): the head's MatMulNBits has bits 8 and blocks of 32, every other matrix bits 4."""
    import onnx
    from onnx import helper

    from cpm_infer.artifact import read_manifest
    from export.onnx_export import export_onnx
    from export.quantize import QuantizeOptions

    options = QuantizeOptions("int4", gate_text, block_size=32, lm_head="int8", fast=True)
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
    assert 0 < diff <= LOGPROB_TOLERANCE["int4-fast"]


def test_quantized_weights_are_smaller(fp32_artifact, quantized):
    def graph_bytes(path: Path) -> int:
        from cpm_infer.artifact import read_manifest

        return (path / read_manifest(path).graph_files["model"]).stat().st_size

    fp32, int8, int4 = graph_bytes(fp32_artifact), graph_bytes(quantized["int8"]), graph_bytes(quantized["int4"])
    # The int4 default keeps the embedding float32 and pads this tiny model's 64-row matrices to its 128-row
    # blocks: smaller than float32 only. --fast (4-bit embedding) is the smallest.
    assert graph_bytes(quantized["int4-fast"]) < int8 < fp32 and int4 < fp32


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
    """--block-size, --lm-head, --fast, --int8-matrices, --gate-kl-threshold recorded in the manifest; values and
    combinations that do not apply are one-line errors."""
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
    assert (details["block_size"], details["lm_head"], details["lm_head_block_size"]) == (32, "int8", 128)
    code, err = export("int4-fast", "--quantize", "int4", "--gate-file", str(gate_text), "--fast",
                       "--gate-kl-threshold", "0.01")  # fmt: skip
    assert code == 0, err
    details = read_manifest(tmp_path / "int4-fast").details["quantization"]
    assert (details["recipe"], details["lm_head"], details["embedding"]) == ("fast", "int4", "int4")
    assert details["gate"]["kl_threshold"] == 0.01
    code, err = export("int4-mixed", "--quantize", "int4", "--gate-file", str(gate_text), "--int8-matrices",
                       "h.1.mlp.c_fc, attn.c_proj")  # fmt: skip
    assert code == 0, err
    details = read_manifest(tmp_path / "int4-mixed").details["quantization"]
    assert details["int8_matrices"] == ["h.1.mlp.c_fc", "attn.c_proj"]
    assert [e["layers"] for e in details["matrices"]["attn.c_proj"] if e["precision"] == "int8"] == [[0, 1]]
    assert [e["layers"] for e in details["matrices"]["mlp.c_fc"] if e["precision"] == "int8"] == [[1]]
    code, err = export("int4-none", "--quantize", "int4", "--gate-file", str(gate_text), "--int8-matrices", "none")
    assert code == 0, err
    details = read_manifest(tmp_path / "int4-none").details["quantization"]
    assert details["int8_matrices"] == [] and details["lm_head"] == "int8"
    assert {e["precision"] for e in details["matrices"]["attn.c_attn"]} == {"int4"}
    for extra, says in [
        (("--quantize", "int4", "--block-size", "24"), "power of two >= 16"),
        (("--quantize", "int4", "--lm-head", "int2"), "float32, int8 or quantized"),
        (("--quantize", "int8", "--block-size", "8"), "power of two >= 16"),
        (("--lm-head", "float32"), "apply with --quantize"),
        (("--per-channel",), "apply with --quantize"),
        (("--quantize", "int4", "--per-channel"), "applies to int8"),
        (("--quantize", "int8", "--fast"), "--fast applies to int4"),
        (("--fast",), "apply with --quantize"),
        (("--int8-matrices", "h.0"), "apply with --quantize"),
        (("--gate-kl-threshold", "0.1"), "apply with --quantize"),
        (("--quantize", "int8", "--int8-matrices", "h.0"), "--int8-matrices applies to int4"),
        (("--quantize", "int4", "--int8-matrices", "h.0.mlp"), "unknown matrix selector 'h.0.mlp'"),
    ]:
        code, err = export("refused", *extra)
        assert code == 1 and says in err and "Traceback" not in err, err
        assert not (tmp_path / "refused").exists()


def test_quantize_graph_says_its_progress_by_tenths(fp32_artifact, tmp_path):
    """A long quantization (k-quant on CPM-large: minutes) reports matrices done, at most once per tenth of them."""
    from cpm_infer.artifact import read_manifest
    from export.quant_config import config_for
    from export.quantize_graph import quantize_graph

    said: list[str] = []
    spec = read_manifest(fp32_artifact).spec
    info = quantize_graph(
        fp32_artifact / "model_optimized.onnx", tmp_path / "q.onnx", spec, config_for("int8"), say=said.append
    )
    total = info["quantized_nodes"]
    done = [int(line.split()[1]) for line in said]
    assert said[-1] == f"quantized {total} of {total} matrices" and all(f"of {total} matrices" in s for s in said)
    assert done == sorted(set(done)) and len(done) <= 10
