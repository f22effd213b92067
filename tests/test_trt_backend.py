"""The TensorRT backend's own logic, run against a SIMULATION of TensorRT and the CUDA runtime.

No GPU or TensorRT here, so ``tensorrt`` and cuda-python are replaced by stand-ins that follow the
documented semantics the backend relies on: device memory is a heap of numpy byte arrays addressed
by integers, ``execute_async_v3`` reads the bound inputs at their addresses and shapes, runs the
real exported ONNX graph on ONNX Runtime, and writes contiguous outputs at the bound addresses. It
refuses shapes outside the active profile, null addresses and outputs that overlap inputs. This
checks buffer sizing, the KV ping-pong, the strided logits copy, row selection and int32/float16
I/O; it does NOT check TensorRT itself (see tests/test_trt_gpu.py for that).
"""

from __future__ import annotations

import ctypes
import json
import shutil
import sys
from types import SimpleNamespace

import numpy as np
import pytest
from conftest import run_cli as _run_cli

from cpm_infer import kv
from cpm_infer.artifact import Manifest, read_manifest, write_manifest
from cpm_infer.backends import load_backend
from cpm_infer.backends.base import BackendClosedError
from cpm_infer.backends.trt import cuda
from cpm_infer.backends.trt.backend import TrtBackendError, copy_runs
from cpm_infer.backends.trt.compat import RuntimeInfo
from cpm_infer.backends.trt.profiles import EngineLimits, make_profiles
from cpm_infer.config import GenerationConfig
from cpm_infer.errors import CpmError
from cpm_infer.generate import generate, left_pad
from export.tensorrt.engine_artifact import engine_details
from export.tensorrt.precision import plan_build
from export.validate import validate_backend


def test_copy_runs_merges_consecutive_rows():
    assert copy_runs(np.array([0, 1, 2])) == [(0, 0, 3)]
    assert copy_runs(np.array([1, 2, 4])) == [(1, 0, 2), (4, 2, 1)]
    assert copy_runs(np.array([3, 0])) == [(3, 0, 1), (0, 1, 1)]


def test_parse_device():
    """The TensorRT loader's devices go through cpm_infer.devices (cpu still means GPU 0 for an engine)."""
    from cpm_infer.devices import resolve_device

    index = lambda text: resolve_device(text, "trt").index  # noqa: E731
    assert index("cuda") == 0 and index("cuda:3") == 3 and index("cpu") == 0 and index("auto") == 0
    with pytest.raises(CpmError, match="not a CUDA device"):
        index("cuda:x")


def test_cuda_runtime_fails_in_one_line_without_a_gpu():
    """Correct on every machine: without cuda-python, with it but no GPU, and on a GPU machine."""
    from cpm_infer.devices import driver_gpu_count

    try:
        cuda.runtime()
    except CpmError as exc:  # cuda-python not installed (CI): names the extra
        assert "cpm-infer[tensorrt]" in str(exc)
        return
    gpus = driver_gpu_count()  # asked of the NVIDIA driver directly, not of the code under test
    if gpus == 0:  # installed, but this machine has no driver/GPU
        with pytest.raises(cuda.CudaError) as info:
            cuda.gpu_info(0)
        assert "\n" not in str(info.value) and str(info.value).startswith("CUDA device query")
        return
    gpu = cuda.gpu_info(0)  # a GPU machine: the query works, and a GPU beyond the last is one line
    assert gpu.name and gpu.compute_capability >= (3, 0) and gpu.total_memory > 0
    with pytest.raises(cuda.CudaError) as info:
        cuda.gpu_info(gpus)
    assert "\n" not in str(info.value) and f"only {gpus} CUDA device(s) are visible" in str(info.value)


# -- the simulation ----------------------------------------------------------------------------
class FakeCuda:
    """cuda-python's runtime module: (err, value) tuples, integer device pointers."""

    cudaError_t = SimpleNamespace(cudaSuccess=0)
    cudaMemcpyKind = SimpleNamespace(cudaMemcpyHostToDevice=1, cudaMemcpyDeviceToHost=2, cudaMemcpyDeviceToDevice=3)

    def __init__(self):
        self.heap, self.next, self.host = {}, 1 << 20, {}

    def cudaGetErrorName(self, err):
        return 0, b"cudaErrorFake"

    cudaGetErrorString = cudaGetErrorName

    def cudaGetDeviceCount(self):
        return 0, 1

    def cudaGetDeviceProperties(self, i):
        return 0, SimpleNamespace(name=b"Fake GPU\0\0", major=7, minor=5, totalGlobalMem=1 << 34)

    def cudaSetDevice(self, i):
        return (0,)

    def cudaMalloc(self, n):
        ptr, self.next = self.next, self.next + n + 4096  # gaps: an out-of-bounds access cannot land in a neighbour
        self.heap[ptr] = np.zeros(n, dtype=np.uint8)
        return 0, ptr

    def cudaFree(self, ptr):
        del self.heap[ptr]
        return (0,)

    def cudaMallocHost(self, n):
        buf = ctypes.create_string_buffer(n)
        self.host[ctypes.addressof(buf)] = buf
        return 0, ctypes.addressof(buf)

    def cudaFreeHost(self, ptr):
        del self.host[ptr]
        return (0,)

    def view(self, ptr, n):
        for base, mem in self.heap.items():
            if base <= ptr and ptr + n <= base + mem.size:
                return mem[ptr - base : ptr - base + n]
        raise AssertionError(f"device access {ptr:#x}+{n} outside every allocation")

    def cudaMemcpyAsync(self, dst, src, n, kind, stream):
        if kind == 1:
            self.view(dst, n)[:] = np.frombuffer(ctypes.string_at(src, n), dtype=np.uint8)
        elif kind == 2:
            ctypes.memmove(dst, self.view(src, n).ctypes.data, n)
        else:
            self.view(dst, n)[:] = self.view(src, n).copy()
        return (0,)

    def cudaMemcpy2DAsync(self, dst, dpitch, src, spitch, width, height, kind, stream):
        for r in range(height):
            self.cudaMemcpyAsync(dst + r * dpitch, src + r * spitch, width, kind, stream)
        return (0,)

    def cudaStreamCreate(self):
        return 0, 7

    def cudaStreamSynchronize(self, s):
        return (0,)

    def cudaStreamDestroy(self, s):
        return (0,)


class FakeContext:
    def __init__(self, engine):
        self.engine, self.profile, self.shapes, self.addr = engine, 0, {}, {}

    def set_optimization_profile_async(self, index, stream):
        self.profile, self.shapes, self.addr = index, {}, {}  # switching invalidates bindings
        return True

    def set_input_shape(self, name, shape):
        lo, _, hi = self.engine.get_tensor_profile_shape(name, self.profile)
        if not all(a <= s <= b for a, s, b in zip(lo, shape, hi, strict=True)):
            raise AssertionError(f"{name} shape {tuple(shape)} outside profile {self.profile}: {lo}..{hi}")
        self.shapes[name] = tuple(shape)
        return True

    def set_tensor_address(self, name, ptr):
        self.addr[name] = ptr
        return True

    def execute_async_v3(self, stream):
        e, cu = self.engine, self.engine.cuda
        feeds, regions = {}, []
        for name in kv.input_names(e.n_layer):
            shape, dt = self.shapes[name], e.dtypes[name]
            n = int(np.prod(shape)) * dt.itemsize
            assert self.addr.get(name), f"{name} bound to a null address"
            regions.append((self.addr[name], max(n, 1)))
            arr = cu.view(self.addr[name], n).view(dt).reshape(shape)
            feeds[name] = arr.astype(np.int64 if dt.kind == "i" else np.float32)
        outs = e.session.run(None, feeds)
        for name, value in zip(kv.output_names(e.n_layer), outs, strict=True):
            data = np.ascontiguousarray(value.astype(e.dtypes[name])).view(np.uint8).reshape(-1)
            for start, size in regions:  # TensorRT forbids outputs overlapping inputs
                assert self.addr[name] + data.size <= start or start + size <= self.addr[name], (
                    f"{name} overlaps an input"
                )
            cu.view(self.addr[name], data.size)[:] = data
        return True


class FakeEngine:
    def __init__(self, spec, profiles, session, kv_dtype, cuda_rt):
        self.n_layer, self.spec, self.session, self.cuda = spec.n_layer, spec, session, cuda_rt
        self.names = kv.input_names(spec.n_layer) + kv.output_names(spec.n_layer)
        self.num_io_tensors, self.num_optimization_profiles = len(self.names), 2
        self.profile_shapes = [p.shapes(spec) for p in profiles]
        self.dtypes = {
            n: np.dtype(np.int32) for n in kv.input_names(spec.n_layer)[:3]
        }  # TensorRT 8.x casts int64 inputs
        self.dtypes.update({n: np.dtype(kv_dtype) for n in self.names if "key" in n or "value" in n})
        self.dtypes[kv.LOGITS] = np.dtype(np.float32)

    def get_tensor_name(self, i):
        return self.names[i]

    def get_tensor_dtype(self, name):
        return self.dtypes[name]

    def get_tensor_profile_shape(self, name, profile):
        return self.profile_shapes[profile][name]

    def create_execution_context(self):
        return FakeContext(self)


def fake_tensorrt(engines):
    class ILogger:
        Severity = SimpleNamespace(INTERNAL_ERROR=0, ERROR=1, WARNING=2, INFO=3, VERBOSE=4)

        def __init__(self):
            pass

    class Runtime:
        def __init__(self, logger):
            assert isinstance(logger, ILogger)

        def deserialize_cuda_engine(self, data):
            return engines[bytes(data).decode()]

    return SimpleNamespace(__version__="10.4.0", ILogger=ILogger, Runtime=Runtime, nptype=lambda dt: dt)


@pytest.fixture(scope="module")
def onnx_artifact(tiny_checkpoint, tmp_path_factory):
    pytest.importorskip("onnxruntime")
    from export.onnx_export import export_onnx

    return export_onnx(tiny_checkpoint, tmp_path_factory.mktemp("onnx") / "tiny").path


@pytest.fixture()
def simulated(onnx_artifact, tmp_path, monkeypatch):
    """make(kv_dtype, limits) -> engine artifact dir served by the simulation."""
    import onnxruntime as ort

    source = read_manifest(onnx_artifact)
    session = ort.InferenceSession(str(onnx_artifact / "model.onnx"), providers=["CPUExecutionProvider"])
    fake_cuda, engines = FakeCuda(), {}
    monkeypatch.setattr(cuda, "runtime", lambda: fake_cuda)
    monkeypatch.setitem(sys.modules, "tensorrt", fake_tensorrt(engines))

    def make(kv_dtype="float32", limits=None):
        limits = limits or EngineLimits(4, 16, 40)
        out = tmp_path / f"engine-{kv_dtype}-{len(engines)}"
        out.mkdir()
        profiles = make_profiles(source.spec, limits)
        key = json.dumps([str(out), kv_dtype])
        engines[key] = FakeEngine(source.spec, profiles, session, kv_dtype, fake_cuda)
        (out / "model.engine").write_text(key)
        shutil.copyfile(onnx_artifact / source.tokenizer_file, out / source.tokenizer_file)
        precision = "fp16" if kv_dtype == "float16" else "fp32"
        plan = plan_build(precision, "float32", (10, 4, 0))
        details = engine_details(
            here=RuntimeInfo("10.4.0", "Fake GPU", "7.5"),
            plan=plan,
            reason="test",
            limits=limits,
            profiles=profiles,
            onnx_sha256="0" * 64,
            tokenizer_sha256="0" * 64,
            source=source,
            workspace_bytes=1,
            fp32_layers=0,
        )
        write_manifest(
            out,
            Manifest(
                "tensorrt",
                source.spec,
                plan.kv_dtype,
                {"model": "model.engine"},
                source.tokenizer_file,
                source.source_sha256,
                details=details,
            ),
        )
        return out

    make.onnx_dir, make.cuda = onnx_artifact, fake_cuda
    return make


def test_simulated_engine_generates_what_onnx_runtime_generates(simulated):
    engine, tok = load_backend("auto", simulated(), device="cuda")
    reference, _ = load_backend("ort", simulated.onnx_dir, device="cpu")
    assert engine.name == "trt" and engine.spec.n_positions == 40  # the loop stops at --max-total
    prompts = [tok.encode(t) for t in ("滚滚长江东逝水", "话说天下大势，分久必合", "白发")]
    config = GenerationConfig(max_new_tokens=12, temperature=0.0, ban_unk=False)
    got = generate(engine, prompts, config, tok)
    want = generate(reference, prompts, config, tok)
    assert [r.token_ids for r in got] == [r.token_ids for r in want]
    engine.close()
    engine.close()  # idempotent; afterwards every call refuses instead of touching freed buffers
    with pytest.raises(BackendClosedError, match="TensorRT backend is closed"):
        engine.prefill(*left_pad([[5, 6]], pad_id=0))


def test_select_and_ping_pong_match_the_reference(simulated):
    engine, _tok = load_backend("trt", simulated(), device="cuda:0")
    reference, _ = load_backend("ort", simulated.onnx_dir, device="cpu")
    ids, mask, pos = left_pad([[5, 6, 7, 8], [9, 10], [11, 12, 13]], pad_id=0)
    (a, sa), (b, sb) = engine.prefill(ids, mask, pos), reference.prefill(ids, mask, pos)
    np.testing.assert_allclose(a, b, atol=1e-4)
    rows = np.arange(3)
    for step in range(6):
        if step == 2:
            rows = np.array([0, 2])
            sa, sb = engine.select(sa, rows), reference.select(sb, rows)
            mask, pos, b = mask[rows], pos[rows], b[rows]
        nxt = b.argmax(-1)[:, None].astype(np.int64)
        pos = pos[:, -1:] + 1
        mask = np.concatenate([mask, np.ones((len(rows), 1), dtype=np.int64)], axis=1)
        (a, sa), (b, sb) = engine.decode(sa, nxt, mask, pos), reference.decode(sb, nxt, mask, pos)
        np.testing.assert_allclose(a, b, atol=1e-4, err_msg=f"step {step}")
    assert sa.batch == 2 and sa.length == 4 + 6
    engine.close()


def test_limits_and_stale_states_are_one_line_errors(simulated):
    engine, _ = load_backend("trt", simulated(limits=EngineLimits(2, 4, 8)), device="cuda")
    ids, mask, pos = left_pad([[5, 6], [7]], pad_id=0)
    _, old = engine.prefill(ids, mask, pos)
    with pytest.raises(TrtBackendError, match="a batch of 3 exceeds the engine's prefill limit of 2.*--max-batch"):
        engine.prefill(*left_pad([[5], [6], [7]], pad_id=0))
    with pytest.raises(TrtBackendError, match="a prompt of 5 .*--max-input"):
        engine.prefill(*left_pad([[5, 6, 7, 8, 9]], pad_id=0))
    _, state = engine.prefill(ids, mask, pos)
    one = np.ones((2, 1), dtype=np.int64)
    with pytest.raises(TrtBackendError, match="stale TensorRT state"):
        engine.decode(old, one, np.ones((2, 3), dtype=np.int64), one)
    with pytest.raises(TrtBackendError, match="not distinct rows"):
        engine.select(state, np.array([1, 1]))
    for _ in range(6):  # past 2 -> 8 = --max-total
        mask = np.concatenate([mask, one], axis=1)
        _, state = engine.decode(state, one, mask, one)
    with pytest.raises(TrtBackendError, match="exceeds the engine's decode limit.*--max-total"):
        engine.decode(state, one, np.concatenate([mask, one], axis=1), one)
    engine.close()


def test_fp16_kv_buffers_pass_the_fp16_validation(simulated):
    """float16 KV storage (2-byte buffers, half-precision rounding of the cache) against the float32
    graph: exercises validate_backend's fp16 tolerance and greedy agreement on real numbers."""
    engine, _ = load_backend("trt", simulated("float16"), device="cuda")
    reference, _ = load_backend("ort", simulated.onnx_dir, device="cpu")
    report = validate_backend(engine, reference, engine.model_spec, "fp16", max_batch=4)
    assert report.status == "passed", report.to_dict()
    assert 0 < report.max_diff and report.agreement >= 0.95
    strict = validate_backend(engine, reference, engine.model_spec, "fp32", max_batch=4)
    assert strict.max_diff == report.max_diff  # same numbers, judged by the fp32 budget
    engine.close()


def test_cpm_generate_serves_the_engine_artifact(simulated, monkeypatch, capsys):
    common = ("-p", "话说天下", "-n", "8", "-t", "0")
    code, via_engine, err = _run_cli(
        monkeypatch, capsys, "generate", "-m", str(simulated()), "--backend", "trt", "--device", "cuda", *common
    )
    assert code == 0, err
    code, via_onnx, err = _run_cli(monkeypatch, capsys, "generate", "-m", str(simulated.onnx_dir), *common)
    assert code == 0, err
    assert via_engine == via_onnx and via_engine.strip()


class _Shifted:
    """A backend whose logits are off by ``delta`` in one vocabulary column."""

    def __init__(self, inner, delta):
        self.inner, self.delta, self.name, self.spec = inner, delta, "shifted", inner.spec

    def _shift(self, out):
        logits, state = out
        logits = logits.copy()
        logits[:, 3] += self.delta
        return logits, state

    def prefill(self, *args):
        return self._shift(self.inner.prefill(*args))

    def decode(self, *args):
        return self._shift(self.inner.decode(*args))

    def select(self, state, rows):
        return self.inner.select(state, rows)


def test_validation_fails_beyond_tolerance_in_one_line(onnx_artifact):
    from export.validate import ValidationError

    a, _ = load_backend("ort", onnx_artifact, device="cpu")
    b, _ = load_backend("ort", onnx_artifact, device="cpu")
    ok = validate_backend(_Shifted(a, 1e-4), b, a.spec, "fp32")
    assert ok.status == "passed" and ok.agreement == 1.0
    bad = validate_backend(_Shifted(a, 50.0), b, a.spec, "fp32")
    assert bad.status == "failed" and bad.agreement < 1.0
    with pytest.raises(
        ValidationError, match="engine validation failed: logits differ from the ONNX graph by up to 50"
    ) as info:
        bad.raise_for_failure()
    assert "\n" not in str(info.value)
    assert bad.to_dict()["min_agreement"] == 1.0 and len(bad.to_dict()["checks"]) == 12
