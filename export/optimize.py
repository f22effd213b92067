"""``--optimize``: ONNX Runtime's offline transformer fusions, plus our attention fusion.

From onnxruntime.transformers.optimizer: tanh GELU + bias -> FastGelu, and for the GPU
LayerNormalization + residual Add -> SkipLayerNormalization. On the CPU the residual Add and
LayerNormalization stay two operators: in onnxruntime's profile of CPM-small's int4 128-token prompt
pass the 25 SkipLayerNormalization nodes took 6.4 ms, the Add and LayerNormalization nodes of the new
graph 2.0 ms (benchmarks/results/peers-llamacpp-native-intel-xeon-2c/profile_prefill128.json).
Its GPT-2 attention fusions do not match our graph (they expect ORT's
own GPT-2 export with a stacked past), so ``export.attention_fusion`` rewrites each layer's attention
into com.microsoft.MultiHeadAttention instead, for float32 graphs on the CPU provider (the kernel we
can validate here), and ``export.kv_share`` turns that into GroupQueryAttention, whose KV cache can
be appended in place (manifest ``kv_cache: shared``). The fused graph uses com.microsoft operators,
so it runs on ONNX Runtime only: the export keeps the plain graph next to it (manifest role
``portable``) and re-validates the fused graph against eager PyTorch.

The graph is loaded without its external weights (``export.onnx_weights``): the fusions read only
shapes and small constants, and the fused graph points at the same data file as the plain one, so
both graphs of an artifact share one copy of the weights on disk.
"""

from __future__ import annotations

import logging
from pathlib import Path

from cpm_infer.config import ModelSpec
from cpm_infer.deps import require
from cpm_infer.errors import CpmError, first_line
from export.onnx_weights import INLINE_NDIM, ExternalDataWriter, is_external, load_graph, save_graph

log = logging.getLogger(__name__)


class OptimizeError(CpmError):
    """onnxruntime's transformer optimizer failed on the graph."""


def optimize_graph(
    source: Path,
    target: Path,
    spec: ModelSpec,
    *,
    use_gpu: bool = False,
    dtype: str = "float32",
) -> dict[str, int]:
    """Write the fused graph to ``target``; return the count of each fused operator that was applied.
    Large tensors the fusions create (none today) go to ``target.data``."""
    require("onnxruntime", "export")
    from onnxruntime.transformers.fusion_options import FusionOptions
    from onnxruntime.transformers.optimizer import optimize_model

    options = FusionOptions("gpt2")
    options.enable_gelu_approximation = False  # keep GELU exact: parity with eager is re-checked
    if not use_gpu:  # module docstring: the CPU kernel loses to Add + LayerNormalization
        options.enable_skip_layer_norm = options.enable_bias_skip_layer_norm = False
    try:
        # opt_level 0: only the Python fusions, no provider-specific ORT rewrites baked into the file.
        model = optimize_model(
            load_graph(source),
            model_type="gpt2",
            num_heads=spec.n_head,
            hidden_size=spec.n_embd,
            optimization_options=options,
            opt_level=0,
            use_gpu=use_gpu,
        )
    except Exception as exc:  # the optimizer raises many types; report one line
        raise OptimizeError(f"onnxruntime transformer optimizer failed on {source.name}: {first_line(exc)}") from exc
    fused = {op: n for op, n in model.get_fused_operator_statistics().items() if n}
    if dtype == "float32" and not use_gpu:
        from export.attention_fusion import fuse_attention

        layers = fuse_attention(model, spec.n_layer, spec.n_head)
        if layers:
            from export.kv_share import share_kv

            # MultiHeadAttention -> GroupQueryAttention: the KV cache is appended in place (export.kv_share).
            fused["GroupQueryAttention"] = share_kv(model)
    if not fused:
        log.warning("no onnxruntime fusion applied to %s", source.name)
    model.topological_sort()
    proto = model.model
    new = [i for i, t in enumerate(proto.graph.initializer) if not is_external(t) and len(t.dims) > INLINE_NDIM]
    if new:
        with ExternalDataWriter(target.with_name(f"{target.name}.data")) as writer:
            for i in new:
                proto.graph.initializer[i].CopyFrom(writer.add_proto(proto.graph.initializer[i]))
    save_graph(proto, target)
    log.info("fused operators in %s: %s", target.name, fused)
    return fused
