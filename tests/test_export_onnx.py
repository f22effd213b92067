"""ONNX export: the export module equals transformers, artifacts are complete and atomic, validation
catches disagreement, fp16 keeps LayerNorm/softmax in float32, --optimize is re-validated, bad input
gets one-line errors."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import run_cli

from cpm_infer import kv

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")
torch = pytest.importorskip("torch")

ROOT = Path(__file__).resolve().parents[1]
# Runs the CLI with some top-level packages made unimportable (BLOCK="torch,transformers").
BLOCKER = """
import os, sys
blocked = set(os.environ["BLOCK"].split(","))
class Blocker:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in blocked:
            raise ModuleNotFoundError(f"No module named {name!r} (blocked by the test)", name=name)
        return None
sys.meta_path.insert(0, Blocker())
from cpm_infer.cli.app import main
sys.argv = ["cpm", *sys.argv[1:]]
main()
"""


def run_blocked(block: str, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "BLOCK": block}
    env.pop("CPM_DEBUG", None)
    return subprocess.run(
        [sys.executable, "-c", BLOCKER, *args], capture_output=True, text=True, env=env, cwd=ROOT, timeout=120
    )


def randomize_vectors(model, seed: int = 1):
    """Give biases and LayerNorm parameters random values: a fresh GPT-2 has them all 0 or 1, which
    would hide mixed-up biases or norms (and the exporter would merge the identical tensors)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in model.parameters():
            if param.ndim == 1:
                param.add_(0.2 * torch.randn(param.shape, generator=gen))
    return model


def save_random_checkpoint(vocab: Path, out: Path) -> Path:
    from conftest import make_tiny_model

    from cpm_infer.tokenizer import CpmTokenizer
    from cpm_infer.torch_model import save_checkpoint

    tok = CpmTokenizer(vocab)
    model = randomize_vectors(make_tiny_model(tok.vocab_size, eod_id=tok.eod_id, pad_id=tok.pad_id))
    return save_checkpoint(model, vocab, out)


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory, tiny_vocab) -> Path:
    """Like conftest's tiny checkpoint, with every parameter random (this module's exports use it)."""
    return save_random_checkpoint(tiny_vocab, tmp_path_factory.mktemp("ckpt") / "tiny-random")


@pytest.fixture(scope="module")
def artifact(tmp_path_factory, tiny_checkpoint) -> Path:
    """The tiny checkpoint exported through the CLI (fp32, plain graph)."""
    out = tmp_path_factory.mktemp("onnx") / "tiny-onnx"
    code = subprocess.run(
        [sys.executable, "-m", "cpm_infer.cli.app", "export", "onnx", str(tiny_checkpoint), str(out)],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=300,
    )
    assert code.returncode == 0, code.stderr
    assert "passed" in code.stdout and "left-padded batch 3" in code.stdout  # the printed report
    return out


# -- the export module ------------------------------------------------------------------------


def _hf_vs_export(model, dtype=torch.float32):
    from cpm_infer.engine.generate import left_pad
    from export.gpt2 import ExportGPT2

    module = ExportGPT2.from_hf(model, dtype)
    ids, mask, pos = (torch.from_numpy(a) for a in left_pad([[11, 12, 13, 14, 15], [21, 22]], pad_id=0))
    real = mask.bool()
    with torch.no_grad():
        ref = model(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=True)
        got = module(ids, mask, pos, *module.empty_past(2))
        key_diff = (
            (ref.cache.layers[1].keys - got[3]).transpose(1, 2)[real].abs().max().item()
        )  # before the cache grows
        step_mask = torch.cat([mask, torch.ones(2, 1, dtype=torch.int64)], 1)
        ref2 = model(
            input_ids=torch.tensor([[3], [4]]),
            attention_mask=step_mask,
            position_ids=pos[:, -1:] + 1,
            cache=ref.cache,
            use_cache=True,
        )
        got2 = module(torch.tensor([[3], [4]]), step_mask, pos[:, -1:] + 1, *got[1:])
    logits_diff = (ref.logits - got[0])[real].abs().max().item()
    decode_diff = (ref2.logits - got2[0]).abs().max().item()
    return logits_diff, key_diff, decode_diff


@pytest.mark.parametrize(
    "variant",
    [{}, {"activation_function": "gelu"}, {"activation_function": "relu", "scale_attn_by_inverse_layer_idx": True}],
)
def test_export_module_equals_transformers(variant):
    from conftest import make_tiny_model

    model = make_tiny_model(120)
    for key, value in variant.items():
        setattr(model.config, key, value)
    if variant:  # rebuild with the changed config, same seed
        import transformers

        torch.manual_seed(0)
        model = transformers.GPT2LMHeadModel(model.config).eval()
    assert max(_hf_vs_export(randomize_vectors(model))) < 1e-5


def test_export_module_fp16_is_close_and_refuses_unknown_activation():
    from conftest import make_tiny_model

    from export.gpt2 import ExportGPT2, UnsupportedModelError

    model = randomize_vectors(make_tiny_model(120))
    assert max(_hf_vs_export(model, torch.float16)) < 0.05
    model.config.activation_function = "swish"
    with pytest.raises(UnsupportedModelError, match="swish"):
        ExportGPT2.from_hf(model)


# -- the artifact -----------------------------------------------------------------------------


def test_artifact_is_complete_and_manifest_matches(artifact, tiny_checkpoint):
    from cpm_infer.artifact import read_manifest
    from cpm_infer.checkpoint import open_checkpoint
    from cpm_infer.config import GenerationConfig

    names = sorted(p.name for p in artifact.iterdir())
    assert names == ["manifest.json", "model.onnx", "spiece.model", "validation.json"]
    assert not [p for p in artifact.parent.iterdir() if p.name.startswith(".")]  # no temp dirs left
    m = read_manifest(artifact, expected_format="onnx")
    ckpt = open_checkpoint(tiny_checkpoint)
    assert m.spec == ckpt.spec and m.dtype == "float32" and m.details["opset"] == 17
    assert m.source_sha256 == ckpt.weights_sha256()
    assert m.inputs == kv.graph_input_names(2) and m.outputs == kv.output_names(2)
    assert m.dynamic_axes == kv.dynamic_axes(2, keep=True)
    assert {"torch", "transformers", "onnx", "onnxruntime"} <= set(m.tools)
    assert GenerationConfig.from_dict(m.generation) == GenerationConfig()
    report = json.loads((artifact / m.validation_report).read_text())
    assert [r["status"] for r in report] == ["passed"]
    cases = {(c["case"], c["step"].split(" ")[0]) for c in report[0]["checks"]}
    assert {("batch 1", "prefill"), ("batch 4", "decode"), ("left-padded batch 3", "decode")} <= cases
    # One graph for prefill and decode: every contract axis is symbolic in the graph.
    session = ort.InferenceSession(str(artifact / "model.onnx"), providers=["CPUExecutionProvider"])
    shapes = {i.name: i.shape for i in session.get_inputs()} | {o.name: o.shape for o in session.get_outputs()}
    for name, axes in kv.dynamic_axes(2, keep=True).items():
        assert all(shapes[name][i] == dim for i, dim in axes.items()), (name, shapes[name])


def test_existing_out_dir_is_refused_then_replaced_with_force(monkeypatch, capsys, tiny_checkpoint, tmp_path):
    out = tmp_path / "art"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    code, _, err = run_cli(monkeypatch, capsys, "export", "onnx", str(tiny_checkpoint), str(out))
    assert code == 1 and err.strip() == f"error: {out} exists; pass --force to replace it"
    assert (out / "keep.txt").read_text() == "mine"
    code, _, err = run_cli(monkeypatch, capsys, "export", "onnx", str(tiny_checkpoint), str(out), "--force")
    assert code == 0, err
    assert not (out / "keep.txt").exists() and (out / "manifest.json").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["art"]


def test_failed_validation_names_output_and_keeps_only_the_report(monkeypatch, tiny_checkpoint, tmp_path):
    import export.onnx_export as onnx_export
    from export.validate import Check, ValidationError, ValidationReport

    def failing(graph, *args, **kwargs):
        check = Check("batch 4", "decode 2 (past 9)", 1e-7, 1e-4, 0.5, 1e-4, "present.1.value")
        return ValidationReport(graph.name, "float32", "CPUExecutionProvider", "failed", checks=[check])

    monkeypatch.setattr(onnx_export, "validate_onnx_graph", failing)
    with pytest.raises(
        ValidationError, match=r"present\.1\.value differs from eager PyTorch by 0\.5 .*batch 4, decode 2"
    ) as info:
        onnx_export.export_onnx(tiny_checkpoint, tmp_path / "art")
    assert info.value.output == "present.1.value" and info.value.max_diff == 0.5
    kept = tmp_path / "art.validation-failed.json"
    assert list(tmp_path.iterdir()) == [kept]  # no artifact, no staging directory: only the report
    assert f"(report: {kept})" in str(info.value)
    report = json.loads(kept.read_text())
    assert report[0]["status"] == "failed" and report[0]["checks"][0]["worst_present"] == "present.1.value"
    monkeypatch.undo()
    onnx_export.export_onnx(tiny_checkpoint, tmp_path / "art")  # a later successful export clears it
    assert sorted(p.name for p in tmp_path.iterdir()) == ["art"]


def test_interrupted_export_leaves_nothing(monkeypatch, tiny_checkpoint, tmp_path):
    import export.onnx_export as onnx_export

    def interrupted(module, tmp, *args):
        (tmp / "model.onnx").write_bytes(b"half a graph")
        raise KeyboardInterrupt

    monkeypatch.setattr(onnx_export, "_export_graph", interrupted)
    with pytest.raises(KeyboardInterrupt):
        onnx_export.export_onnx(tiny_checkpoint, tmp_path / "art")
    assert list(tmp_path.iterdir()) == []


def test_validation_detects_a_different_model(artifact):
    from conftest import make_tiny_model

    from cpm_infer.artifact import read_manifest
    from export.reference import record_eager
    from export.validate import ValidationError, validate_onnx_graph

    spec = read_manifest(artifact).spec
    other = make_tiny_model(spec.vocab_size, seed=1, n_positions=spec.n_positions)
    report = validate_onnx_graph(artifact / "model.onnx", record_eager(other, spec, decode_steps=1), spec, "float32")
    assert report.status == "failed"
    assert {c.via for c in report.checks} == {"graph", "backend"} and not any(c.ok for c in report.checks)
    with pytest.raises(ValidationError, match="logits differs from eager PyTorch by"):
        report.raise_for_failure()


def test_external_data_layout_loads_and_generates(tiny_checkpoint, tmp_path, artifact):
    from cpm_infer.backends import load_backend
    from cpm_infer.config import GenerationConfig
    from cpm_infer.engine.generate import generate
    from export.onnx_export import export_onnx

    result = export_onnx(tiny_checkpoint, tmp_path / "ext", external_data_threshold=0)
    assert result.manifest.graph_files == {"model": "model.onnx", "weights": "model.onnx.data"}
    assert (tmp_path / "ext" / "model.onnx").stat().st_size < 100_000  # weights live in the .data file
    cfg = GenerationConfig(max_new_tokens=16, temperature=0, ignore_eos=True)
    outs = []
    for path in (tmp_path / "ext", artifact):
        backend, tok = load_backend("ort", path)
        outs.append([r.token_ids for r in generate(backend, [tok.encode("话说天下大势")], cfg, tok)])
    assert outs[0] == outs[1]


def test_fp16_graph_keeps_layernorm_and_softmax_in_float32(tiny_checkpoint, tmp_path):
    from export.gpt2 import MASK_VALUE
    from export.onnx_export import export_onnx

    result = export_onnx(tiny_checkpoint, tmp_path / "fp16", fp16=True)
    assert result.manifest.dtype == "float16"
    report = result.reports[0]
    # Say exactly what ran: on this CPU the report either passed (with the casts caveat) or says why not.
    assert report.status in ("passed", "not run") and report.reason
    model = onnx.shape_inference.infer_shapes(onnx.load(str(tmp_path / "fp16" / "model.onnx")))
    types = {
        v.name: v.type.tensor_type.elem_type for v in [*model.graph.value_info, *model.graph.input, *model.graph.output]
    }
    assert types["past_key_values.0.key"] == onnx.TensorProto.FLOAT16 and types["logits"] == onnx.TensorProto.FLOAT
    safe = [n for n in model.graph.node if n.op_type in ("LayerNormalization", "Softmax")]
    assert len(safe) == 2 * 2 + 1 + 2  # ln_1, ln_2 per layer, ln_f, one softmax per layer
    assert all(types[n.input[0]] == onnx.TensorProto.FLOAT for n in safe)
    # The mask fill is a finite -1e4 (never finfo(float16).min, which overflows once added to).
    constants = [
        onnx.numpy_helper.to_array(a.t)
        for n in model.graph.node
        if n.op_type == "Constant"
        for a in n.attribute
        if a.name == "value"
    ]
    assert any(c.size == 1 and float(c.item()) == MASK_VALUE for c in constants)
    assert not any(c.size == 1 and float(c.item()) == float(np.finfo(np.float16).min) for c in constants)
    if report.status == "passed":  # the ORT backend runs it with float16 KV buffers
        from cpm_infer.backends import load_backend
        from cpm_infer.config import GenerationConfig
        from cpm_infer.engine.generate import generate

        cfg = GenerationConfig(max_new_tokens=16, temperature=0, ignore_eos=True)
        (eager, tok), (half, _) = load_backend("torch", tiny_checkpoint), load_backend("ort", tmp_path / "fp16")
        assert half.np_dtype == np.float16
        prompts = [tok.encode("话说天下大势"), tok.encode("滚滚长江")]
        assert [r.token_ids for r in generate(half, prompts, cfg, tok)] == [
            r.token_ids for r in generate(eager, prompts, cfg, tok)
        ]


def test_optimize_fuses_and_revalidates(tiny_checkpoint, tmp_path):
    from cpm_infer.artifact import read_manifest
    from export.onnx_export import export_onnx

    result = export_onnx(tiny_checkpoint, tmp_path / "opt", optimize=True)
    assert [r.graph for r in result.reports] == ["model.onnx", "model_optimized.onnx"]
    assert all(r.status == "passed" for r in result.reports)
    assert result.manifest.details["fusions"]["GroupQueryAttention"] == 2  # every layer's attention (export.kv_share)
    assert result.manifest.details["kv_cache"] == "shared"
    assert "SkipLayerNormalization" not in result.manifest.details["fusions"]  # slower than Add + LN on the CPU
    m = read_manifest(tmp_path / "opt")
    assert m.graph_files == {"model": "model_optimized.onnx", "portable": "model.onnx"}
    nodes = onnx.load(str(tmp_path / "opt" / "model_optimized.onnx")).graph.node
    ops = {n.op_type for n in nodes}
    assert {"LayerNormalization", "FastGelu", "GroupQueryAttention"} <= ops
    assert not ops & {"Softmax", "SkipLayerNormalization", "Split"}
    # q, k and v reach attention packed, as the one tensor of the qkv projection (no Split copies them apart)
    assert all(list(n.input[1:3]) == ["", ""] for n in nodes if n.op_type == "GroupQueryAttention")


# -- bad input --------------------------------------------------------------------------------


def test_not_gpt2_checkpoint_is_one_line_error(monkeypatch, capsys, tmp_path, tiny_checkpoint):
    bert = tmp_path / "bert"
    bert.mkdir()
    (bert / "config.json").write_text(json.dumps({"model_type": "bert", "architectures": ["BertModel"]}))
    code, _, err = run_cli(monkeypatch, capsys, "export", "onnx", str(bert), str(tmp_path / "out"))
    assert code == 1 and err.count("\n") == 1 and "bert model" in err and "GPT-2" in err
    assert not (tmp_path / "out").exists()


def test_cuda_without_gpu_is_one_line_error(monkeypatch, capsys, tmp_path, tiny_checkpoint):
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    code, _, err = run_cli(
        monkeypatch, capsys, "export", "onnx", str(tiny_checkpoint), str(tmp_path / "o"), "--device", "cuda"
    )
    assert code == 1 and err.count("\n") == 1 and "no CUDA GPU" in err


def test_missing_onnxruntime_names_the_extra(tmp_path, tiny_checkpoint):
    proc = run_blocked("onnxruntime", "export", "onnx", str(tiny_checkpoint), str(tmp_path / "o"))
    assert proc.returncode == 1
    assert proc.stderr.count("\n") == 1 and "pip install 'cpm-infer[export]'" in proc.stderr
    assert not (tmp_path / "o").exists()


def test_info_on_an_artifact_reads_its_manifest(monkeypatch, capsys, artifact, tmp_path):
    import shutil

    from conftest import run_cli

    code, out, err = run_cli(monkeypatch, capsys, "info", str(artifact))
    assert code == 0, err
    assert "onnx (schema 1" in out and "2 layers" in out and "model.onnx" in out and "<eod>" in out
    assert "validation" in out and "passed" in out
    broken = tmp_path / "broken"
    shutil.copytree(artifact, broken)
    (broken / "model.onnx").unlink()
    code, _, err = run_cli(monkeypatch, capsys, "info", str(broken))
    assert code == 1 and err.count("\n") == 1 and "names model.onnx, which is missing" in err
