"""``--quantize int8|int4``: read fewer weight bytes per token (fp32 CPU decoding is memory-bound).

Schemes (ONNX Runtime, CPU provider), applied to the float32 graph the export validated:

- ``int8``: ``onnxruntime.quantization.quantize_dynamic``, weights int8 per output channel
  (MatMulInteger / DynamicQuantizeMatMul, activations quantized per call).
- ``int4``: weight-only 4-bit ``com.microsoft.MatMulNBits`` (``matmul_nbits_quantizer``), blocks of
  ``block_size`` input rows with their own scale, ``accuracy_level`` 4 (int8 activations inside).

The tied LM head: the export writes it as ``Gemm(x, wte, transB=1)`` sharing ``wte`` with the embedding
``Gather``. Neither quantizer handles Gemm, and it is a fifth of CPM-small's bytes, so ``untie_lm_head``
gives it a transposed copy of ``wte`` as a plain MatMul that the quantizer then takes like any other.
The embedding Gather reads one row per token (no bandwidth cost) and stays float32 unless the config
says otherwise. Which of these each scheme does was decided from measurements (see ``CONFIGS`` and
the README); every choice is written to the manifest's ``details.quantization``.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from cpm_infer.config import ModelSpec
from cpm_infer.deps import require
from cpm_infer.errors import CpmError, first_line

log = logging.getLogger(__name__)

SCHEMES = ("int8", "int4")
LM_HEAD_WEIGHT = "lm_head.weight_t"  # the untied, transposed (n_embd, vocab) copy of wte
PROTOBUF_LIMIT = 2 * 1024**3


class QuantizeError(CpmError):
    """The graph cannot be quantized as asked (wrong source, unknown scheme, quantizer failure)."""


@dataclass(frozen=True)
class QuantConfig:
    """What one scheme does. ``lm_head``/``embedding``: quantized with the scheme, or "float32"."""

    scheme: str
    lm_head: str
    embedding: str
    per_channel: bool = True  # int8: one scale per output column
    reduce_range: bool = False  # int8: 7-bit weights (avoids u8s8 saturation on AVX2 without VNNI)
    weight_type: str = "QInt8"  # int8
    block_size: int = 128  # int4
    symmetric: bool = True  # int4: no zero points
    accuracy_level: int = 4  # int4: int8 compute inside MatMulNBits

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        if self.scheme == "int8":
            for key in ("block_size", "symmetric", "accuracy_level"):
                data.pop(key)
            data["method"] = (
                "onnxruntime.quantization.quantize_dynamic (MatMulInteger, activations uint8 per tensor per call)"
            )
        else:
            for key in ("per_channel", "reduce_range", "weight_type"):
                data.pop(key)
            data["method"] = "onnxruntime.quantization.matmul_nbits_quantizer (com.microsoft.MatMulNBits, bits 4)"
        return data


# Decided from measurements (README: quantization table; CPM-small-shape decode on 2 AVX2 cores, batch 1,
# and held-out perplexity of the demo model on its chapter 60):
# - LM head quantized in both: it is the largest matrix (30000x768), and keeping it float32 made a decode
#   step 19-28% slower for int8 (7.7-8.9 -> 9.9-10.6 ms) and 64-113% slower for int4 (4.7-5.1 -> 8.4-10.1
#   ms), for at most 0.07% perplexity.
# - int8 reduce_range: this CPU class (AVX2 without VNNI) multiplies u8 x s8 pairs into saturating int16;
#   7-bit weights avoid that. On the demo models the two differ by under 0.1% perplexity either way.
# - embedding: int8 would get one scale for the whole table (quantize_dynamic's Gather), so it stays
#   float32; int4 uses GatherBlockQuantized with the MatMuls' 128-blocks (+0.05% perplexity, CPM-small
#   artifact 146 -> 70 MB). One row is read per token either way: size, not speed.
# - int4 symmetric: asymmetric (zero points) made a decode step ~25% slower (5.7 -> 7.2 ms); it was closer
#   to float32 on the demo model (-0.04% vs +0.87% perplexity), both far inside the +10% gate.
CONFIGS = {
    "int8": QuantConfig("int8", lm_head="int8", embedding="float32", reduce_range=True),
    "int4": QuantConfig("int4", lm_head="int4", embedding="int4"),
}


def config_for(scheme: str, **overrides: Any) -> QuantConfig:
    if scheme not in CONFIGS:
        raise QuantizeError(f"unknown quantization scheme {scheme!r}; use {' or '.join(SCHEMES)}")
    config = replace(CONFIGS[scheme], **overrides)
    for part in ("lm_head", "embedding"):
        if getattr(config, part) not in (scheme, "float32"):
            raise QuantizeError(
                f"{part} must be {scheme} or float32 for the {scheme} scheme, not {getattr(config, part)!r}"
            )
    return config


def quantize_graph(source: Path, target: Path, spec: ModelSpec, config: QuantConfig) -> dict[str, Any]:
    """Write the quantized ``source`` graph to ``target``; returns what was quantized (for the manifest)."""
    onnx = require("onnx", "export")
    require("onnxruntime", "export")
    model = onnx.load(str(source), load_external_data=True)
    if any(
        n.op_type in ("MatMulNBits", "MatMulInteger", "DynamicQuantizeMatMul", "GatherBlockQuantized")
        for n in model.graph.node
    ):
        raise QuantizeError(f"{source.name} is already quantized")
    lm_head = untie_lm_head(model, spec) if config.lm_head != "float32" else None
    if config.lm_head != "float32" and lm_head is None:
        raise QuantizeError(f"{source.name}: the tied LM head (Gemm on wte, transB=1) was not found")
    embedding = _embedding_gather(model, spec)
    matmuls = [
        n.name for n in model.graph.node if n.op_type == "MatMul" and _initializer(model, n.input[1]) is not None
    ]
    nodes = [m for m in matmuls if m != lm_head or config.lm_head != "float32"]
    if config.embedding != "float32":
        if embedding is None:
            raise QuantizeError(f"{source.name}: the embedding Gather on wte was not found")
        nodes.append(embedding)
    try:
        with _quiet_quantizer_logs():
            quantized = (
                _quantize_int8(model, nodes, config)
                if config.scheme == "int8"
                else _quantize_int4(model, nodes, config)
            )
    except CpmError:
        raise
    except Exception as exc:  # the quantizers raise many types; report one line
        raise QuantizeError(
            f"onnxruntime {config.scheme} quantization of {source.name} failed: {first_line(exc)}"
        ) from exc
    size = sum(_nbytes(t) for t in quantized.graph.initializer)
    external = size >= PROTOBUF_LIMIT
    onnx.save_model(
        quantized,
        str(target),
        save_as_external_data=external,
        all_tensors_to_one_file=True,
        location=f"{target.name}.data" if external else None,
        size_threshold=1024,
    )
    counts: dict[str, int] = {}
    for node in quantized.graph.node:
        if node.op_type in (
            "MatMulNBits",
            "MatMulInteger",
            "DynamicQuantizeMatMul",
            "GatherBlockQuantized",
            "DynamicQuantizeLinear",
        ):
            counts[node.op_type] = counts.get(node.op_type, 0) + 1
    log.info("quantized %s -> %s: %s, %.1f MiB of weights", source.name, target.name, counts, size / 2**20)
    return {
        "quantized_nodes": len(nodes),
        "operators": counts,
        "weights_mib": round(size / 2**20, 1),
        "external_data": f"{target.name}.data" if external else None,
    }


@dataclass(frozen=True)
class QuantizeOptions:
    """What the user asked for: the scheme and its quality gate."""

    scheme: str
    gate_file: Path | None = None
    gate_threshold: float | None = None  # None: the scheme's default (quality_gate.THRESHOLDS)
    force_quality: bool = False


def check_request(model_dir: str | os.PathLike[str], options: QuantizeOptions, *, fp16: bool, device: str) -> None:
    """Refuse what cannot be quantized before any work: fp16, GPU, an already-quantized artifact."""
    config_for(options.scheme)
    if fp16:
        raise QuantizeError("--quantize starts from the float32 graph; drop --fp16")
    if not device.startswith("cpu"):
        raise QuantizeError(
            f"--quantize targets the CPU provider (int8/int4 CPU kernels); --device {device} is not supported"
        )
    scheme = quantized_scheme(model_dir)
    if scheme:
        raise QuantizeError(
            f"{model_dir} is already quantized ({scheme}); quantize its float32 checkpoint or artifact instead"
        )


def quantized_scheme(directory: str | os.PathLike[str]) -> str | None:
    """The scheme of a quantized artifact directory, None for anything else."""
    path = Path(directory) / "manifest.json"
    if not path.is_file():
        return None
    from cpm_infer.artifact import read_json

    data = read_json(path)
    details = data.get("details") if isinstance(data, dict) else None
    quantization = details.get("quantization") if isinstance(details, dict) else None
    return str(quantization.get("scheme", "quantized")) if isinstance(quantization, dict) else None


def apply_quantization(
    directory: Path,
    graph_files: dict[str, str],
    spec: ModelSpec,
    tokenizer: Any,
    options: QuantizeOptions,
    *,
    threads: int | None = None,
    source_dir: Path | None = None,
    say: Callable[[str], None] = lambda message: None,
) -> tuple[dict[str, str], dict[str, Any]]:
    """Quantize the float32 ``graph_files`` (in ``source_dir``, default ``directory``) into the artifact
    in progress in ``directory``, run the quality gate, and keep only the quantized graph there.
    Returns the new graph_files and ``details.quantization``."""
    from export.quality_gate import run_gate

    config = config_for(options.scheme)
    source = graph_files["model"]
    fp32_graph = (source_dir or directory) / source
    target = f"model_{options.scheme}.onnx"
    say(f"quantizing {source} to {options.scheme}")
    info = quantize_graph(fp32_graph, directory / target, spec, config)
    gate = run_gate(
        fp32_graph,
        directory / target,
        spec,
        tokenizer,
        scheme=options.scheme,
        gate_file=options.gate_file,
        threshold=options.gate_threshold,
        force=options.force_quality,
        threads=threads,
        say=say,
    )
    for name in set(graph_files.values()):  # a quantized artifact ships only what it runs
        (directory / name).unlink(missing_ok=True)
    files = {"model": target}
    if info.pop("external_data"):
        files["weights"] = f"{target}.data"
    details = {
        **config.to_dict(),
        **info,
        "source_graph": f"{source} (float32, validated against eager; not shipped)",
        "gate": gate.to_dict(),
    }
    return files, details


def untie_lm_head(model: Any, spec: ModelSpec) -> str | None:
    """Replace the LM head ``Gemm(x, wte, C, transB=1)`` by ``MatMul(x, wte^T)`` (+ C when nonzero) on a
    new initializer; returns the MatMul's name, or None when the graph has no such Gemm."""
    from onnx import helper, numpy_helper

    for index, node in enumerate(model.graph.node):
        if node.op_type != "Gemm" or _attrs(node).get("transB") != 1 or _attrs(node).get("transA", 0) != 0:
            continue
        if _attrs(node).get("alpha", 1.0) != 1.0 or _attrs(node).get("beta", 1.0) != 1.0:
            continue
        weight = _initializer(model, node.input[1])
        if weight is None or weight.shape != (spec.vocab_size, spec.n_embd):
            continue
        bias = _constant(model, node.input[2]) if len(node.input) > 2 and node.input[2] else None
        model.graph.initializer.append(numpy_helper.from_array(np.ascontiguousarray(weight.T), LM_HEAD_WEIGHT))
        name = f"{node.name or 'lm_head'}_MatMul"
        if bias is None or not np.any(bias):
            new = [helper.make_node("MatMul", [node.input[0], LM_HEAD_WEIGHT], [node.output[0]], name=name)]
        else:
            product = f"{name}_output"
            new = [
                helper.make_node("MatMul", [node.input[0], LM_HEAD_WEIGHT], [product], name=name),
                helper.make_node("Add", [product, node.input[2]], [node.output[0]], name=f"{name}_bias"),
            ]
        del model.graph.node[index]
        for offset, replacement in enumerate(new):
            model.graph.node.insert(index + offset, replacement)
        _drop_if_unused(model, node.input[2] if len(node.input) > 2 else "")
        return name
    return None


def _drop_if_unused(model: Any, name: str) -> None:
    """Remove the Constant node or initializer ``name`` when nothing reads it any more."""
    if not name or any(name in n.input for n in model.graph.node):
        return
    for i, node in enumerate(model.graph.node):
        if node.op_type == "Constant" and node.output[0] == name:
            del model.graph.node[i]
            return
    for i, tensor in enumerate(model.graph.initializer):
        if tensor.name == name:
            del model.graph.initializer[i]
            return


def _embedding_gather(model: Any, spec: ModelSpec) -> str | None:
    for node in model.graph.node:
        if node.op_type != "Gather":
            continue
        weight = _initializer(model, node.input[0])
        if weight is not None and weight.shape == (spec.vocab_size, spec.n_embd):
            return node.name
    return None


def _quantize_int8(model: Any, nodes: list[str], config: QuantConfig) -> Any:
    import tempfile

    from onnxruntime.quantization import QuantType, quantize_dynamic

    # quantize_dynamic reads and writes files (it runs shape inference on a saved copy).
    with tempfile.TemporaryDirectory(prefix="cpm-int8-") as scratch:
        source, target = Path(scratch) / "in.onnx", Path(scratch) / "out.onnx"
        _save(model, source)
        quantize_dynamic(
            source,
            target,
            weight_type=getattr(QuantType, config.weight_type),
            per_channel=config.per_channel,
            reduce_range=config.reduce_range,
            nodes_to_quantize=nodes,
            op_types_to_quantize=["MatMul", "Gather"],
            # DefaultTensorType 1 (FLOAT): the type of com.microsoft outputs that shape inference cannot infer.
            extra_options={"MatMulConstBOnly": True, "DefaultTensorType": 1},
            use_external_data_format=True,
        )
        import onnx

        return onnx.load(str(target), load_external_data=True)


def _quantize_int4(model: Any, nodes: list[str], config: QuantConfig) -> Any:
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    # Its nodes_to_include adds to op_types_to_quantize instead of narrowing it: exclude the others.
    kinds = ("MatMul", "Gather")
    excluded = [n.name for n in model.graph.node if n.op_type in kinds and n.name not in set(nodes)]
    quantizer = MatMulNBitsQuantizer(
        model,
        bits=4,
        block_size=config.block_size,
        is_symmetric=config.symmetric,
        accuracy_level=config.accuracy_level,
        nodes_to_exclude=excluded,
        op_types_to_quantize=kinds,
        quant_axes=(("MatMul", 0), ("Gather", 1)),
    )
    quantizer.process()
    return quantizer.model.model


@contextlib.contextmanager
def _quiet_quantizer_logs():
    """ORT's quantizers warn on the root logger that pre-processing was skipped (its optimizations are
    applied by the session at load instead) and that int4 weights raise the opset/IR version (21/10,
    needed for the int4 Gather data; the session loads the result): keep the CLI output clean."""
    loggers = [logging.getLogger(), logging.getLogger("onnxruntime.quantization.matmul_nbits_quantizer")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        yield
    finally:
        for lg, level in zip(loggers, levels, strict=True):
            lg.setLevel(level)


def _save(model: Any, path: Path) -> None:
    import onnx

    onnx.save_model(
        model,
        str(path),
        save_as_external_data=True,
        all_tensors_to_one_file=True,
        location=f"{path.name}.data",
        size_threshold=1024,
    )


def _initializer(model: Any, name: str) -> np.ndarray | None:
    from onnx import numpy_helper

    for tensor in model.graph.initializer:
        if tensor.name == name:
            return numpy_helper.to_array(tensor)
    return None


def _constant(model: Any, name: str) -> np.ndarray | None:
    """An initializer, or the value of a Constant node, by output name."""
    from onnx import helper, numpy_helper

    value = _initializer(model, name)
    if value is not None:
        return value
    for node in model.graph.node:
        if node.op_type == "Constant" and node.output[0] == name:
            for attribute in node.attribute:
                if attribute.name == "value":
                    return numpy_helper.to_array(helper.get_attribute_value(attribute))
    return None


def _attrs(node: Any) -> dict[str, Any]:
    from onnx import helper

    return {a.name: helper.get_attribute_value(a) for a in node.attribute}


def _nbytes(tensor: Any) -> int:
    return len(tensor.raw_data) if tensor.raw_data else int(np.prod(tensor.dims)) * 4
