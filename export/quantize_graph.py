"""The quantized graph, written one weight at a time: ONNX Runtime's own quantizers applied node by node.

``onnxruntime.quantization`` quantizes a whole ModelProto in memory (``quantize_dynamic`` also saves
and reloads it for shape inference): three to four copies of the weights, which a 10-GB model does
not survive on a 16-GB machine. Here the float32 graph is loaded without its weights
(``export.onnx_weights``) and each quantized node is handed to the same ORT quantizer inside a
one-node model holding only that node's weight (memory-mapped from the data file); the nodes and
initializers it returns are spliced into the graph, their bytes appended to the target's data file.
Weights that stay float32 are copied across the same way. Peak memory: the graph protobuf plus the
largest weight, quantized and float.

- ``int8``: ``ONNXQuantizer`` in ``IntegerOps`` mode (what ``quantize_dynamic`` runs): MatMulInteger on
  per-channel int8 weights, activations quantized per call by DynamicQuantizeLinear.
- ``int4``, and ``int8`` with a block size: ``DefaultWeightOnlyQuantizer`` (what ``MatMulNBitsQuantizer``
  runs per node): MatMulNBits with 4 or 8 bits, and GatherBlockQuantized for an int4 embedding; with
  ``algorithm="k_quant"``, ORT's k-quant (``neural_compressor.weight_only``: what ``MatMulNBitsQuantizer`` with
  ``KQuantWeightOnlyQuantConfig`` runs per MatMul), a slice of output columns at a time.

Each matrix gets the precision its config gives it (``QuantConfig.precision``: 4-bit body, 8-bit or float32
LM head, 8-bit or float32 block matrices); what each got is returned (``matrices``) for the manifest.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np

from cpm_infer.config import ModelSpec
from cpm_infer.deps import require
from cpm_infer.errors import CpmError, first_line
from export.onnx_weights import (
    ExternalDataWriter,
    load_graph,
    release_memory,
    save_graph,
    tensor_array,
    weight_bytes,
)
from export.quant_config import EMBEDDING, LM_HEAD, Precision, QuantConfig, QuantizeError, matrix_of

log = logging.getLogger(__name__)

LM_HEAD_WEIGHT = "lm_head.weight_t"  # the untied, transposed (n_embd, vocab) copy of wte
QUANTIZED_OPS = ("MatMulNBits", "MatMulInteger", "DynamicQuantizeMatMul", "GatherBlockQuantized")


def quantize_graph(
    source: Path, target: Path, spec: ModelSpec, config: QuantConfig, *, say: Callable[[str], None] | None = None
) -> dict[str, Any]:
    """Write the quantized ``source`` graph to ``target`` (+ ``target.data``); returns what was quantized. ``say``
    hears how many matrices are done at each tenth of them (k-quant's search takes minutes on CPM-large)."""
    require("onnx", "export")
    require("onnxruntime", "export")
    base = source.parent
    model = load_graph(source)
    if any(n.op_type in QUANTIZED_OPS for n in model.graph.node):
        raise QuantizeError(f"{source.name} is already quantized")
    lm_head = untie_lm_head(model, spec, base) if config.lm_head != "float32" else None
    if config.lm_head != "float32" and lm_head is None:
        raise QuantizeError(f"{source.name}: the tied LM head (Gemm on wte, transB=1) was not found")
    initializers = {t.name: t for t in model.graph.initializer}
    roles: dict[str, tuple[str, int | None]] = {}  # node -> (matrix, layer), every weight matrix of the graph
    for node in model.graph.node:
        if node.op_type == "MatMul" and node.input[1] in initializers:
            roles[node.name] = (LM_HEAD, None) if node.name == lm_head else matrix_of(node.input[1]) or ("matmul", None)
    embedding = _embedding_gather(model, spec, initializers)
    if embedding is not None:
        roles[embedding] = (EMBEDDING, None)
    elif config.embedding != "float32":
        raise QuantizeError(f"{source.name}: the embedding Gather on wte was not found")
    plan = {name: config.precision(*role) for name, role in roles.items()}
    targets = [name for name, precision in plan.items() if precision is not None]
    data = target.with_name(f"{target.name}.data")
    try:
        with _quiet_quantizer_logs(), ExternalDataWriter(data) as writer:
            if config.block_wise:
                # As MatMulNBitsQuantizer.process: the com.microsoft domain; int4 Gather data needs opset 21 / IR 10.
                _set_opset(model, "com.microsoft", 1)
                if plan.get(embedding) is not None:
                    _set_opset(model, "", 21, at_least=True)
                    model.ir_version = max(model.ir_version, 10)
                quantize = _PerNode(plan, config.accuracy_level)
            else:
                quantize = _Int8(model, config)
            written = _rewrite(model, set(targets), initializers, base, writer, quantize, say=say)
            _drop_unused_initializers(model)
            # What stays float (norms, biases, position embedding...) moves into the target's data file too.
            kept = [t if t.name in written else writer.add_proto(t, base) for t in model.graph.initializer]
            del model.graph.initializer[:]
            model.graph.initializer.extend(kept)
    except CpmError:
        raise
    except Exception as exc:  # the quantizers raise many types; report one line
        raise QuantizeError(
            f"onnxruntime {config.scheme} quantization of {source.name} failed: {first_line(exc)}"
        ) from exc
    save_graph(model, target)
    counts: dict[str, int] = {}
    for node in model.graph.node:
        if node.op_type in (*QUANTIZED_OPS, "DynamicQuantizeLinear"):
            counts[node.op_type] = counts.get(node.op_type, 0) + 1
    size = weight_bytes(model)
    log.info("quantized %s -> %s: %s, %.1f MiB of weights", source.name, target.name, counts, size / 2**20)
    return {
        "quantized_nodes": len(targets),
        "operators": counts,
        "weights_mib": round(size / 2**20, 1),
        "matrices": _summary(roles, plan, lm_head_float32=lm_head is None),
    }


def _summary(roles: dict, plan: dict, *, lm_head_float32: bool) -> dict[str, list[dict[str, Any]]]:
    """matrix -> [{precision: int4 | int8 | float32, block_size, zero_points, algorithm, layers}, ...]: what each
    weight matrix of the graph became, layers grouped by precision."""
    out: dict[str, list[dict[str, Any]]] = {}
    for name, (matrix, layer) in roles.items():
        precision = plan[name]
        entry = {"precision": "float32"} if precision is None else {"precision": f"int{precision.bits}"}
        if precision is not None:
            entry |= {k: v for k, v in precision.to_dict().items() if k != "bits"}
        rows = out.setdefault(matrix, [])
        same = next((row for row in rows if {k: v for k, v in row.items() if k != "layers"} == entry), None)
        if same is None:
            rows.append(same := entry)
        if layer is not None:
            same.setdefault("layers", []).append(layer)
    if lm_head_float32:  # the LM head stayed the Gemm on the embedding table
        out.setdefault(LM_HEAD, [{"precision": "float32"}])
    return out


def _rewrite(
    model, targets: set[str], initializers: dict, base: Path, writer, quantize, *, say: Callable[[str], None] | None
) -> set[str]:
    """Replace each target node by its quantized nodes, in place (nodes sharing an activation are
    quantized together, so that they share its DynamicQuantizeLinear as the whole-model quantizer does);
    returns the names of the initializers written to ``writer``."""
    groups: dict[str, list[Any]] = {}
    for node in model.graph.node:
        if node.name in targets:
            groups.setdefault(quantize.group_key(node), []).append(node)
    done: set[str] = set()
    written: set[str] = set()
    new_nodes, count, total = [], 0, len(targets)
    for node in model.graph.node:
        if node.name not in targets:
            new_nodes.append(node)
            continue
        key = quantize.group_key(node)
        if key in done:
            continue
        done.add(key)
        group = groups[key]
        weights = {quantize.weight_of(n): initializers[quantize.weight_of(n)] for n in group}
        arrays = {name: tensor_array(t, base) for name, t in weights.items()}
        nodes, tensors = quantize(group, arrays)
        new_nodes.extend(nodes)
        model.graph.initializer.extend(writer.add_proto(t) for t in tensors)
        written.update(t.name for t in tensors)
        del nodes, tensors, arrays
        release_memory()  # the scratch model's pages go back to the OS before the next group
        count += len(group)
        if say is not None and count * 10 // total > (count - len(group)) * 10 // total:
            say(f"quantized {count} of {total} matrices")
    del model.graph.node[:]
    model.graph.node.extend(new_nodes)
    return written


class _PerNode:
    """Each node's quantizer by its precision (``plan``); one quantizer per distinct precision."""

    def __init__(self, plan: dict[str, Precision | None], accuracy_level: int) -> None:
        self.plan, self.accuracy_level = plan, accuracy_level
        self.quantizers: dict[Precision, Any] = {}

    @staticmethod
    def group_key(node: Any) -> str:
        return node.name

    @staticmethod
    def weight_of(node: Any) -> str:
        return node.input[0] if node.op_type == "Gather" else node.input[1]

    def __call__(self, group: list[Any], arrays: dict[str, np.ndarray]) -> tuple[list[Any], list[Any]]:
        (node,) = group
        precision = self.plan[node.name]
        if precision not in self.quantizers:
            kind = _KQuant if precision.algorithm == "k_quant" else _NBits
            self.quantizers[precision] = kind(precision, self.accuracy_level)
        return self.quantizers[precision](node, self.weight_of(node), arrays[self.weight_of(node)])


class _NBits:
    """MatMulNBits (4 or 8 bits) / GatherBlockQuantized (4 bits) through ORT's DefaultWeightOnlyQuantizer (round
    to nearest), one node at a time."""

    def __init__(self, precision: Precision, accuracy_level: int) -> None:
        from onnxruntime.quantization.matmul_nbits_quantizer import (
            DefaultWeightOnlyQuantConfig,
            DefaultWeightOnlyQuantizer,
        )
        from onnxruntime.quantization.quant_utils import QuantFormat

        self.quantizer = DefaultWeightOnlyQuantizer(
            DefaultWeightOnlyQuantConfig(
                block_size=precision.block_size,
                is_symmetric=not precision.zero_points,
                accuracy_level=accuracy_level,
                quant_format=QuantFormat.QOperator,
                op_types_to_quantize=("MatMul", "Gather"),
                quant_axes=(("MatMul", 0), ("Gather", 1)),
                bits=precision.bits,
            )
        )

    def __call__(self, node: Any, name: str, array: np.ndarray) -> tuple[list[Any], list[Any]]:
        from onnx import GraphProto, numpy_helper

        scratch = GraphProto()
        scratch.initializer.append(numpy_helper.from_array(np.asarray(array), name))
        nodes = self.quantizer.quantize(node, [scratch])
        return nodes, [t for t in scratch.initializer if t.name != name]


KQUANT_CHUNK = 1 << 21  # weights per k-quant call: its search holds about ten float32/float64 copies of them


class _KQuant:
    """MatMulNBits with zero points from ORT's k-quant (llama.cpp's search of each block's scale and minimum,
    weighted by magnitude), as ``MatMulNBitsQuantizer`` with ``KQuantWeightOnlyQuantConfig`` runs it per MatMul
    (``rtn_quantize``). Blocks are independent: it runs on slices of output columns (``KQUANT_CHUNK`` weights)
    and gives the same tensors as on the whole matrix."""

    def __init__(self, precision: Precision, accuracy_level: int) -> None:
        self.bits, self.block_size, self.accuracy_level = precision.bits, precision.block_size, accuracy_level

    def __call__(self, node: Any, name: str, array: np.ndarray) -> tuple[list[Any], list[Any]]:
        from onnxruntime.quantization.neural_compressor.weight_only import (
            make_matmul_weight_only_node,
            pad_tensor,
            quant_tensor_k_quant_cpu,
        )

        weight = np.asarray(array)
        rows, cols = weight.shape
        k_blocks = (rows - 1) // self.block_size + 1
        step = max(1, KQUANT_CHUNK // (k_blocks * self.block_size))
        quantized, scales, zero_points = [], [], []
        for start in range(0, cols, step):
            part = pad_tensor(weight[:, start : start + step], self.block_size, k_blocks)
            q, scale, zero_point = quant_tensor_k_quant_cpu(part.T, self.bits, self.block_size)
            quantized.append(q.astype(np.uint8))
            scales.append(scale.astype(weight.dtype))
            zero_points.append(zero_point)
            del part, q, scale, zero_point
        new, tensors = make_matmul_weight_only_node(
            node=node,
            weight_shape=weight.shape,
            num_bits=self.bits,
            group_size=self.block_size,
            k_blocks=k_blocks,
            q_weight=np.concatenate(quantized),
            scale=np.concatenate(scales),
            zero_point=np.concatenate(zero_points),
            accuracy_level=self.accuracy_level,
        )
        return [new], tensors


class _Int8:
    """MatMulInteger through ORT's ONNXQuantizer (IntegerOps, as quantize_dynamic), on a model holding
    the nodes of one activation and their weights."""

    def __init__(self, model: Any, config: QuantConfig) -> None:
        self.model, self.config = model, config

    @staticmethod
    def group_key(node: Any) -> str:
        return node.input[0] if node.op_type == "MatMul" else node.name

    @staticmethod
    def weight_of(node: Any) -> str:
        return node.input[0] if node.op_type == "Gather" else node.input[1]

    def __call__(self, group: list[Any], arrays: dict[str, np.ndarray]) -> tuple[list[Any], list[Any]]:
        import onnx
        from onnx import TensorProto, helper, numpy_helper
        from onnxruntime.quantization.onnx_quantizer import ONNXQuantizer
        from onnxruntime.quantization.quant_utils import QuantizationMode, QuantType

        inputs, outputs = {}, []
        for node in group:
            if node.op_type == "MatMul":
                inputs[node.input[0]] = helper.make_tensor_value_info(node.input[0], TensorProto.FLOAT, None)
            else:  # Gather(data, indices)
                inputs[node.input[1]] = helper.make_tensor_value_info(node.input[1], TensorProto.INT64, None)
            outputs.append(helper.make_tensor_value_info(node.output[0], TensorProto.FLOAT, None))
        graph = helper.make_graph(
            list(group),
            "one-activation",
            list(inputs.values()),
            outputs,
            [numpy_helper.from_array(np.asarray(array), name) for name, array in arrays.items()],
        )
        scratch = helper.make_model(graph, opset_imports=list(self.model.opset_import))
        scratch.ir_version = self.model.ir_version
        scratch = onnx.shape_inference.infer_shapes(scratch)
        quantizer = ONNXQuantizer(
            scratch,
            self.config.per_channel,
            self.config.reduce_range,
            QuantizationMode.IntegerOps,
            False,  # static
            getattr(QuantType, self.config.weight_type),
            QuantType.QUInt8,  # dynamic activations are uint8
            None,
            [n.name for n in group],
            [],
            ["MatMul", "Gather"],
            # DefaultTensorType 1 (FLOAT): the type of com.microsoft outputs that shape inference cannot infer.
            {"MatMulConstBOnly": True, "DefaultTensorType": 1},
        )
        quantizer.quantize_model()
        result = quantizer.model.model
        for opset in result.opset_import:
            _set_opset(self.model, opset.domain, opset.version, at_least=True)
        # Copies: a protobuf sub-message keeps its whole parent message alive (one memory arena), so
        # returning the nodes themselves would keep every group's scratch model and weights until the end.
        return [_copy(n) for n in result.graph.node], [t for t in result.graph.initializer if t.name not in arrays]


def _copy(message: Any) -> Any:
    out = type(message)()
    out.CopyFrom(message)
    return out


def _set_opset(model: Any, domain: str, version: int, *, at_least: bool = False) -> None:
    from onnx import helper

    domain = "" if domain in ("ai.onnx", None) else domain
    for opset in model.opset_import:
        if (opset.domain or "") == domain:
            opset.version = max(opset.version, version) if at_least else version
            return
    model.opset_import.append(helper.make_opsetid(domain, version))


def untie_lm_head(model: Any, spec: ModelSpec, base_dir: Path = Path()) -> str | None:
    """Replace the LM head ``Gemm(x, wte, C, transB=1)`` by ``MatMul(x, wte^T)`` (+ C when nonzero) on a
    new inline initializer (one tensor in memory); returns the MatMul's name, or None when the graph
    has no such Gemm. ``base_dir``: where external weights of ``model`` are."""
    from onnx import helper, numpy_helper

    initializers = {t.name: t for t in model.graph.initializer}
    for index, node in enumerate(model.graph.node):
        if node.op_type != "Gemm" or _attrs(node).get("transB") != 1 or _attrs(node).get("transA", 0) != 0:
            continue
        if _attrs(node).get("alpha", 1.0) != 1.0 or _attrs(node).get("beta", 1.0) != 1.0:
            continue
        tensor = initializers.get(node.input[1])
        if tensor is None or tuple(tensor.dims) != (spec.vocab_size, spec.n_embd):
            continue
        bias = _constant(model, node.input[2], base_dir) if len(node.input) > 2 and node.input[2] else None
        weight = tensor_array(tensor, base_dir)
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


def _drop_unused_initializers(model: Any) -> None:
    used = {name for node in model.graph.node for name in node.input}
    kept = [t for t in model.graph.initializer if t.name in used]
    del model.graph.initializer[:]
    model.graph.initializer.extend(kept)


def _embedding_gather(model: Any, spec: ModelSpec, initializers: dict) -> str | None:
    for node in model.graph.node:
        tensor = initializers.get(node.input[0]) if node.op_type == "Gather" else None
        if tensor is not None and tuple(tensor.dims) == (spec.vocab_size, spec.n_embd):
            return node.name
    return None


@contextlib.contextmanager
def _quiet_quantizer_logs() -> Iterator[None]:
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


def _constant(model: Any, name: str, base_dir: Path) -> np.ndarray | None:
    """An initializer, or the value of a Constant node, by output name."""
    from onnx import helper, numpy_helper

    for tensor in model.graph.initializer:
        if tensor.name == name:
            return tensor_array(tensor, base_dir)
    for node in model.graph.node:
        if node.op_type == "Constant" and node.output[0] == name:
            for attribute in node.attribute:
                if attribute.name == "value":
                    return numpy_helper.to_array(helper.get_attribute_value(attribute))
    return None


def _attrs(node: Any) -> dict[str, Any]:
    from onnx import helper

    return {a.name: helper.get_attribute_value(a) for a in node.attribute}
