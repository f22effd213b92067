"""Engine artifact manifests, load-time compatibility checks and export argument checks (no TensorRT)."""

from __future__ import annotations

import importlib.util
import shutil

import pytest

from cpm_infer.artifact import Manifest, read_manifest, sha256_files, write_manifest
from cpm_infer.backends import detect_backend, load_backend
from cpm_infer.backends.trt.compat import EngineMismatchError, RuntimeInfo, check_engine_compatible
from cpm_infer.backends.trt.profiles import EngineLimits, ProfileError, make_profiles
from cpm_infer.config import ModelSpec
from cpm_infer.errors import CpmError
from export.tensorrt.engine_artifact import (
    ENGINE,
    TrtExportError,
    check_request,
    engine_details,
    export_trt,
    source_graph,
)
from export.tensorrt.precision import plan_build

HAS_TRT = importlib.util.find_spec("tensorrt") is not None
SPEC = ModelSpec(n_layer=2, n_head=4, n_embd=32, vocab_size=300, n_positions=128)
V100 = RuntimeInfo("10.4.0", "Tesla V100-SXM2-32GB", "7.0")


@pytest.fixture()
def engine_dir(tmp_path, tiny_vocab):
    """An engine artifact as `cpm export trt` lays it out (the engine bytes are a stand-in)."""
    out = tmp_path / "engine"
    out.mkdir()
    (out / ENGINE).write_bytes(b"not a real engine")
    shutil.copyfile(tiny_vocab, out / "spiece.model")
    limits = EngineLimits(2, 16, 64)
    plan = plan_build("fp16", "float32", (10, 4, 0))
    onnx_file = tmp_path / "model.onnx"
    onnx_file.write_bytes(b"graph")
    details = engine_details(
        here=V100,
        plan=plan,
        reason="auto -> fp16",
        limits=limits,
        profiles=make_profiles(SPEC, limits),
        onnx_sha256=sha256_files([onnx_file]),
        tokenizer_sha256=sha256_files([tiny_vocab]),
        source=Manifest("onnx", SPEC, "float32", {"model": "model.onnx"}, "spiece.model", "abc", details={"opset": 17}),
        workspace_bytes=2**30,
        fp32_layers=9,
    )
    write_manifest(
        out, Manifest("tensorrt", SPEC, plan.kv_dtype, {"model": ENGINE}, "spiece.model", "abc", details=details)
    )
    return out


def test_manifest_records_what_the_engine_depends_on(engine_dir, tiny_vocab):
    manifest = read_manifest(engine_dir, expected_format="tensorrt")
    d = manifest.details
    assert manifest.format == "tensorrt" and manifest.dtype == "float16"
    assert (d["tensorrt_version"], d["gpu_name"], d["compute_capability"]) == ("10.4.0", "Tesla V100-SXM2-32GB", "7.0")
    assert d["precision"] == "fp16" and d["build_mode"] == "fp16-constrained"
    assert d["build_note"].startswith("BuilderFlag.FP16 with FP32 precision constraints")
    assert [p["name"] for p in d["profiles"]] == ["prefill", "decode"]
    assert d["profiles"][0]["dims"]["past"] == [0, 0, 0]
    assert d["limits"] == {"max_batch": 2, "max_input": 16, "max_total": 64}
    assert d["tokenizer_sha256"] == sha256_files([tiny_vocab]) and len(d["onnx_sha256"]) == 64
    assert detect_backend(engine_dir) == "trt"


def test_compatibility_checks_refuse_in_one_line(engine_dir):
    details = read_manifest(engine_dir).details
    check_engine_compatible(details, V100)
    cases = [
        (RuntimeInfo("10.4.1", V100.gpu_name, "7.0"), "built with TensorRT 10.4.0 but TensorRT 10.4.1 is installed"),
        (RuntimeInfo("10.4.0", "Tesla V100-PCIE-16GB", "7.0"), "built for Tesla V100-SXM2-32GB"),
        (RuntimeInfo("10.4.0", "NVIDIA GeForce GTX 1080 Ti", "6.1"), "this GPU is NVIDIA GeForce GTX 1080 Ti"),
    ]
    for here, message in cases:
        with pytest.raises(EngineMismatchError, match=message) as info:
            check_engine_compatible(details, here)
        assert "\n" not in str(info.value) and "cpm export trt" in str(info.value)
    with pytest.raises(EngineMismatchError, match="lacks gpu_name"):
        check_engine_compatible({"tensorrt_version": "10.4.0", "compute_capability": "7.0"}, V100)


@pytest.mark.skipif(HAS_TRT, reason="checks the message shown when TensorRT is missing")
def test_loading_without_tensorrt_names_the_extra(engine_dir):
    with pytest.raises(CpmError, match=r"pip install 'cpm-infer\[tensorrt\]'") as info:
        load_backend("auto", engine_dir, device="cuda")
    assert "\n" not in str(info.value)


def test_loading_refuses_a_non_cuda_device(engine_dir):
    with pytest.raises(CpmError, match="not a CUDA device"):
        load_backend("trt", engine_dir, device="rocm")


def test_loading_an_onnx_artifact_as_trt_is_refused(tmp_path, tiny_vocab):
    shutil.copyfile(tiny_vocab, tmp_path / "spiece.model")
    (tmp_path / "model.onnx").write_bytes(b"graph")
    write_manifest(tmp_path, Manifest("onnx", SPEC, "float32", {"model": "model.onnx"}, "spiece.model", "abc"))
    with pytest.raises(CpmError, match="describes a onnx artifact, not tensorrt"):
        load_backend("trt", tmp_path, device="cuda")


@pytest.fixture(scope="module")
def onnx_dir(tiny_checkpoint, tmp_path_factory):
    pytest.importorskip("onnxruntime")
    from export.onnx_export import export_onnx

    return export_onnx(tiny_checkpoint, tmp_path_factory.mktemp("onnx") / "tiny").path


def test_request_checks_run_before_tensorrt_is_needed(onnx_dir, tmp_path):
    limits = EngineLimits(2, 16, 64)
    source = check_request(onnx_dir, tmp_path / "new", precision="auto", limits=limits, workspace_gb=1, force=False)
    graph, files = source_graph(onnx_dir, source)
    assert graph == onnx_dir / "model.onnx" and files == [graph]
    with pytest.raises(TrtExportError, match="--precision must be one of auto, fp16, fp32"):
        check_request(onnx_dir, tmp_path / "new", precision="int8", limits=limits, workspace_gb=1, force=False)
    with pytest.raises(TrtExportError, match="--workspace-gb must be positive"):
        check_request(onnx_dir, tmp_path / "new", precision="auto", limits=limits, workspace_gb=0, force=False)
    with pytest.raises(ProfileError, match="exceeds the model's context"):
        check_request(
            onnx_dir, tmp_path / "new", precision="auto", limits=EngineLimits(1, 8, 4096), workspace_gb=1, force=False
        )
    (tmp_path / "exists").mkdir()
    with pytest.raises(TrtExportError, match="exists; pass --force"):
        check_request(onnx_dir, tmp_path / "exists", precision="auto", limits=limits, workspace_gb=1, force=False)
    with pytest.raises(TrtExportError, match="must differ"):
        check_request(onnx_dir, onnx_dir, precision="auto", limits=limits, workspace_gb=1, force=True)
    with pytest.raises(CpmError, match="not an exported artifact"):
        check_request(tmp_path, tmp_path / "new", precision="auto", limits=limits, workspace_gb=1, force=False)


def test_portable_graph_is_what_tensorrt_parses(tmp_path):
    source = Manifest(
        "onnx",
        SPEC,
        "float32",
        {"model": "model_optimized.onnx", "portable": "model.onnx", "weights": "model.onnx.data"},
        "spiece.model",
        "abc",
    )
    graph, files = source_graph(tmp_path, source)
    assert graph == tmp_path / "model.onnx"
    assert files == [tmp_path / "model.onnx", tmp_path / "model.onnx.data"]


@pytest.mark.skipif(HAS_TRT, reason="checks the message shown when TensorRT is missing")
def test_export_without_tensorrt_names_the_extra_and_writes_nothing(onnx_dir, tmp_path):
    out = tmp_path / "engine"
    with pytest.raises(CpmError, match=r"tensorrt.*pip install 'cpm-infer\[tensorrt\]'"):
        export_trt(onnx_dir, out, max_batch=2, max_input=16, max_total=64)
    assert not out.exists() and list(tmp_path.iterdir()) == []


def test_loading_checks_the_tokenizer_fits_the_engine(engine_dir):
    """Like the ORT loader: a tokenizer with more pieces than the embedding is refused, before any GPU work."""
    manifest = read_manifest(engine_dir)
    small = ModelSpec(SPEC.n_layer, SPEC.n_head, SPEC.n_embd, 100, SPEC.n_positions)
    manifest.spec = small
    write_manifest(engine_dir, manifest)
    with pytest.raises(CpmError, match="embeds only 100: wrong tokenizer for this model"):
        load_backend("trt", engine_dir, device="cuda")
