"""ONNX graph -> TensorRT network -> serialized engine (TensorRT Python API, 8.6 .. 11.x).

Version differences handled here:
- 8.x needs ``NetworkDefinitionCreationFlag.EXPLICIT_BATCH`` for the ONNX parser; 10.x made explicit
  batch the only mode (the flag is deprecated, then gone), so it is set only before 10.
- ``STRONGLY_TYPED`` (10.x; accepted and ignored by 11.x, where every network is strongly typed) is
  set for float16 ONNX graphs: the graph's own casts keep LayerNorm/softmax in float32.
- weak typing (``BuilderFlag.FP16`` + ``OBEY_PRECISION_CONSTRAINTS`` + per-layer precision) for
  FP16 engines from float32 graphs, TensorRT < 11 only (``precision.plan_build`` refuses otherwise).
- ``set_memory_pool_limit(MemoryPoolType.WORKSPACE, bytes)`` (8.4+; ``max_workspace_size`` is gone in 10).
- the 8.x parser casts int64 graph inputs to int32; 10.x keeps int64. The runtime asks the engine
  for each tensor's type, so both work.
- the graph's ``logits_to_keep`` input becomes the constant 0 (every position) before parsing
  (``parser.parse(bytes, path)``: the path still locates the external weights), so engines keep the
  KV contract's inputs and no shape-tensor input joins the optimization profiles.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cpm_infer import kv
from cpm_infer.backends.trt.logger import capture_errors, get_logger
from cpm_infer.backends.trt.profiles import Profile
from cpm_infer.config import ModelSpec
from cpm_infer.errors import CpmError, first_line
from export.tensorrt import layers as layer_rules
from export.tensorrt.precision import FP16_CONSTRAINED, FP16_STRONG, FP32, BuildPlan, parse_version

log = logging.getLogger(__name__)


class BuildError(CpmError):
    """TensorRT could not parse the graph or build the engine."""


@dataclass
class BuildReport:
    fp32_layers: dict[str, str] = field(default_factory=dict)  # layer name -> reason (FP16_CONSTRAINED only)
    timing_cache: str | None = None
    messages: list[str] = field(default_factory=list)  # TensorRT errors seen while building


def build_engine(
    trt: Any,
    onnx_file: Path,
    *,
    spec: ModelSpec,
    plan: BuildPlan,
    profiles: list[Profile],
    workspace_bytes: int,
    timing_cache: Path | None = None,
) -> tuple[memoryview, BuildReport]:
    """Parse ``onnx_file`` and build the engine. The parser reads the graph by path, so external data
    (every graph over 2 GB) is found beside it; the returned view keeps TensorRT's buffer alive."""
    report = BuildReport()
    with capture_errors() as messages:
        try:
            return _build(trt, get_logger(trt), onnx_file, spec, plan, profiles, workspace_bytes, timing_cache, report)
        finally:
            report.messages = messages


def _build(
    trt: Any,
    logger: Any,
    onnx_file: Path,
    spec: ModelSpec,
    plan: BuildPlan,
    profiles: list[Profile],
    workspace_bytes: int,
    timing_cache: Path | None,
    report: BuildReport,
) -> tuple[memoryview, BuildReport]:
    major = parse_version(trt.__version__)[0]
    builder = trt.Builder(logger)
    flags = 0
    if major < 10:
        flags |= 1 << int(trt.NetworkDefinitionCreationFlag.EXPLICIT_BATCH)
    if plan.mode == FP16_STRONG:
        flags |= 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED)
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse(engine_graph(onnx_file), str(onnx_file)):
        errors = [first_line(str(parser.get_error(i))) for i in range(parser.num_errors)]
        raise BuildError(
            f"TensorRT could not parse {onnx_file.name}: {'; '.join(errors[:3]) or 'unknown parser error'}"
        )
    _check_io(network, spec)

    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(workspace_bytes))
    for profile in profiles:
        opt_profile = builder.create_optimization_profile()
        for name, (lo, opt, hi) in profile.shapes(spec).items():
            opt_profile.set_shape(name, lo, opt, hi)
        if config.add_optimization_profile(opt_profile) < 0:
            raise BuildError(f"TensorRT rejected the {profile.name} optimization profile")

    if plan.mode == FP32:
        if hasattr(trt.BuilderFlag, "TF32"):
            config.clear_flag(trt.BuilderFlag.TF32)  # TF32 is on by default on Ampere+; fp32 means fp32
    elif plan.mode == FP16_CONSTRAINED:
        config.set_flag(trt.BuilderFlag.FP16)
        config.set_flag(trt.BuilderFlag.OBEY_PRECISION_CONSTRAINTS)
        described = layer_rules.layers_from_network(network, trt)
        chosen = layer_rules.select_fp32_layers(described)
        layer_rules.apply_fp32(network, trt, sorted(chosen))
        report.fp32_layers = {described[i].name: reason for i, reason in sorted(chosen.items())}
        _set_io_types(network, trt)
        log.info("FP16 engine: %d layers constrained to FP32", len(chosen))
    elif plan.mode != FP16_STRONG:
        raise BuildError(f"unknown build mode {plan.mode!r}")

    cache = None
    if timing_cache is not None:
        data = timing_cache.read_bytes() if timing_cache.is_file() else b""
        cache = config.create_timing_cache(data)
        # ignore_mismatch=False: a cache from another GPU/TensorRT is refused by TensorRT, not misused.
        if not config.set_timing_cache(cache, ignore_mismatch=False):
            raise BuildError(f"TensorRT refused the timing cache {timing_cache} (made on another GPU or TensorRT?)")

    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        detail = report.messages[-1] if report.messages else "see the log with -v"
        raise BuildError(f"TensorRT failed to build the engine: {detail}")
    if timing_cache is not None:
        _write_atomic(timing_cache, bytes(memoryview(config.get_timing_cache().serialize())))
        report.timing_cache = str(timing_cache)
    # A view, not a copy: a CPM-large fp32 engine is ~10 GB of host memory on its own.
    return memoryview(serialized), report


def engine_graph(onnx_file: Path) -> bytes:
    """The serialized graph TensorRT parses: ``onnx_file`` (its external weights left where they are, read
    by the parser from beside it) with ``logits_to_keep``, where the graph has it, fixed at 0."""
    import onnx
    from onnx import numpy_helper

    model = onnx.load(str(onnx_file), load_external_data=False)
    graph = model.graph
    kept = [value for value in graph.input if value.name != kv.LOGITS_TO_KEEP]
    if len(kept) < len(graph.input):
        del graph.input[:]
        graph.input.extend(kept)
        graph.initializer.append(numpy_helper.from_array(kv.keep_feed(last=False), kv.LOGITS_TO_KEEP))
        for output in graph.output:
            if output.name == kv.LOGITS:  # (batch, seq, vocab) again
                output.type.tensor_type.shape.dim[1].dim_param = kv.SEQ
    return model.SerializeToString()


def _check_io(network: Any, spec: ModelSpec) -> None:
    inputs = {network.get_input(i).name for i in range(network.num_inputs)}
    outputs = {network.get_output(i).name for i in range(network.num_outputs)}
    want_in, want_out = set(kv.input_names(spec.n_layer)), set(kv.output_names(spec.n_layer))
    if inputs != want_in or outputs != want_out:
        extra = sorted((inputs - want_in) | (outputs - want_out))[:3]
        missing = sorted((want_in - inputs) | (want_out - outputs))[:3]
        raise BuildError(f"the ONNX graph does not follow the KV contract (missing {missing}, unexpected {extra})")


def _set_io_types(network: Any, trt: Any) -> None:
    """Weakly typed FP16: KV inputs/outputs in float16 (half the cache memory and copy traffic),
    logits in float32."""
    for i in range(network.num_inputs):
        tensor = network.get_input(i)
        if tensor.name.startswith("past_key_values."):
            tensor.dtype = trt.float16
    for i in range(network.num_outputs):
        tensor = network.get_output(i)
        tensor.dtype = trt.float32 if tensor.name == kv.LOGITS else trt.float16


def _write_atomic(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_bytes(data)
    os.replace(tmp, path)
