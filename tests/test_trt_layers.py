"""Which layers an FP16 engine keeps in FP32: the rule on plain records, on the real exported ONNX
graph, and the TensorRT adapters against a stand-in network (no TensorRT needed)."""

from __future__ import annotations

from collections import Counter
from types import SimpleNamespace

import pytest

from export.tensorrt.layers import LayerInfo, apply_fp32, layers_from_network, layers_from_onnx, select_fp32_layers


def L(i, kind, op, ins, outs, float_out=True):
    return LayerInfo(i, kind, op, tuple(ins), tuple(outs), float_out, f"l{i}")


def test_decomposed_layernorm_keeps_the_variance_chain_in_fp32():
    layers = [
        L(0, "REDUCE", "AVG", ["x"], ["mean"]),
        L(1, "ELEMENTWISE", "SUB", ["x", "mean"], ["d"]),
        L(2, "ELEMENTWISE", "POW", ["d", "two"], ["d2"]),
        L(3, "REDUCE", "AVG", ["d2"], ["var"]),
        L(4, "ELEMENTWISE", "SUM", ["var", "eps"], ["ve"]),
        L(5, "UNARY", "SQRT", ["ve"], ["std"]),
        L(6, "ELEMENTWISE", "DIV", ["d", "std"], ["n"]),
        L(7, "ELEMENTWISE", "PROD", ["n", "gamma"], ["g"]),
        L(8, "MATRIX_MULTIPLY", None, ["g", "w"], ["y"]),
    ]
    assert sorted(select_fp32_layers(layers)) == [0, 2, 3, 4, 5, 6]  # not the sub, scale or GEMM


def test_softmax_keeps_its_float_mask_arithmetic_but_not_booleans_or_gemms():
    layers = [
        L(0, "MATRIX_MULTIPLY", None, ["q", "k"], ["s"]),
        L(1, "CAST", None, ["s"], ["s32"]),
        L(2, "ELEMENTWISE", "LESS", ["i", "j"], ["causal"], float_out=False),
        L(3, "ELEMENTWISE", "AND", ["causal", "pad"], ["allowed"], float_out=False),
        L(4, "SELECT", None, ["allowed", "s32", "neg"], ["masked"]),
        L(5, "SOFTMAX", None, ["masked"], ["p"]),
        L(6, "MATRIX_MULTIPLY", None, ["p", "v"], ["o"]),
    ]
    assert select_fp32_layers(layers) == {5: "softmax", 4: "feeds softmax (mask/scale)"}


def test_fused_layernorm_and_plain_network_parts():
    layers = [
        L(0, "NORMALIZATION", None, ["x", "g", "b"], ["n"]),
        L(1, "MATRIX_MULTIPLY", None, ["n", "w"], ["h"]),
        L(2, "ACTIVATION", "TANH", ["h"], ["t"]),
        L(3, "CONCATENATION", None, ["past", "t"], ["present"]),
    ]
    assert select_fp32_layers(layers) == {0: "layernorm"}


@pytest.fixture(scope="module")
def exported_graphs(tiny_checkpoint, tmp_path_factory):
    pytest.importorskip("onnxruntime")
    onnx = pytest.importorskip("onnx")
    from export.onnx_export import export_onnx

    out = tmp_path_factory.mktemp("onnx")
    graphs = {}
    for name, fp16 in (("float32", False), ("float16", True)):
        result = export_onnx(tiny_checkpoint, out / name, fp16=fp16)
        graphs[name] = onnx.shape_inference.infer_shapes(onnx.load(str(result.path / "model.onnx")))
    return graphs


@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_rule_on_the_exported_gpt2_graph(exported_graphs, dtype):
    layers = layers_from_onnx(exported_graphs[dtype])
    chosen = select_fp32_layers(layers)
    kinds = Counter((layers[i].kind, layers[i].op) for i in chosen)
    n_layer = 2  # tests/conftest.py make_tiny_model
    assert kinds[("NORMALIZATION", None)] == 2 * n_layer + 1  # ln_1, ln_2 per block and ln_f
    assert kinds[("SOFTMAX", None)] == n_layer
    assert kinds[("SELECT", None)] == n_layer  # where(allowed, scores, -1e4)
    assert kinds[("ELEMENTWISE", "POW")] == n_layer  # tanh-GELU's x**3 ...
    assert kinds[("ELEMENTWISE", "PROD")] == n_layer  # ... and its * 0.044715
    assert not any(layers[i].kind == "MATRIX_MULTIPLY" for i in chosen)
    assert all(layers[i].float_out for i in chosen)


# -- stand-ins for the TensorRT Python API objects the adapters touch ----------------------------
class _Tensor:
    def __init__(self, name, dtype):
        self.name, self.dtype, self.is_execution_tensor = name, dtype, True


class _Layer:
    def __init__(self, name, type_, op, ins, outs):
        self.name, self.type, self.op = name, type_, op
        self._ins, self._outs = ins, outs
        self.num_inputs, self.num_outputs = len(ins), len(outs)
        self.precision, self.output_types = None, {}

    def get_input(self, i):
        return self._ins[i]

    def get_output(self, i):
        return self._outs[i]

    def set_output_type(self, i, dtype):
        self.output_types[i] = dtype


def _fake_trt():
    enum = SimpleNamespace
    types = enum(
        **{
            k: SimpleNamespace(name=k)
            for k in ("ELEMENTWISE", "REDUCE", "UNARY", "SOFTMAX", "NORMALIZATION", "MATRIX_MULTIPLY")
        }
    )
    ops = SimpleNamespace(
        POW=SimpleNamespace(name="POW"), AVG=SimpleNamespace(name="AVG"), SUM=SimpleNamespace(name="SUM")
    )
    classes = {
        n: type(n, (_Layer,), {}) for n in ("IElementWiseLayer", "IReduceLayer", "IUnaryLayer", "INormalizationLayer")
    }
    return SimpleNamespace(LayerType=types, float32="f32", float16="f16", bool="bool", ops=ops, **classes)


def test_network_adapter_and_apply(monkeypatch):
    trt = _fake_trt()
    x, g = _Tensor("x", "f32"), _Tensor("g", "f32")
    layers = [
        _Layer("ln", trt.LayerType.NORMALIZATION, None, [x, g], [_Tensor("n", "f32")]),
        _Layer("mm", trt.LayerType.MATRIX_MULTIPLY, None, [_Tensor("n", "f32"), g], [_Tensor("h", "f32")]),
        _Layer("pow", trt.LayerType.ELEMENTWISE, trt.ops.POW, [_Tensor("h", "f32"), g], [_Tensor("h3", "f32")]),
        _Layer("sm", trt.LayerType.SOFTMAX, None, [_Tensor("h3", "f32")], [_Tensor("p", "f32")]),
    ]
    network = SimpleNamespace(num_layers=len(layers), get_layer=lambda i: layers[i])
    described = layers_from_network(network, trt)
    assert [(d.kind, d.op, d.name) for d in described] == [
        ("NORMALIZATION", None, "ln"),
        ("MATRIX_MULTIPLY", None, "mm"),
        ("ELEMENTWISE", "POW", "pow"),
        ("SOFTMAX", None, "sm"),
    ]
    assert type(layers[2]).__name__ == "IElementWiseLayer"  # recast to reach .op, as the API requires
    chosen = select_fp32_layers(described)
    assert sorted(chosen) == [0, 2, 3]
    assert apply_fp32(network, trt, sorted(chosen)) == 3
    assert (
        layers[0].compute_precision == "f32" and layers[0].precision == "f32" and layers[0].output_types == {0: "f32"}
    )
    assert layers[1].precision is None
