"""A KV cache that is written in place: attention on a preallocated buffer shared by past and present.

With ``MultiHeadAttention`` (``export.attention_fusion``) every decode step reads the whole past and
writes present = concat(past, new) into another buffer: O(context) bytes copied per token and layer.
``com.microsoft.GroupQueryAttention`` (kv_num_heads = num_heads, i.e. plain multi-head attention)
detects when ``past_key`` and ``present_key`` are the same memory and then only appends the new
token's key/value at its slot. This module rewrites each fused MultiHeadAttention node into one:

    GroupQueryAttention(q, k, v, past_key, past_value, seqlens_k, total_sequence_length,
                        attention_bias = 0 for real slots / -1e4 for left padding)

The three projections reach it packed, as the one (B, T, 3C) tensor the qkv ``Split`` cut (query = Q | K | V,
key and value empty): the Split, a copy of every activation, goes.

``seqlens_k`` (= total - 1 for every row: left-padded rows share one slot layout) and the total come
from ``attention_mask``; causal masking is the op's. Without sharing (past of length P bound as a
separate input) the op returns present = past + new like the KV contract says, so the graph validates
against eager PyTorch like any other; with the same buffer bound to both (``OrtBackend`` with
``kv_cache: shared`` in the manifest), the buffer's sequence axis is its capacity and only the
mask's length says how much of it is filled.
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np

from cpm_infer import kv
from cpm_infer.kv import MASK_VALUE

log = logging.getLogger(__name__)

SEQLENS = "kv_share_seqlens_k"
TOTAL = "kv_share_total_sequence_length"
BIAS = "kv_share_attention_bias"


def share_kv(onnx_model: Any) -> int:
    """Rewrite every fused MultiHeadAttention of ``onnx_model`` (an onnxruntime.transformers OnnxModel, as
    ``export.attention_fusion`` takes) into GroupQueryAttention; returns how many. The graph's IO names and
    shapes are unchanged."""
    from onnx import helper

    model = onnx_model.model
    graph = model.graph
    producers, consumers = onnx_model.output_name_to_node(), onnx_model.input_name_to_nodes()
    rewritten = 0
    for index, node in enumerate(graph.node):
        if node.op_type != "MultiHeadAttention" or node.domain != "com.microsoft" or len(node.input) < 8:
            continue
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        if attrs.get("unidirectional") != 1:
            continue
        q, k, v, past_k, past_v = node.input[0], node.input[1], node.input[2], node.input[6], node.input[7]
        packed = _packed_source(onnx_model, producers.get(q), (q, k, v), consumers)
        if packed is not None:
            q, k, v = packed, "", ""
        gqa = helper.make_node(
            "GroupQueryAttention",
            [q, k, v, past_k, past_v, SEQLENS, TOTAL, "", "", "", BIAS],
            list(node.output[:3]),
            name=node.name.replace("MultiHeadAttention", "GroupQueryAttention") or f"GroupQueryAttention_{index}",
            domain="com.microsoft",
            num_heads=attrs["num_heads"],
            kv_num_heads=attrs["num_heads"],
            scale=attrs["scale"],
        )
        graph.node[index].CopyFrom(gqa)
        rewritten += 1
    if rewritten:
        _add_helpers(model)
        _prune_unused(model)
    log.info("GroupQueryAttention (shared KV buffer) in %d layers", rewritten)
    return rewritten


def _packed_source(onnx_model: Any, split: Any, qkv: tuple[str, str, str], consumers: dict) -> str | None:
    """The input of ``split`` when it cuts one tensor's last axis into exactly ``qkv``, three equal parts that
    nothing else reads (``consumers``: OnnxModel.input_name_to_nodes); None otherwise (the node then keeps its
    three inputs)."""
    from onnx import helper

    if split is None or split.op_type != "Split" or tuple(split.output) != qkv:
        return None
    if any(len(consumers.get(name, [])) != 1 for name in qkv):
        return None
    axis = next((helper.get_attribute_value(a) for a in split.attribute if a.name == "axis"), 0)
    if axis not in (2, -1):
        return None
    if len(split.input) > 1 and split.input[1]:
        sizes = onnx_model.get_constant_value(split.input[1])  # an initializer or a Constant node
        if sizes is None or len(set(np.asarray(sizes).reshape(-1).tolist())) != 1:
            return None
    return split.input[0]


def _add_helpers(model: Any) -> None:
    """seqlens_k (B,) int32, total_sequence_length () int32 and the padding bias (B, 1, S, total) float."""
    from onnx import TensorProto, helper, numpy_helper

    def const(name: str, value: np.ndarray) -> str:
        model.graph.initializer.append(numpy_helper.from_array(value, f"kv_share_{name}"))
        return f"kv_share_{name}"

    p = "kv_share_"
    zero, one = const("i0", np.array(0, np.int64)), const("i1", np.array(1, np.int64))
    axes0, axes12 = const("axes0", np.array([0], np.int64)), const("axes12", np.array([1, 2], np.int64))
    one32 = const("one32", np.array(1, np.int32))
    one_f, neg = const("one_f", np.array(1.0, np.float32)), const("mask", np.array(-MASK_VALUE, np.float32))
    n = helper.make_node
    nodes = [
        n("Shape", [kv.ATTENTION_MASK], [p + "mask_shape"]),
        n("Gather", [p + "mask_shape", zero], [p + "batch"], axis=0),
        n("Gather", [p + "mask_shape", one], [p + "total64"], axis=0),
        n("Cast", [p + "total64"], [TOTAL], to=TensorProto.INT32),
        n("Sub", [TOTAL, one32], [p + "last"]),
        n("Unsqueeze", [p + "batch", axes0], [p + "batch_1d"]),
        n("Expand", [p + "last", p + "batch_1d"], [SEQLENS]),
        # 0 where the mask is 1, -1e4 where it is 0 (left padding), broadcast over heads and queries.
        n("Cast", [kv.ATTENTION_MASK], [p + "mask_f"], to=TensorProto.FLOAT),
        n("Sub", [p + "mask_f", one_f], [p + "mask_m1"]),
        n("Mul", [p + "mask_m1", neg], [p + "bias_2d"]),
        n("Unsqueeze", [p + "bias_2d", axes12], [p + "bias_4d"]),
        n("Shape", [kv.INPUT_IDS], [p + "ids_shape"]),
        n("Gather", [p + "ids_shape", one], [p + "seq"], axis=0),
        n("Unsqueeze", [p + "seq", axes0], [p + "seq_1d"]),
        n("Unsqueeze", [p + "total64", axes0], [p + "total_1d"]),
        n(
            "Concat",
            [p + "batch_1d", const("one_1d", np.array([1], np.int64)), p + "seq_1d", p + "total_1d"],
            [p + "bias_shape"],
            axis=0,
        ),
        n("Expand", [p + "bias_4d", p + "bias_shape"], [BIAS]),
    ]
    for i, node in enumerate(nodes):
        node.name = f"/kv_share/{node.op_type}_{i}"
    # Prepend: topologically they depend on graph inputs only.
    existing = list(model.graph.node)
    del model.graph.node[:]
    model.graph.node.extend(nodes + existing)


def _prune_unused(model: Any) -> None:
    """Drop nodes (e.g. the int32 mask cast of MultiHeadAttention) whose outputs nothing reads."""
    outputs = {o.name for o in model.graph.output}
    while True:
        used = {name for node in model.graph.node for name in node.input} | outputs
        dead = [i for i, node in enumerate(model.graph.node) if not any(o in used for o in node.output)]
        if not dead:
            return
        for i in reversed(dead):
            del model.graph.node[i]
