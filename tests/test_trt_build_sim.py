"""``cpm export trt`` end to end against the TensorRT/CUDA simulation of tests/test_trt_backend.py, with a
simulated builder added: parse -> profiles -> flags -> serialized engine -> validation on the simulated
runtime. Checks what the builder asks of TensorRT (flags, profiles, one logger), not TensorRT itself.

The simulated parser reads the graph by path the way TensorRT's does, external data resolved beside
it, and the simulated engine computes with exactly the weights the parser read: an artifact whose
weights are external data (every model over 2 GB) is built and validated end to end."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from test_trt_backend import FakeCuda, FakeEngine, fake_tensorrt

from cpm_infer.backends.trt import cuda
from cpm_infer.backends.trt.profiles import Profile
from cpm_infer.errors import CpmError


def test_insufficient_driver_names_the_cuda_12_pair(monkeypatch):
    fake = FakeCuda()
    fake.cudaGetErrorName = lambda err: (0, b"cudaErrorInsufficientDriver")
    fake.cudaGetErrorString = lambda err: (0, b"CUDA driver version is insufficient for CUDA runtime version")
    monkeypatch.setattr(cuda, "runtime", lambda: fake)
    with pytest.raises(
        cuda.CudaError, match=r"device query failed: cudaErrorInsufficientDriver .*cpm-infer\[tensorrt\]"
    ):
        cuda.call((35, 0), "device query")


class Flags(SimpleNamespace):
    """An enum namespace that fails like TensorRT's on a member this release does not have."""

    def __getattr__(self, name):
        raise AttributeError(f"this TensorRT has no {name}")


class Network:
    """The network the fake parser fills: its inputs and outputs, and the parsed model."""

    def __init__(self, flags):
        self.flags, self.inputs, self.outputs, self.num_layers = flags, [], [], 0

    num_inputs = property(lambda self: len(self.inputs))
    num_outputs = property(lambda self: len(self.outputs))

    def get_input(self, i):
        return self.inputs[i]

    def get_output(self, i):
        return self.outputs[i]


class OptimizationProfile:
    """Records the shapes the builder declares."""

    def __init__(self):
        self.shapes = {}

    def set_shape(self, name, lo, opt, hi):
        self.shapes[name] = (tuple(lo), tuple(opt), tuple(hi))


class Config:
    """Records the flags, profiles and workspace the builder sets."""

    def __init__(self):
        self.flags, self.profiles, self.workspace = set(), [], None

    def set_memory_pool_limit(self, pool, size):
        self.workspace = size

    def add_optimization_profile(self, profile):
        self.profiles.append(profile)
        return len(self.profiles) - 1

    def set_flag(self, flag):
        self.flags.add(flag)

    def clear_flag(self, flag):
        self.flags.discard(flag)


def add_builder(trt, engines, spec, cuda_rt, version):
    """The builder half of the Python API (what export/tensorrt/builder.py calls), on top of ``trt``."""
    major = int(version.split(".")[0])
    builder_flags = {"TF32": 7} if major >= 11 else {"FP16": 0, "TF32": 7, "OBEY_PRECISION_CONSTRAINTS": 11}
    network_flags = {"STRONGLY_TYPED": 1} if major >= 10 else {"EXPLICIT_BATCH": 0, "STRONGLY_TYPED": 1}
    trt.__version__ = version
    trt.BuilderFlag = Flags(**builder_flags)
    trt.NetworkDefinitionCreationFlag = Flags(**network_flags)
    trt.MemoryPoolType = SimpleNamespace(WORKSPACE=0)
    trt.float32, trt.float16 = "float32", "float16"
    trt.loggers = []  # every ILogger handed to the builder, parser or runtime

    class OnnxParser:
        def __init__(self, network, logger):
            self.network, self.errors = network, []
            trt.loggers.append(logger)

        def parse(self, model_bytes, path=None):
            import onnx
            from onnx.external_data_helper import load_external_data_for_model

            try:  # like TensorRT's parser: external data files are named relative to the graph's directory
                model = onnx.load_model_from_string(bytes(model_bytes))
                load_external_data_for_model(model, str(Path(path).parent))
            except Exception as exc:  # noqa: BLE001 - reported through get_error, like the real parser
                self.errors.append(f"failed to load {path}: {exc}")
                return False
            self.network.model = model
            self.network.inputs = [SimpleNamespace(name=v.name, dtype="float32") for v in model.graph.input]
            self.network.outputs = [SimpleNamespace(name=v.name, dtype="float32") for v in model.graph.output]
            return True

        num_errors = property(lambda self: len(self.errors))

        def get_error(self, i):
            return self.errors[i]

    class Builder:
        def __init__(self, logger):
            trt.loggers.append(logger)
            trt.builds = getattr(trt, "builds", [])

        def create_network(self, flags):
            return Network(flags)

        def create_builder_config(self):
            config = Config()
            config.flags.add(builder_flags["TF32"])  # on by default, as in TensorRT
            return config

        def create_optimization_profile(self):
            return OptimizationProfile()

        def build_serialized_network(self, network, config):
            import onnxruntime as ort

            # The engine computes with the weights the parser read: a session on that very model.
            session = ort.InferenceSession(network.model.SerializeToString(), providers=["CPUExecutionProvider"])
            key = f"built-{len(engines)}"
            engine = FakeEngine(spec, [], session, "float32", cuda_rt)
            engine.profile_shapes = [p.shapes for p in config.profiles]  # exactly what the builder declared
            engines[key] = engine
            trt.builds.append(SimpleNamespace(network=network, config=config))
            return key.encode()

    runtime_cls = trt.Runtime

    class Runtime(runtime_cls):
        def __init__(self, logger):
            super().__init__(logger)
            trt.loggers.append(logger)

    trt.Builder, trt.OnnxParser, trt.Runtime = Builder, OnnxParser, Runtime
    return trt


@pytest.fixture()
def onnx_dir(tiny_checkpoint, tmp_path_factory):
    pytest.importorskip("onnxruntime")
    from export.onnx_export import export_onnx

    return export_onnx(tiny_checkpoint, tmp_path_factory.mktemp("onnx") / "tiny").path


def simulate(monkeypatch, onnx_dir, version):
    from cpm_infer.artifact import read_manifest

    spec = read_manifest(onnx_dir).spec
    fake_cuda, engines = FakeCuda(), {}
    trt = add_builder(fake_tensorrt(engines), engines, spec, fake_cuda, version)
    monkeypatch.setattr(cuda, "runtime", lambda: fake_cuda)
    monkeypatch.setitem(sys.modules, "tensorrt", trt)
    return trt


def test_tensorrt_11_auto_on_a_float32_artifact_builds_fp32_and_says_how_to_get_fp16(monkeypatch, onnx_dir, tmp_path):
    from export.tensorrt.engine_artifact import export_trt

    trt = simulate(monkeypatch, onnx_dir, "11.4.0")
    said = []
    result = export_trt(
        onnx_dir, tmp_path / "engine", max_batch=4, max_input=16, max_total=40, workspace_gb=1, progress=said.append
    )
    details = result.manifest.details
    assert (details["precision"], details["build_mode"], result.manifest.dtype) == ("fp32", "fp32", "float32")
    assert "strongly typed" in details["precision_reason"] and "--fp16" in details["precision_reason"]
    assert any("auto -> fp32" in line for line in said)
    (build,) = trt.builds
    assert build.config.flags == set()  # TF32 cleared: "fp32" means IEEE float32 GEMMs
    assert build.network.flags == 0  # no EXPLICIT_BATCH (gone in 10) and weak typing never requested
    declared = [Profile.from_dict(p) for p in details["profiles"]]
    assert [p.shapes for p in build.config.profiles] == [p.shapes(result.manifest.spec) for p in declared]
    assert result.validation["status"] == "passed" and result.validation["greedy_agreement"] == 1.0
    report = json.loads((tmp_path / "engine" / "validation.json").read_text())
    assert report["max_logits_diff"] < 1e-3


def test_explicit_fp16_on_tensorrt_11_from_float32_is_refused_before_building(monkeypatch, onnx_dir, tmp_path):
    from export.tensorrt.engine_artifact import export_trt

    trt = simulate(monkeypatch, onnx_dir, "11.4.0")
    with pytest.raises(CpmError, match="builds only strongly typed networks.*cpm export onnx --fp16"):
        export_trt(onnx_dir, tmp_path / "engine", precision="fp16", max_batch=2, max_input=16, max_total=40)
    assert not getattr(trt, "builds", []) and not (tmp_path / "engine").exists()


def test_every_build_and_load_share_the_one_logger(monkeypatch, onnx_dir, tmp_path):
    """TensorRT keeps the first ILogger it is given: the builder, parser and runtime all get the same one."""
    from cpm_infer.backends import load_backend
    from export.tensorrt.engine_artifact import export_trt

    trt = simulate(monkeypatch, onnx_dir, "10.4.0")
    for name in ("a", "b"):
        export_trt(onnx_dir, tmp_path / name, precision="fp32", max_batch=2, max_input=16, max_total=40)
    engine, _ = load_backend("trt", tmp_path / "a", device="cuda")
    assert len(trt.loggers) >= 7 and all(logger is trt.loggers[0] for logger in trt.loggers)
    ids = np.array([[5, 6, 7]])
    logits, _ = engine.prefill(ids, np.ones_like(ids), np.arange(3)[None])
    assert logits.shape == (1, engine.spec.vocab_size)
    engine.close()


@pytest.fixture()
def external_onnx_dir(tiny_checkpoint, tmp_path_factory):
    """An --optimize artifact forced to external data: both graphs share model.onnx.data."""
    pytest.importorskip("onnxruntime")
    from export.onnx_export import export_onnx

    out = tmp_path_factory.mktemp("ext") / "onnx"
    return export_onnx(tiny_checkpoint, out, optimize=True, external_data_threshold=0).path


def test_engine_is_built_from_the_external_weights_and_generates_like_ort(monkeypatch, external_onnx_dir, tmp_path):
    from cpm_infer.artifact import read_manifest, sha256_files
    from cpm_infer.backends import load_backend
    from cpm_infer.config import GenerationConfig
    from cpm_infer.engine.generate import generate
    from export.tensorrt.engine_artifact import export_trt

    trt = simulate(monkeypatch, external_onnx_dir, "10.4.0")
    assert read_manifest(external_onnx_dir).graph_files["weights"] == "model.onnx.data"
    result = export_trt(
        external_onnx_dir, tmp_path / "engine", precision="fp32", max_batch=4, max_input=16, max_total=40
    )
    (build,) = trt.builds  # the parser read the portable graph with its weights, not empty external references
    assert all(t.HasField("raw_data") and not t.external_data for t in build.network.model.graph.initializer)
    assert result.validation["status"] == "passed" and result.validation["max_logits_diff"] < 1e-3
    graph_and_weights = [external_onnx_dir / "model.onnx", external_onnx_dir / "model.onnx.data"]
    assert result.manifest.details["onnx_sha256"] == sha256_files(graph_and_weights)
    engine, tok = load_backend("trt", result.path, device="cuda")
    reference, _ = load_backend("ort", external_onnx_dir, device="cpu")
    prompts = [tok.encode("话说天下大势"), tok.encode("滚滚长江")]
    config = GenerationConfig(max_new_tokens=8, temperature=0.0, ban_unk=False)
    assert [r.token_ids for r in generate(engine, prompts, config, tok)] == [
        r.token_ids for r in generate(reference, prompts, config, tok)
    ]
    engine.close()


def test_missing_or_truncated_external_data_is_a_one_line_error(monkeypatch, external_onnx_dir, tmp_path):
    import shutil

    from export.tensorrt.builder import BuildError
    from export.tensorrt.engine_artifact import export_trt

    simulate(monkeypatch, external_onnx_dir, "10.4.0")
    broken = tmp_path / "broken"
    shutil.copytree(external_onnx_dir, broken)
    data = broken / "model.onnx.data"
    data.write_bytes(data.read_bytes()[: data.stat().st_size // 2])
    with pytest.raises(BuildError, match="TensorRT could not parse model.onnx") as info:
        export_trt(broken, tmp_path / "engine", precision="fp32", max_batch=4, max_input=16, max_total=40)
    assert "\n" not in str(info.value) and not (tmp_path / "engine").exists()
    data.unlink()  # refused from the manifest, before TensorRT is asked anything
    with pytest.raises(CpmError, match="names model.onnx.data, which is missing"):
        export_trt(broken, tmp_path / "engine", precision="fp32", max_batch=4, max_input=16, max_total=40)


def test_failed_engine_validation_keeps_its_report(monkeypatch, external_onnx_dir, tmp_path):
    import onnx

    from export.tensorrt.engine_artifact import export_trt
    from export.validate import ValidationError

    trt = simulate(monkeypatch, external_onnx_dir, "10.4.0")
    real = trt.Builder.build_serialized_network

    def wrong_weights(self, network, config):  # an engine whose weights went wrong somewhere
        for tensor in network.model.graph.initializer:
            if tensor.name == "wte":
                tensor.CopyFrom(onnx.numpy_helper.from_array(onnx.numpy_helper.to_array(tensor) * 3, "wte"))
        return real(self, network, config)

    monkeypatch.setattr(trt.Builder, "build_serialized_network", wrong_weights)
    out = tmp_path / "engine"
    with pytest.raises(ValidationError, match="engine validation failed: logits differ from the ONNX graph") as info:
        export_trt(external_onnx_dir, out, precision="fp32", max_batch=4, max_input=16, max_total=40)
    kept = tmp_path / "engine.validation-failed.json"
    assert f"(report: {kept})" in str(info.value) and "\n" not in str(info.value)
    assert sorted(p.name for p in tmp_path.iterdir()) == [kept.name]
    assert json.loads(kept.read_text())["status"] == "failed"


def test_export_trt_takes_device_like_every_command(monkeypatch, capsys, onnx_dir, tmp_path):
    """--device cuda:N reaches the builder (the simulation has two GPUs); a non-CUDA device is one line."""
    from conftest import run_cli

    from cpm_infer.artifact import read_manifest

    simulate(monkeypatch, onnx_dir, "10.4.0")
    fake = cuda.runtime()
    selected = []
    set_device = fake.cudaSetDevice
    monkeypatch.setattr(fake, "cudaSetDevice", lambda i: (selected.append(i), set_device(i))[1])
    common = ("export", "trt", str(onnx_dir), str(tmp_path / "engine"), "--max-input", "16", "--max-total", "40")
    code, _, err = run_cli(monkeypatch, capsys, *common, "--device", "cuda:2")
    assert code == 1 and err.count("\n") == 1 and "GPU 2 requested but only 2 CUDA device(s) are visible" in err
    code, _, err = run_cli(monkeypatch, capsys, *common, "--device", "rocm")
    assert code == 1 and err.count("\n") == 1 and "is not a CUDA device" in err
    assert selected == []
    code, _, err = run_cli(
        monkeypatch, capsys, *common, "--device", "cuda:1", "--precision", "fp32", "--max-batch", "2"
    )
    assert code == 0, err
    assert selected and set(selected) == {1}  # the build and the validation's engine both on GPU 1
    assert read_manifest(tmp_path / "engine").details["precision"] == "fp32"
