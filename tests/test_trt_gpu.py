"""Real TensorRT: build engines from a tiny ONNX artifact, run them, compare with ONNX Runtime.

Marked ``tensorrt``; skipped (with the reason) where TensorRT, cuda-python or a GPU is missing.
Run on a GPU machine with: pytest -q -m tensorrt tests/test_trt_gpu.py
"""

from __future__ import annotations

import json

import numpy as np
import pytest

pytestmark = pytest.mark.tensorrt


@pytest.fixture(scope="module")
def gpu():
    trt = pytest.importorskip("tensorrt", reason="TensorRT is not installed (pip install 'cpm-infer[tensorrt]')")
    from cpm_infer.backends.trt import cuda
    from cpm_infer.errors import CpmError

    try:
        info = cuda.gpu_info(0)
    except CpmError as exc:
        pytest.skip(f"no usable CUDA GPU: {exc}")
    return trt, info


@pytest.fixture(scope="module")
def onnx_dirs(gpu, request, tmp_path_factory):
    pytest.importorskip("onnxruntime")
    from export.onnx_export import export_onnx

    tiny_checkpoint = request.getfixturevalue("tiny_checkpoint")  # session-scoped: only once a GPU is known

    out = tmp_path_factory.mktemp("onnx")
    return {
        "float32": export_onnx(tiny_checkpoint, out / "fp32").path,
        "float16": export_onnx(tiny_checkpoint, out / "fp16", fp16=True).path,
    }


def _build(onnx_dir, out, precision, tmp_path):
    from export.tensorrt.engine_artifact import export_trt

    return export_trt(
        onnx_dir,
        out,
        precision=precision,
        max_batch=4,
        max_input=32,
        max_total=96,
        workspace_gb=1,
        timing_cache=tmp_path / "timing.cache",
    )


def test_fp32_engine_builds_validates_and_generates_like_onnx_runtime(gpu, onnx_dirs, tmp_path):
    from cpm_infer.backends import load_backend
    from cpm_infer.config import GenerationConfig
    from cpm_infer.engine.generate import generate

    trt, info = gpu
    result = _build(onnx_dirs["float32"], tmp_path / "engine", "fp32", tmp_path)
    d = result.manifest.details
    assert d["tensorrt_version"] == trt.__version__ and d["gpu_name"] == info.name
    assert result.validation["status"] == "passed", result.validation
    assert (tmp_path / "timing.cache").stat().st_size > 0
    engine, tok = load_backend("auto", result.path, device="cuda")
    reference, _ = load_backend("ort", onnx_dirs["float32"], device="cpu")
    prompts = [
        tok.encode(t) for t in ("滚滚长江东逝水", "话说天下大势", "白发")
    ]  # left-padded: a zero-length past per row
    config = GenerationConfig(max_new_tokens=16, temperature=0.0, ban_unk=False)
    assert [r.token_ids for r in generate(engine, prompts, config, tok)] == [
        r.token_ids for r in generate(reference, prompts, config, tok)
    ]
    engine.close()


@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_fp16_engine_passes_the_fp16_validation(gpu, onnx_dirs, tmp_path, dtype):
    from export.tensorrt.precision import PrecisionError, parse_version

    trt, info = gpu
    if info.compute_capability < (7, 0):
        pytest.skip(f"{info.name} has no fast FP16")
    try:
        result = _build(onnx_dirs[dtype], tmp_path / "engine", "fp16", tmp_path)
    except PrecisionError as exc:
        assert parse_version(trt.__version__)[0] >= 11 and dtype == "float32", exc
        pytest.skip(str(exc))
    report = json.loads((result.path / "validation.json").read_text())
    assert report["status"] == "passed" and report["greedy_agreement"] >= 0.95, report
    assert result.manifest.dtype == "float16"


def test_engine_refuses_another_gpu_model(gpu, onnx_dirs, tmp_path):
    from cpm_infer.backends import load_backend
    from cpm_infer.backends.trt.compat import EngineMismatchError

    result = _build(onnx_dirs["float32"], tmp_path / "engine", "fp32", tmp_path)
    manifest = json.loads((result.path / "manifest.json").read_text())
    manifest["details"]["gpu_name"] = "Some Other GPU"
    (result.path / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(EngineMismatchError, match="built for Some Other GPU"):
        load_backend("trt", result.path, device="cuda")


def test_decode_steps_allocate_nothing(gpu, onnx_dirs, tmp_path):
    """Device memory in use stays flat across decode steps (KV buffers are preallocated)."""
    from cpm_infer.backends import load_backend
    from cpm_infer.backends.trt import cuda

    result = _build(onnx_dirs["float32"], tmp_path / "engine", "fp32", tmp_path)
    engine, _ = load_backend("trt", result.path, device="cuda")
    rt = cuda.runtime()
    ids = np.array([[5, 6, 7]], dtype=np.int64)
    _, state = engine.prefill(ids, np.ones_like(ids), np.arange(3)[None])
    free_before = cuda.call(rt.cudaMemGetInfo(), "memory info")[0]
    for step in range(20):
        mask = np.ones((1, 4 + step), dtype=np.int64)
        _, state = engine.decode(state, np.array([[8]]), mask, np.array([[3 + step]]))
    assert cuda.call(rt.cudaMemGetInfo(), "memory info")[0] == free_before
    engine.close()
