"""The ONNX Runtime backend's CUDA-only code, run where it can be: CUDA provider options (TF32 off for
float32 graphs) and the device-resident KV path (OrtValue buffers, rows gathered by an ORT graph instead
of a host round trip), the latter on the CPU provider, where the same code binds ("cpu", 0) instead of
("cuda", N). Nothing here runs on a GPU."""

from __future__ import annotations

import numpy as np
import pytest

from cpm_infer.backends.ort_backend import cuda_provider_options
from cpm_infer.engine.generate import left_pad

ort = pytest.importorskip("onnxruntime")
pytest.importorskip("onnx")


def test_tf32_is_off_unless_asked():
    assert cuda_provider_options(1) == {"device_id": "1", "use_tf32": "0", "arena_extend_strategy": "kSameAsRequested"}
    assert cuda_provider_options(0, tf32=True)["use_tf32"] == "1"


def test_cuda_sessions_get_the_provider_options(monkeypatch, tmp_path):
    """create_session hands the CUDA provider its options (ORT itself is faked: no GPU here)."""
    from cpm_infer.backends import ort_backend

    seen = {}

    class Session:
        def __init__(self, path, options, providers):
            seen["providers"] = providers

        def get_providers(self):
            return [seen["providers"][0][0], "CPUExecutionProvider"]

    monkeypatch.setattr(ort, "get_available_providers", lambda: ["CUDAExecutionProvider", "CPUExecutionProvider"])
    monkeypatch.setattr("cpm_infer.devices.driver_gpu_count", lambda: 2)  # the driver "sees" two GPUs
    monkeypatch.setattr(ort, "InferenceSession", Session)
    ort_backend.create_session(tmp_path / "model.onnx", device="cuda:1")
    assert seen["providers"] == [
        ("CUDAExecutionProvider", {"device_id": "1", "use_tf32": "0", "arena_extend_strategy": "kSameAsRequested"}),
        "CPUExecutionProvider",
    ]
    ort_backend.create_session(tmp_path / "model.onnx", device="cuda", tf32=True)
    assert seen["providers"][0][1]["use_tf32"] == "1"


def test_cuda_sessions_are_set_up_for_models_over_2_gb(monkeypatch, tmp_path):
    """Opened by path (ORT resolves external data beside the graph), initializers in plain device
    allocations outside the arena, and an arena that grows by what is asked, not by doubling: a multi-GB
    model does not reserve up to twice its size on the GPU (ORT itself is faked: no GPU here)."""
    from cpm_infer.backends import ort_backend

    seen = {}

    class Session:
        def __init__(self, path, options, providers):
            seen.update(path=path, options=options, providers=providers)

        def get_providers(self):
            return ["CUDAExecutionProvider", "CPUExecutionProvider"]

    monkeypatch.setattr(ort, "get_available_providers", lambda: ["CUDAExecutionProvider", "CPUExecutionProvider"])
    monkeypatch.setattr("cpm_infer.devices.driver_gpu_count", lambda: 1)
    monkeypatch.setattr(ort, "InferenceSession", Session)
    ort_backend.create_session(tmp_path / "model.onnx", device="cuda")
    assert seen["path"] == str(tmp_path / "model.onnx")
    assert seen["providers"][0][1]["arena_extend_strategy"] == "kSameAsRequested"
    assert seen["options"].get_session_config_entry("session.use_device_allocator_for_initializers") == "1"
    ort_backend.create_session(tmp_path / "model.onnx", device="cpu")
    assert seen["providers"] == ["CPUExecutionProvider"]


@pytest.mark.parametrize("dtype", [np.float32, np.float16])
def test_row_gather_copies_rows_between_ort_values(dtype):
    from cpm_infer.backends.ort_gather import RowGather

    gather = RowGather(ort, 3, dtype, device=("cpu", 0), providers=["CPUExecutionProvider"])
    rng = np.random.default_rng(0)
    sources = [rng.standard_normal((4, 6)).astype(dtype) for _ in range(3)]
    src = [ort.OrtValue.ortvalue_from_numpy(s.reshape(-1)) for s in sources]
    dst = [ort.OrtValue.ortvalue_from_shape_and_type([24], dtype, "cpu", 0) for _ in range(3)]
    rows = np.array([3, 0, 0])  # any order, duplicates allowed
    gather([v.data_ptr() for v in src], [v.data_ptr() for v in dst], batch=4, row=6, rows=rows)
    for source, out in zip(sources, dst, strict=True):
        np.testing.assert_array_equal(out.numpy()[:18].reshape(3, 6), source[rows])
    with pytest.raises(ValueError, match="outside a batch of 4"):
        gather([v.data_ptr() for v in src], [v.data_ptr() for v in dst], batch=4, row=6, rows=np.array([4]))


@pytest.fixture(scope="module")
def artifact(tiny_checkpoint, tmp_path_factory):
    from export.onnx_export import export_onnx

    return export_onnx(tiny_checkpoint, tmp_path_factory.mktemp("onnx") / "tiny").path


def test_device_resident_kv_matches_host_kv_through_select(artifact):
    """Prefill, decode, drop a row (gathered by the ORT graph), decode: the same logits as numpy buffers."""
    from cpm_infer.backends import load_backend

    host, _ = load_backend("ort", artifact, device="cpu")
    resident, _ = load_backend("ort", artifact, device="cpu")
    resident._device_buffers = True  # OrtValue buffers + RowGather: the CUDA code path, bound on the CPU
    ids, mask, pos = left_pad([[5, 6, 7, 8], [9, 10], [11, 12, 13]], pad_id=0)
    (a, sa), (b, sb) = resident.prefill(ids, mask, pos), host.prefill(ids, mask, pos)
    np.testing.assert_allclose(a, b, atol=1e-5)
    rows = np.arange(3)
    for step in range(4):
        if step == 1:
            rows = np.array([2, 0])
            sa, sb = resident.select(sa, rows), host.select(sb, rows)
            mask, pos, b = mask[rows], pos[rows], b[rows]
        nxt = b.argmax(-1)[:, None].astype(np.int64)
        pos = pos[:, -1:] + 1
        mask = np.concatenate([mask, np.ones((len(rows), 1), dtype=np.int64)], axis=1)
        (a, sa), (b, sb) = resident.decode(sa, nxt, mask, pos), host.decode(sb, nxt, mask, pos)
        np.testing.assert_allclose(a, b, atol=1e-5, err_msg=f"step {step}")
    assert resident._gather is not None and all(
        isinstance(buf, ort.OrtValue) for pair in sa.buffers for buf in pair if buf is not None
    )
