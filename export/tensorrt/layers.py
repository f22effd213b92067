"""Which layers of an FP16 engine stay in FP32, decided on a plain description of the network.

FP16 overflows at 65504. In GPT-2 the dangerous spots are LayerNorm's variance (the square of
``x - mean`` and its mean: activations of a few hundred already overflow) and the attention softmax
with its mask arithmetic (scores, ``where(mask, scores, -1e4)``, exp). These run in FP32; the GEMMs,
which hold nearly all the time and bytes, run in FP16. Logits leave the engine as FP32 (the network
output keeps its float32 type).

The rule works on ``LayerInfo`` records so it can be tested without TensorRT: the builder converts
the TensorRT network into them (``layers_from_network``); tests convert an ONNX graph
(``layers_from_onnx``: ONNX operators map one-to-one onto the TensorRT layers the parser creates).

- ``NORMALIZATION`` (the ONNX LayerNormalization op): FP32, and its compute precision FP32.
- ``REDUCE`` average/sum and ``ELEMENTWISE`` pow: FP32 (a decomposed LayerNorm's statistics), and
  forward from a pow through element-wise/unary layers up to the first div/prod (``+eps``, ``sqrt``,
  the normalising division). The pow of the tanh-GELU (``x**3``) is caught too, with its ``* 0.044715``:
  ``x**3`` overflows FP16 for ``|x| > 40``, so that is welcome.
- ``SOFTMAX``: FP32, and backward through the float element-wise/select layers that feed it (mask
  ``where``, scaling) down to the score MatMul.
Only layers with floating-point outputs are constrained (a boolean mask ``and`` is left alone).
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class LayerInfo:
    index: int
    kind: str  # TensorRT LayerType name: ELEMENTWISE, REDUCE, SOFTMAX, NORMALIZATION, ...
    op: str | None  # ElementWiseOperation / ReduceOperation / UnaryOperation name, if any
    inputs: tuple[str, ...]
    outputs: tuple[str, ...]
    float_out: bool = True
    name: str = ""


_PASS = {"SHUFFLE", "IDENTITY", "CAST"}  # layout/type layers the walks step through without marking
_FORWARD_KEEP = {"ELEMENTWISE", "UNARY", "REDUCE"}
_FORWARD_STOP = {("ELEMENTWISE", "DIV"), ("ELEMENTWISE", "PROD")}
_BACKWARD_KEEP = {"ELEMENTWISE", "SELECT"}
_MAX_FORWARD, _MAX_BACKWARD = 4, 3


def select_fp32_layers(layers: Sequence[LayerInfo]) -> dict[int, str]:
    """Layer index -> reason, for every layer an FP16 engine must compute in FP32."""
    producer = {t: layer for layer in layers for t in layer.outputs}
    consumers: dict[str, list[LayerInfo]] = defaultdict(list)
    for layer in layers:
        for t in layer.inputs:
            consumers[t].append(layer)
    keep: dict[int, str] = {}

    def mark(layer: LayerInfo, reason: str) -> None:
        if layer.float_out:
            keep.setdefault(layer.index, reason)

    def forward(layer: LayerInfo, depth: int) -> None:
        if depth > _MAX_FORWARD or (layer.kind, layer.op) in _FORWARD_STOP:
            return
        for t in layer.outputs:
            for nxt in consumers.get(t, []):
                if nxt.kind in _FORWARD_KEEP:
                    mark(nxt, "after pow (variance chain)")
                    forward(nxt, depth + 1)
                elif nxt.kind in _PASS:
                    forward(nxt, depth + 1)

    def backward(layer: LayerInfo, depth: int) -> None:
        if depth > _MAX_BACKWARD:
            return
        for t in layer.inputs:
            prev = producer.get(t)
            if prev is None or not prev.float_out:
                continue
            if prev.kind in _BACKWARD_KEEP:
                mark(prev, "feeds softmax (mask/scale)")
                backward(prev, depth + 1)
            elif prev.kind in _PASS:
                backward(prev, depth + 1)

    for layer in layers:
        if layer.kind == "NORMALIZATION":
            mark(layer, "layernorm")
        elif layer.kind == "SOFTMAX":
            mark(layer, "softmax")
            backward(layer, 1)
        elif layer.kind == "REDUCE" and layer.op in ("AVG", "SUM"):
            mark(layer, "mean (layernorm statistics)")
        elif layer.kind == "ELEMENTWISE" and layer.op == "POW":
            mark(layer, "pow")
            forward(layer, 1)
    return keep


# ONNX operator -> (TensorRT layer type, operation) created by the ONNX parser.
_ONNX_TO_TRT: dict[str, tuple[str, str | None]] = {
    "Add": ("ELEMENTWISE", "SUM"),
    "Sub": ("ELEMENTWISE", "SUB"),
    "Mul": ("ELEMENTWISE", "PROD"),
    "Div": ("ELEMENTWISE", "DIV"),
    "Pow": ("ELEMENTWISE", "POW"),
    "Max": ("ELEMENTWISE", "MAX"),
    "Min": ("ELEMENTWISE", "MIN"),
    "And": ("ELEMENTWISE", "AND"),
    "Or": ("ELEMENTWISE", "OR"),
    "Equal": ("ELEMENTWISE", "EQUAL"),
    "Greater": ("ELEMENTWISE", "GREATER"),
    "Less": ("ELEMENTWISE", "LESS"),
    "LessOrEqual": ("ELEMENTWISE", "LESS"),
    "GreaterOrEqual": ("ELEMENTWISE", "GREATER"),
    "ReduceMean": ("REDUCE", "AVG"),
    "ReduceSum": ("REDUCE", "SUM"),
    "ReduceMax": ("REDUCE", "MAX"),
    "Sqrt": ("UNARY", "SQRT"),
    "Reciprocal": ("UNARY", "RECIP"),
    "Exp": ("UNARY", "EXP"),
    "Not": ("UNARY", "NOT"),
    "Tanh": ("ACTIVATION", "TANH"),
    "Relu": ("ACTIVATION", "RELU"),
    "Erf": ("UNARY", "ERF"),
    "Softmax": ("SOFTMAX", None),
    "LayerNormalization": ("NORMALIZATION", None),
    "Where": ("SELECT", None),
    "MatMul": ("MATRIX_MULTIPLY", None),
    "Gemm": ("MATRIX_MULTIPLY", None),
    "Cast": ("CAST", None),
    "Reshape": ("SHUFFLE", None),
    "Transpose": ("SHUFFLE", None),
    "Unsqueeze": ("SHUFFLE", None),
    "Squeeze": ("SHUFFLE", None),
    "Flatten": ("SHUFFLE", None),
    "Identity": ("IDENTITY", None),
    "Concat": ("CONCATENATION", None),
    "Gather": ("GATHER", None),
    "Slice": ("SLICE", None),
    "Split": ("SLICE", None),
    "Constant": ("CONSTANT", None),
    "Shape": ("SHAPE", None),
}
_BOOL_OPS = {"And", "Or", "Not", "Equal", "Greater", "Less", "LessOrEqual", "GreaterOrEqual"}


def layers_from_onnx(model: Any) -> list[LayerInfo]:
    """Describe an ``onnx.ModelProto`` graph as the layers TensorRT's parser would create."""
    float_types = {1, 10, 11, 16}  # FLOAT, FLOAT16, DOUBLE, BFLOAT16
    elem = {vi.name: vi.type.tensor_type.elem_type for vi in (*model.graph.value_info, *model.graph.output)}
    layers = []
    for i, node in enumerate(model.graph.node):
        kind, op = _ONNX_TO_TRT.get(node.op_type, (node.op_type.upper(), None))
        out_type = elem.get(node.output[0]) if node.output else None
        float_out = out_type in float_types if out_type else node.op_type not in _BOOL_OPS
        if node.op_type == "Cast":
            to = next((a.i for a in node.attribute if a.name == "to"), None)
            float_out = to in float_types
        layers.append(
            LayerInfo(i, kind, op, tuple(t for t in node.input if t), tuple(node.output), float_out, node.name)
        )
    return layers


def _enum_name(value: Any) -> str:
    return getattr(value, "name", None) or str(value).rsplit(".", 1)[-1]


_TYPED = {"ELEMENTWISE": "IElementWiseLayer", "REDUCE": "IReduceLayer", "UNARY": "IUnaryLayer"}


def layers_from_network(network: Any, trt: Any) -> list[LayerInfo]:
    """Describe a TensorRT ``INetworkDefinition`` (needs TensorRT; runs before the build)."""
    floats = {trt.float32, trt.float16}
    layers = []
    for i in range(network.num_layers):
        layer = network.get_layer(i)
        kind = _enum_name(layer.type)
        op = None
        if kind in _TYPED:
            # The Python API returns ILayer; the documented way to reach subclass fields is to recast.
            layer.__class__ = getattr(trt, _TYPED[kind])
            op = _enum_name(layer.op)
        ins = tuple(layer.get_input(j).name for j in range(layer.num_inputs) if layer.get_input(j) is not None)
        outs = tuple(layer.get_output(j).name for j in range(layer.num_outputs))
        float_out = all(layer.get_output(j).dtype in floats for j in range(layer.num_outputs))
        layers.append(LayerInfo(i, kind, op, ins, outs, float_out, layer.name))
    return layers


def apply_fp32(network: Any, trt: Any, indices: Sequence[int]) -> int:
    """Set precision and output types of ``indices`` to FP32 (obeyed with OBEY_PRECISION_CONSTRAINTS)."""
    for i in indices:
        layer = network.get_layer(i)
        if _enum_name(layer.type) == "NORMALIZATION":
            layer.__class__ = trt.INormalizationLayer
            layer.compute_precision = trt.float32  # INormalizationLayer, TensorRT >= 8.6
        layer.precision = trt.float32
        for j in range(layer.num_outputs):
            if layer.get_output(j).is_execution_tensor:
                layer.set_output_type(j, trt.float32)
    return len(indices)
