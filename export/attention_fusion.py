"""Fuse each layer's attention subgraph of an ``ExportGPT2`` graph into com.microsoft.MultiHeadAttention.

ONNX Runtime's own GPT-2 attention fusion expects its GPT-2 export (a stacked past per layer), so it
never matches our KV contract. We know our graph's exact shape (``export/gpt2.py``), so we rewrite it:

    Split(qkv) -> q, k, v (B, T, C)          past_key_values.{i}.key/value (B, nh, P, hs)
        \\____ MultiHeadAttention(num_heads, scale, unidirectional=1, key_padding_mask=attention_mask)
                -> attention output (B, T, C), present.{i}.key/value (B, nh, P+T, hs)

This replaces ~20 small nodes per layer (reshapes, transposes, concat, QK and PV MatMuls that repack
K and V on every call, the mask Where, softmax) with one kernel, which matters at long context. The
causal offset (query i sits at slot P + i) and left padding (mask 0 -> -1e4) match ``ExportGPT2``.
The CPU kernel is float32; the export applies this only to float32 graphs for the CPU provider, and
re-validates the fused graph against eager PyTorch.
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np

from cpm_infer import kv
from cpm_infer.kv import MASK_VALUE

log = logging.getLogger(__name__)

MASK_INT32 = "attention_mask_int32"


def fuse_attention(model: Any, n_layer: int, n_head: int) -> int:
    """Rewrite ``model`` (an onnxruntime.transformers OnnxModel) in place; returns the layers fused."""
    from onnx import helper

    producers = model.output_name_to_node()
    consumers = model.input_name_to_nodes()
    fused = 0
    for i in range(n_layer):
        match = _match_layer(model, i, producers, consumers)
        if match is None:
            log.info("layer %d: attention pattern not found, left unfused", i)
            continue
        split, scale, concat_k, concat_v, out_transpose, out_reshape = match
        model.remove_nodes([concat_k, concat_v, out_transpose, out_reshape])
        model.add_node(
            helper.make_node(
                "MultiHeadAttention",
                [
                    split.output[0],
                    split.output[1],
                    split.output[2],
                    "",
                    MASK_INT32,
                    "",
                    concat_k.input[0],
                    concat_v.input[0],
                ],
                [out_reshape.output[0], concat_k.output[0], concat_v.output[0]],
                name=f"/blocks.{i}/MultiHeadAttention",
                domain="com.microsoft",
                num_heads=n_head,
                scale=scale,
                unidirectional=1,
                mask_filter_value=MASK_VALUE,
            )
        )
        fused += 1
    if fused:
        model.add_node(
            helper.make_node("Cast", [kv.ATTENTION_MASK], [MASK_INT32], name="/CastMaskInt32", to=6)
        )  # INT32
        if not any(op.domain == "com.microsoft" for op in model.model.opset_import):
            model.model.opset_import.append(helper.make_opsetid("com.microsoft", 1))
        model.prune_graph()  # the unfused attention nodes and causal-mask builders are now dead
        model.topological_sort()
    return fused


def _match_layer(model: Any, i: int, producers: dict, consumers: dict):
    """The nodes of layer ``i``'s attention, or None if the graph does not have our exact pattern."""
    concat_k = producers.get(f"present.{i}.key")
    concat_v = producers.get(f"present.{i}.value")
    if concat_k is None or concat_v is None or concat_k.op_type != "Concat" or concat_v.op_type != "Concat":
        return None
    k_src, v_src = (_head_split_source(c.input[1], producers) for c in (concat_k, concat_v))
    if k_src is None or v_src is None or k_src[0] is not v_src[0] or (k_src[1], v_src[1]) != (1, 2):
        return None
    split = k_src[0]
    pv = [n for n in consumers.get(concat_v.output[0], []) if n.op_type == "MatMul"]
    if len(pv) != 1:
        return None
    out_transpose = _only_consumer(pv[0].output[0], consumers, "Transpose")
    out_reshape = out_transpose and _only_consumer(out_transpose.output[0], consumers, "Reshape")
    scale = _query_scale(model, split.output[0], consumers)
    if out_reshape is None or scale is None:
        return None
    return split, scale, concat_k, concat_v, out_transpose, out_reshape


def _head_split_source(name: str, producers: dict):
    """``Transpose(0,2,1,3)(Reshape(Split[j]))`` -> (Split node, j)."""
    transpose = producers.get(name)
    if transpose is None or transpose.op_type != "Transpose" or _attr(transpose, "perm") != [0, 2, 1, 3]:
        return None
    reshape = producers.get(transpose.input[0])
    if reshape is None or reshape.op_type != "Reshape":
        return None
    split = producers.get(reshape.input[0])
    if split is None or split.op_type != "Split" or len(split.output) != 3:
        return None
    return split, list(split.output).index(reshape.input[0])


def _query_scale(model: Any, q: str, consumers: dict) -> float | None:
    """q -> Reshape -> Transpose -> Mul(constant): the constant is the attention scale."""
    node = _only_consumer(q, consumers, "Reshape")
    node = node and _only_consumer(node.output[0], consumers, "Transpose")
    node = node and _only_consumer(node.output[0], consumers, "Mul")
    if node is None:
        return None
    for name in node.input:
        value = model.get_constant_value(name)
        if value is not None and np.size(value) == 1:
            return float(np.asarray(value).reshape(-1)[0])
    return None


def _only_consumer(name: str, consumers: dict, op_type: str):
    nodes = consumers.get(name, [])
    return nodes[0] if len(nodes) == 1 and nodes[0].op_type == op_type else None


def _attr(node: Any, name: str):
    from onnx import helper

    for attribute in node.attribute:
        if attribute.name == name:
            return list(helper.get_attribute_value(attribute))
    return None
