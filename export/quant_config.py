"""The quantization schemes' settings (``QuantConfig``, ``CONFIGS``): the names ``export.quantize`` (the
user's options, the export step) and ``export.quantize_graph`` (the node-by-node quantizer) share."""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace
from typing import Any

from cpm_infer.errors import CpmError

SCHEMES = ("int8", "int4")


class QuantizeError(CpmError):
    """The graph cannot be quantized as asked (wrong source, unknown scheme, quantizer failure)."""


@dataclass(frozen=True)
class QuantConfig:
    """What one scheme does. ``lm_head``/``embedding``: quantized with the scheme, or "float32"; the int4
    scheme's LM head may also be "int8" (8-bit blocks of ``LM_HEAD_INT8_BLOCK``, as llama.cpp keeps the output
    matrix of q4_0 files at 6 bits)."""

    scheme: str
    lm_head: str
    embedding: str
    per_channel: bool = True  # int8: one scale per output column
    reduce_range: bool = False  # int8: 7-bit weights (avoids u8s8 saturation on AVX2 without VNNI)
    weight_type: str = "QInt8"  # int8
    block_size: int | None = 128  # MatMulNBits blocks; None (int8 only): per-channel dynamic quantization
    symmetric: bool = True  # MatMulNBits: no zero points
    accuracy_level: int = 4  # MatMulNBits: int8 compute inside (activations quantized per block)

    @property
    def bits(self) -> int:
        return 4 if self.scheme == "int4" else 8

    @property
    def block_wise(self) -> bool:
        """MatMulNBits (int4, or int8 with a block size) rather than quantize_dynamic's MatMulInteger."""
        return self.block_size is not None

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        if self.scheme == "int4" and self.lm_head == "int8":
            data["lm_head_block_size"] = LM_HEAD_INT8_BLOCK
        if not self.block_wise:
            for key in ("block_size", "symmetric", "accuracy_level"):
                data.pop(key)
            data["method"] = (
                "onnxruntime.quantization.quantize_dynamic (MatMulInteger, activations uint8 per tensor per call)"
            )
        else:
            for key in ("per_channel", "reduce_range", "weight_type"):
                data.pop(key)
            data["method"] = (
                f"onnxruntime.quantization.matmul_nbits_quantizer (com.microsoft.MatMulNBits, bits {self.bits})"
            )
        return data


# Decided from measurements (README: quantization table; CPM-small-shape decode on 2 AVX2 cores, batch 1,
# and held-out perplexity of the demo model on its chapter 60):
# - int8 in blocks of 32 (MatMulNBits), not per channel: the per-channel scheme's next-token KL from float32
#   was 4.0x llama.cpp q8_0's on the demo model's held-out chapter (per-tensor activations), blocks of 32 0.85x
#   (blocks of 64: 1.05x); it costs decode speed (2-core Xeon with VNNI: 8.25 vs 6.09 ms/token on CPM-small,
#   q8_0 10.80; benchmarks/results/peers-llamacpp-intel-xeon-2c). Per channel stays available (--per-channel).
# - LM head quantized in both: it is the largest matrix (30000x768), and keeping it float32 made a decode
#   step 19-28% slower for int8 (7.7-8.9 -> 9.9-10.6 ms) and 64-113% slower for int4 (4.7-5.1 -> 8.4-10.1
#   ms), for at most 0.07% perplexity.
# - int8 per channel, reduce_range: AVX2 without VNNI multiplies u8 x s8 pairs into saturating int16;
#   7-bit weights avoid that. On the demo models the two differ by under 0.1% perplexity either way.
# - embedding: int8 would get one scale for the whole table (quantize_dynamic's Gather), so it stays
#   float32; int4 uses GatherBlockQuantized with the MatMuls' 128-blocks (+0.05% perplexity, CPM-small
#   artifact 146 -> 70 MB). One row is read per token either way: size, not speed.
# - int4 symmetric: asymmetric (zero points) made a decode step ~25% slower (5.7 -> 7.2 ms); it was closer
#   to float32 on the demo model (-0.04% vs +0.87% perplexity), both far inside the +10% gate.
LM_HEAD_INT8_BLOCK = 32  # an int4 artifact's 8-bit LM head: the int8 scheme's blocks
CONFIGS = {
    "int8": QuantConfig("int8", lm_head="int8", embedding="float32", reduce_range=True, block_size=32),
    "int4": QuantConfig("int4", lm_head="int4", embedding="int4"),
}


def config_for(scheme: str, **overrides: Any) -> QuantConfig:
    if scheme not in CONFIGS:
        raise QuantizeError(f"unknown quantization scheme {scheme!r}; use {' or '.join(SCHEMES)}")
    config = replace(CONFIGS[scheme], **overrides)
    for part in ("lm_head", "embedding"):
        allowed = (scheme, "float32", "int8") if (scheme, part) == ("int4", "lm_head") else (scheme, "float32")
        if getattr(config, part) not in allowed:
            raise QuantizeError(
                f"{part} must be {' or '.join(allowed)} for the {scheme} scheme, not {getattr(config, part)!r}"
            )
    if config.scheme == "int4" and config.block_size is None:
        raise QuantizeError("int4 is block-wise: it needs a block size")
    if config.scheme == "int8" and config.embedding != "float32":
        # quantize_dynamic's Gather gets one scale for the whole table; ORT's block-wise Gather is 4-bit only.
        raise QuantizeError("the int8 scheme keeps the embedding float32")
    return config
