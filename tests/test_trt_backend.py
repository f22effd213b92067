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
import threading
from types import SimpleNamespace

import numpy as np
import pytest
from conftest import run_cli as _run_cli
from engine_contract import check_all

from cpm_infer import kv
from cpm_infer.artifact import Manifest, read_manifest, write_manifest
from cpm_infer.backends import load_backend
from cpm_infer.backends.base import BackendClosedError
from cpm_infer.backends.trt import cuda
from cpm_infer.backends.trt.backend import TrtBackendError, copy_runs
from cpm_infer.backends.trt.compat import RuntimeInfo
from cpm_infer.backends.trt.profiles import EngineLimits, make_profiles
from cpm_infer.config import GenerationConfig
from cpm_infer.engine.generate import generate, left_pad
from cpm_infer.errors import CpmError
from export.tensorrt.engine_artifact import engine_details
from export.tensorrt.precision import parse_version, plan_build
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
    """cuda-python's runtime module: (err, value) tuples, integer device pointers, two GPUs.

    The current device is per host thread (``cudaSetDevice``), 0 until a thread sets it. Memory and
    streams belong to the device current when they were made; using them while another device is
    current (work enqueued from a thread that never selected the GPU) fails the test."""

    cudaError_t = SimpleNamespace(cudaSuccess=0)
    cudaMemcpyKind = SimpleNamespace(cudaMemcpyHostToDevice=1, cudaMemcpyDeviceToHost=2, cudaMemcpyDeviceToDevice=3)

    def __init__(self, devices=2):
        self.heap, self.next, self.host = {}, 1 << 20, {}
        self.devices, self.owner, self.streams = devices, {}, {}  # pointer / stream -> device
        self._thread = threading.local()

    @property
    def current(self):
        return getattr(self._thread, "device", 0)

    def on_device(self, *, ptr=None, stream=None):
        device = self.owner[self.base(ptr)] if ptr is not None else self.streams[stream]
        assert device == self.current, f"GPU {device}'s memory/stream used while GPU {self.current} is current"

    def cudaGetErrorName(self, err):
        return 0, b"cudaErrorFake"

    cudaGetErrorString = cudaGetErrorName

    def cudaGetDeviceCount(self):
        return 0, self.devices

    def cudaGetDeviceProperties(self, i):
        return 0, SimpleNamespace(name=b"Fake GPU\0\0", major=7, minor=5, totalGlobalMem=1 << 34)

    def cudaSetDevice(self, i):
        if not 0 <= i < self.devices:
            return (101,)  # cudaErrorInvalidDevice
        self._thread.device = i
        return (0,)

    def cudaMalloc(self, n):
        ptr, self.next = self.next, self.next + n + 4096  # gaps: an out-of-bounds access cannot land in a neighbour
        self.heap[ptr], self.owner[ptr] = np.zeros(n, dtype=np.uint8), self.current
        return 0, ptr

    def cudaFree(self, ptr):
        self.on_device(ptr=ptr)
        del self.heap[ptr]
        return (0,)

    def cudaMallocHost(self, n):
        buf = ctypes.create_string_buffer(n)
        self.host[ctypes.addressof(buf)] = buf
        return 0, ctypes.addressof(buf)

    def cudaFreeHost(self, ptr):
        del self.host[ptr]
        return (0,)

    def base(self, ptr, n=0):
        for base, mem in self.heap.items():
            if base <= ptr and ptr + n <= base + mem.size:
                return base
        raise AssertionError(f"device access {ptr:#x}+{n} outside every allocation")

    def view(self, ptr, n):
        base = self.base(ptr, n)
        return self.heap[base][ptr - base : ptr - base + n]

    def cudaMemcpyAsync(self, dst, src, n, kind, stream):
        self.on_device(stream=stream)
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

    def cudaMemset2DAsync(self, ptr, pitch, value, width, height, stream):
        self.on_device(stream=stream)
        for r in range(height):
            self.view(ptr + r * pitch, width)[:] = value
        return (0,)

    def cudaStreamCreate(self):
        handle = 7 + len(self.streams)
        self.streams[handle] = self.current
        return 0, handle

    def cudaStreamSynchronize(self, s):
        self.on_device(stream=s)
        return (0,)

    def cudaStreamDestroy(self, s):
        self.on_device(stream=s)
        return (0,)


class FakeContext:
    """An IExecutionContext. ``own_memory``: TensorRT allocated its scratch; otherwise the application
    must give it (``set_device_memory``, or the 8.6 ``device_memory`` property) before executing."""

    def __init__(self, engine, own_memory):
        self.engine, self.profile, self.shapes, self.addr = engine, 0, {}, {}
        self.memory, self.switches = ("own", engine.scratch) if own_memory else None, []

    def set_optimization_profile_async(self, index, stream):
        if not 0 <= index < self.engine.num_optimization_profiles or index in self.engine.refused:
            raise RuntimeError("Error in set optimization profile async.")  # pyCore.cpp: never returns False
        self.engine.cuda.on_device(stream=stream)
        self.profile, self.shapes, self.addr = index, {}, {}  # switching invalidates bindings
        self.switches.append(index)
        return True

    def _set_memory(self, ptr):  # the 8.6 way (no size; deprecated in 10.1)
        self.memory = (ptr, self.engine.scratch)

    device_memory = property(None, _set_memory)

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
        cu.on_device(stream=stream)
        assert self.memory is not None, "executed before its device memory was set"
        if self.memory[0] != "own":  # TensorRT uses its scratch as it likes: anything sharing it gets garbage
            cu.view(*self.memory)[:] = np.random.default_rng().integers(0, 256, self.memory[1], dtype=np.uint8)
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


class FakeContextV2(FakeContext):
    """TensorRT 10.1+: ``set_device_memory(ptr, size)``."""

    def set_device_memory(self, ptr, size):
        assert size >= self.engine.scratch, "scratch buffer smaller than the engine needs"
        self.memory = (ptr, size)


class FakeEngine:
    """An ICudaEngine of TensorRT 10.1+ (``api="10"``) or 8.6 (``api="8.6"``: the older context and
    device-memory calls)."""

    def __init__(self, spec, profiles, session, kv_dtype, cuda_rt, api="10"):
        self.n_layer, self.spec, self.session, self.cuda = spec.n_layer, spec, session, cuda_rt
        self.api, self.scratch, self.refused, self.contexts = api, 4096, set(), []
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

    def create_execution_context(self, strategy="STATIC"):
        cls = FakeContextV2 if self.api == "10" else FakeContext
        self.contexts.append(cls(self, own_memory=strategy != "USER_MANAGED"))
        return self.contexts[-1]

    def __getattr__(self, name):  # what only one API generation has
        if name == "device_memory_size_v2" and self.api == "10":
            return self.scratch
        if name == "device_memory_size" and self.api == "8.6":
            return self.scratch
        if name == "create_execution_context_without_device_memory" and self.api == "8.6":
            return lambda: self.create_execution_context("USER_MANAGED")
        raise AttributeError(name)


def fake_tensorrt(engines, version="10.4.0"):
    class ILogger:
        Severity = SimpleNamespace(INTERNAL_ERROR=0, ERROR=1, WARNING=2, INFO=3, VERBOSE=4)

        def __init__(self):
            pass

    class Runtime:
        def __init__(self, logger):
            assert isinstance(logger, ILogger)

        def deserialize_cuda_engine(self, data):
            return engines[bytes(data).decode()]

    trt = SimpleNamespace(__version__=version, ILogger=ILogger, Runtime=Runtime, nptype=lambda dt: dt)
    if not version.startswith("8."):
        trt.ExecutionContextAllocationStrategy = SimpleNamespace(
            STATIC="STATIC", ON_PROFILE_CHANGE="ON_PROFILE_CHANGE", USER_MANAGED="USER_MANAGED"
        )
    return trt


@pytest.fixture(scope="module")
def onnx_artifact(tiny_checkpoint, tmp_path_factory):
    pytest.importorskip("onnxruntime")
    from export.onnx_export import export_onnx

    return export_onnx(tiny_checkpoint, tmp_path_factory.mktemp("onnx") / "tiny").path


@pytest.fixture()
def simulated(onnx_artifact, tmp_path, monkeypatch):
    """make(kv_dtype, limits, api) -> engine artifact dir served by the simulation (``make.fakes[dir]`` is its
    FakeEngine; ``api="8.6"`` makes a TensorRT 8.6 engine and installs a TensorRT 8.6 module)."""
    import onnxruntime as ort

    source = read_manifest(onnx_artifact)
    from export.tensorrt.builder import engine_graph

    # what the engine computes: the graph TensorRT parses (logits_to_keep fixed at every position)
    session = ort.InferenceSession(engine_graph(onnx_artifact / "model.onnx"), providers=["CPUExecutionProvider"])
    fake_cuda, engines = FakeCuda(), {}
    monkeypatch.setattr(cuda, "runtime", lambda: fake_cuda)
    monkeypatch.setitem(sys.modules, "tensorrt", fake_tensorrt(engines))

    def make(kv_dtype="float32", limits=None, api="10"):
        limits = limits or EngineLimits(4, 16, 40)
        version = "8.6.1" if api == "8.6" else "10.4.0"
        if api == "8.6":
            monkeypatch.setitem(sys.modules, "tensorrt", fake_tensorrt(engines, version))
        out = tmp_path / f"engine-{kv_dtype}-{len(engines)}"
        out.mkdir()
        profiles = make_profiles(source.spec, limits)
        key = json.dumps([str(out), kv_dtype])
        engines[key] = make.fakes[out] = FakeEngine(source.spec, profiles, session, kv_dtype, fake_cuda, api)
        (out / "model.engine").write_text(key)
        shutil.copyfile(onnx_artifact / source.tokenizer_file, out / source.tokenizer_file)
        precision = "fp16" if kv_dtype == "float16" else "fp32"
        plan = plan_build(precision, "float32", parse_version(version))
        details = engine_details(
            here=RuntimeInfo(version, "Fake GPU", "7.5"),
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

    make.onnx_dir, make.cuda, make.fakes = onnx_artifact, fake_cuda, {}
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


def test_simulated_engine_passes_the_engine_contract(simulated):
    """Joins (staging -> merge into the free set, padding zeroed), cancellations, cut padding and
    repeated rows on the simulated engine give each row what it gets alone."""
    engine, tok = load_backend("trt", simulated(limits=EngineLimits(4, 24, 48)), device="cuda")
    check_all(engine, tok)
    engine.close()


def test_merge_fills_the_free_set_and_refuses_stale_or_oversized_joins(simulated):
    engine, _ = load_backend("trt", simulated(limits=EngineLimits(3, 8, 24)), device="cuda")
    reference, _ = load_backend("ort", simulated.onnx_dir, device="cpu")
    (a, sa), (b, sb) = engine.prefill(*left_pad([[5, 6, 7]], pad_id=0)), reference.prefill(*left_pad([[5, 6, 7]], 0))
    one = np.ones((1, 1), np.int64)
    (a, sa), (b, sb) = (
        engine.decode(sa, one * 9, np.ones((1, 4), np.int64), one * 3),
        reference.decode(sb, one * 9, np.ones((1, 4), np.int64), one * 3),
    )
    ids, mask, pos = left_pad([[11], [12, 13]], pad_id=0)
    (_, na), (_, nb) = engine.prefill(ids, mask, pos), reference.prefill(ids, mask, pos)
    running_set = sa.cur
    sa, sb = engine.merge(sa, na), reference.merge(sb, nb)
    assert (sa.batch, sa.length, sa.cur) == (3, 4, 1 - running_set)
    mask = np.array([[1, 1, 1, 1, 1], [0, 0, 0, 1, 1], [0, 0, 1, 1, 1]], np.int64)
    pos = np.array([[4], [1], [2]], np.int64)
    toks = np.array([[3], [4], [5]], np.int64)
    (a, sa), (b, sb) = engine.decode(sa, toks, mask, pos), reference.decode(sb, toks, mask, pos)
    np.testing.assert_allclose(a, b, atol=1e-4)
    _, extra = engine.prefill(*left_pad([[8]], pad_id=0))
    with pytest.raises(TrtBackendError, match="exceed the engine's batch limit of 3"):
        engine.merge(sa, extra)
    with pytest.raises(TrtBackendError, match="stale TensorRT state"):
        engine.merge(sa, na)  # na's staging buffers were reused by the later prefill
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
    with pytest.raises(TrtBackendError, match="not rows of a batch of 2"):
        engine.select(state, np.array([0, 2]))
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


# -- execution contexts, profiles, threads, logits (the TensorRT facts are cited in backends/trt/contexts.py) --
@pytest.mark.parametrize("api", ["10", "8.6"])
def test_one_context_per_profile_sharing_one_scratch_buffer(simulated, api):
    """Each profile is selected once, on its own context, at load; both contexts run on one scratch buffer
    that the simulation fills with garbage on every execution (anything else living there would break)."""
    path = simulated(api=api)
    engine, tok = load_backend("trt", path, device="cuda")
    reference, _ = load_backend("ort", simulated.onnx_dir, device="cpu")
    config = GenerationConfig(max_new_tokens=10, temperature=0.0, ban_unk=False)
    for _ in range(2):  # prefill, decodes, prefill again, decodes
        prompts = [tok.encode(t) for t in ("滚滚长江东逝水", "白发")]
        got, want = generate(engine, prompts, config, tok), generate(reference, prompts, config, tok)
        assert [r.token_ids for r in got] == [r.token_ids for r in want]
    fake = simulated.fakes[path]
    assert [c.switches for c in fake.contexts] == [[0], [1]]  # never switched after load
    (ptr_a, size_a), (ptr_b, size_b) = (c.memory for c in fake.contexts)
    assert ptr_a == ptr_b != "own" and size_a == size_b >= fake.scratch
    engine.close()


def test_a_refused_profile_is_a_one_line_error(simulated):
    """set_optimization_profile_async raises RuntimeError (it never returns False): reported in one line."""
    from cpm_infer.backends.trt.contexts import ContextError

    path = simulated()
    simulated.fakes[path].refused = {1}
    with pytest.raises(ContextError, match=r"refused the decode optimization profile \(1\): Error in set") as info:
        load_backend("trt", path, device="cuda")
    assert "\n" not in str(info.value)


def _in_thread(work):
    """Run ``work`` on a new host thread (whose current CUDA device is 0) and re-raise what it raised."""
    failures = []

    def target():
        try:
            work()
        except BaseException as exc:  # noqa: BLE001 - handed to the test thread
            failures.append(exc)

    thread = threading.Thread(target=target)
    thread.start()
    thread.join()
    if failures:
        raise failures[0]


def test_worker_threads_run_the_engine_on_its_gpu(simulated):
    """cudaSetDevice holds per host thread: an engine on cuda:1 driven from a server worker thread must
    select GPU 1 there, in every call (prefill, decode, select, close)."""
    engine, tok = load_backend("trt", simulated(), device="cuda:1")
    reference, _ = load_backend("ort", simulated.onnx_dir, device="cpu")
    prompts = [tok.encode(t) for t in ("滚滚长江东逝水", "话说天下大势，分久必合", "白发")]
    config = GenerationConfig(max_new_tokens=12, temperature=0.0, ban_unk=False)
    got = []

    def work():
        got.extend(generate(engine, prompts, config, tok))
        ids, mask, pos = left_pad([[5, 6, 7], [8, 9]], pad_id=0)
        _, state = engine.prefill(ids, mask, pos)
        engine.select(state, np.array([1]))
        engine.close()

    _in_thread(work)
    assert [r.token_ids for r in got] == [r.token_ids for r in generate(reference, prompts, config, tok)]
    assert simulated.cuda.heap == {} and simulated.cuda.host == {}  # close() on the worker freed everything


def test_the_simulation_catches_a_call_that_skips_the_device(simulated):
    """The check above can fail: without selecting the GPU, a worker thread's first enqueue is refused."""
    engine, _ = load_backend("trt", simulated(), device="cuda:1")
    engine._on_device = lambda: None
    with pytest.raises(AssertionError, match="GPU 1's memory/stream used while GPU 0 is current"):
        _in_thread(lambda: engine.prefill(*left_pad([[5, 6]], pad_id=0)))
    del engine._on_device
    engine.close()


def test_an_engine_without_float32_logits_is_refused_at_load(simulated):
    path = simulated()
    simulated.fakes[path].dtypes[kv.LOGITS] = np.dtype(np.float16)
    with pytest.raises(TrtBackendError, match="returns float16 logits, expected float32"):
        load_backend("trt", path, device="cuda")
