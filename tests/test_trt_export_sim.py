"""``cpm export trt`` end to end on the TensorRT/CUDA simulation, from an ONNX artifact whose weights
are external data (the layout of every model over 2 GB), plus the CUDA session options of ORT.

The simulated ``OnnxParser.parse_from_file`` reads the graph the way TensorRT's parser does: external
data is resolved relative to the graph file's directory, so a builder that handed the parser a copy
of the graph elsewhere, or bytes without a path, would lose the weights. The simulated engine then
runs the very model the parser read (on ONNX Runtime), and the export's validation compares it with
the ONNX artifact like on a GPU. See tests/test_trt_backend.py for the runtime side of the simulation.
"""

from __future__ import annotations

import json
import sys
from types import SimpleNamespace

import numpy as np
import pytest
from test_trt_backend import FakeCuda, FakeEngine, fake_tensorrt

from cpm_infer.backends.trt import cuda

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")


class _Tensor(SimpleNamespace):
    pass


class FakeNetwork:
    def __init__(self):
        self.model, self.inputs, self.outputs = None, [], []

    @property
    def num_inputs(self):
        return len(self.inputs)

    @property
    def num_outputs(self):
        return len(self.outputs)

    def get_input(self, i):
        return self.inputs[i]

    def get_output(self, i):
        return self.outputs[i]


class FakeParser:
    def __init__(self, network, logger):
        self.network, self.errors = network, []

    def parse_from_file(self, path):
        try:  # like TensorRT's parser: external data files are named relative to the graph's directory
            model = onnx.load(path)
        except Exception as exc:  # noqa: BLE001 - reported through get_error like the real parser
            self.errors.append(f"failed to load {path}: {exc}")
            return False
        self.network.model = model
        self.network.inputs = [_Tensor(name=v.name) for v in model.graph.input]
        self.network.outputs = [_Tensor(name=v.name) for v in model.graph.output]
        return True

    @property
    def num_errors(self):
        return len(self.errors)

    def get_error(self, i):
        return self.errors[i]


class FakeProfile:
    def __init__(self):
        self.dims = {}

    def set_shape(self, name, lo, opt, hi):
        self.dims[name] = (tuple(lo), tuple(opt), tuple(hi))


class FakeConfig:
    def __init__(self):
        self.profiles, self.flags = [], set()

    def set_memory_pool_limit(self, pool, size):
        assert size > 0

    def add_optimization_profile(self, profile):
        self.profiles.append(profile)
        return len(self.profiles) - 1

    def clear_flag(self, flag):
        self.flags.discard(flag)

    def set_flag(self, flag):
        self.flags.add(flag)


def simulated_builder(engines, fake_cuda, spec, built):
    class Builder:
        def __init__(self, logger):
            pass

        def create_network(self, flags):
            return FakeNetwork()

        def create_builder_config(self):
            return FakeConfig()

        def create_optimization_profile(self):
            return FakeProfile()

        def build_serialized_network(self, network, config):
            # The engine computes with the weights the parser read: a session on that very model.
            session = ort.InferenceSession(network.model.SerializeToString(), providers=["CPUExecutionProvider"])
            profiles = [SimpleNamespace(shapes=lambda spec, p=p: p.dims) for p in config.profiles]
            key = f"engine-{len(engines)}"
            engines[key] = FakeEngine(spec, profiles, session, np.float32, fake_cuda)
            built.append(network.model)
            return key.encode()

    return Builder


@pytest.fixture()
def simulated_trt(monkeypatch, tiny_checkpoint, tmp_path_factory):
    """(tensorrt module, ONNX artifact with external data, the models the parser read)."""
    from cpm_infer.artifact import read_manifest
    from export.onnx_export import export_onnx

    onnx_dir = tmp_path_factory.mktemp("ext") / "onnx"
    export_onnx(tiny_checkpoint, onnx_dir, optimize=True, external_data_threshold=0)
    spec = read_manifest(onnx_dir).spec
    fake_cuda, engines, built = FakeCuda(), {}, []
    trt = fake_tensorrt(engines)
    trt.Builder = simulated_builder(engines, fake_cuda, spec, built)
    trt.OnnxParser = FakeParser
    trt.NetworkDefinitionCreationFlag = SimpleNamespace(EXPLICIT_BATCH=0, STRONGLY_TYPED=1)
    trt.BuilderFlag = SimpleNamespace(TF32=0, FP16=1, OBEY_PRECISION_CONSTRAINTS=2)
    trt.MemoryPoolType = SimpleNamespace(WORKSPACE=0)
    monkeypatch.setattr(cuda, "runtime", lambda: fake_cuda)
    monkeypatch.setitem(sys.modules, "tensorrt", trt)
    return trt, onnx_dir, built


def test_engine_is_built_from_the_external_weights_and_validated(simulated_trt, tmp_path):
    from cpm_infer.artifact import read_manifest, sha256_files
    from cpm_infer.backends import load_backend
    from cpm_infer.config import GenerationConfig
    from cpm_infer.generate import generate
    from export.tensorrt.engine_artifact import export_trt

    _, onnx_dir, built = simulated_trt
    source = read_manifest(onnx_dir)
    assert source.graph_files["weights"] == "model.onnx.data"
    result = export_trt(onnx_dir, tmp_path / "engine", precision="fp32", max_batch=4, max_input=16, max_total=40)
    # The parser read the portable graph with its weights (not an empty shell of external references).
    (model,) = built
    assert all(t.HasField("raw_data") and not t.external_data for t in model.graph.initializer)
    assert result.validation["status"] == "passed" and result.validation["max_logits_diff"] < 1e-3
    assert {c["via"] for c in result.validation["checks"]} == {"backend"}
    graph_and_weights = [onnx_dir / "model.onnx", onnx_dir / "model.onnx.data"]
    assert result.manifest.details["onnx_sha256"] == sha256_files(graph_and_weights)
    engine, tok = load_backend("trt", result.path, device="cuda")
    reference, _ = load_backend("ort", onnx_dir)
    prompts = [tok.encode("话说天下大势"), tok.encode("滚滚长江")]
    config = GenerationConfig(max_new_tokens=8, temperature=0.0, ban_unk=False)
    assert [r.token_ids for r in generate(engine, prompts, config, tok)] == [
        r.token_ids for r in generate(reference, prompts, config, tok)
    ]
    engine.close()


def test_missing_or_truncated_external_data_is_a_one_line_error(simulated_trt, tmp_path):
    import shutil

    from cpm_infer.errors import CpmError
    from export.tensorrt.builder import BuildError
    from export.tensorrt.engine_artifact import export_trt

    _, onnx_dir, _ = simulated_trt
    broken = tmp_path / "broken"
    shutil.copytree(onnx_dir, broken)
    data = broken / "model.onnx.data"
    data.write_bytes(data.read_bytes()[: data.stat().st_size // 2])
    with pytest.raises(BuildError, match="TensorRT could not parse model.onnx") as info:
        export_trt(broken, tmp_path / "engine", precision="fp32", max_batch=4, max_input=16, max_total=40)
    assert "\n" not in str(info.value) and not (tmp_path / "engine").exists()
    data.unlink()  # refused from the manifest, before TensorRT is asked anything
    with pytest.raises(CpmError, match="names model.onnx.data, which is missing"):
        export_trt(broken, tmp_path / "engine", precision="fp32", max_batch=4, max_input=16, max_total=40)


def test_failed_engine_validation_keeps_its_report(simulated_trt, tmp_path, monkeypatch):
    from export.tensorrt.engine_artifact import export_trt
    from export.validate import ValidationError

    trt, onnx_dir, _ = simulated_trt
    real = trt.Builder.build_serialized_network

    def wrong_weights(self, network, config):  # an engine whose weights went wrong somewhere
        for tensor in network.model.graph.initializer:
            if tensor.name == "wte":
                values = onnx.numpy_helper.to_array(tensor) * 3
                tensor.CopyFrom(onnx.numpy_helper.from_array(values, "wte"))
        return real(self, network, config)

    monkeypatch.setattr(trt.Builder, "build_serialized_network", wrong_weights)
    out = tmp_path / "engine"
    with pytest.raises(ValidationError, match="engine validation failed: logits differ from the ONNX graph") as info:
        export_trt(onnx_dir, out, precision="fp32", max_batch=4, max_input=16, max_total=40)
    kept = tmp_path / "engine.validation-failed.json"
    assert f"(report: {kept})" in str(info.value) and "\n" not in str(info.value)
    assert sorted(p.name for p in tmp_path.iterdir()) == [kept.name]
    assert json.loads(kept.read_text())["status"] == "failed"


def test_cuda_session_options_for_large_models(monkeypatch, tmp_path):
    """On CUDA, initializers are allocated outside the memory arena and the arena grows by what is asked
    (not by doubling), so a multi-GB model does not reserve twice its size on the GPU."""
    from cpm_infer.backends import ort_backend

    seen = {}

    class Session:
        def __init__(self, path, options, providers):
            seen.update(path=path, options=options, providers=providers)

        def get_providers(self):
            return ["CUDAExecutionProvider", "CPUExecutionProvider"]

    monkeypatch.setattr(ort, "get_available_providers", lambda: ["CUDAExecutionProvider", "CPUExecutionProvider"])
    monkeypatch.setattr(ort, "InferenceSession", Session)
    ort_backend.create_session(tmp_path / "model.onnx", device="cuda:1")
    assert seen["path"] == str(tmp_path / "model.onnx")  # a path: ORT resolves external data beside it
    name, options = seen["providers"][0]
    assert name == "CUDAExecutionProvider" and options["device_id"] == 1
    assert options["arena_extend_strategy"] == "kSameAsRequested"
    assert seen["options"].get_session_config_entry("session.use_device_allocator_for_initializers") == "1"
