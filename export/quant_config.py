"""The quantization schemes' settings (``QuantConfig``, ``CONFIGS``): the names ``export.quantize`` (the
user's options, the export step) and ``export.quantize_graph`` (the node-by-node quantizer) share.

A config says, for every weight matrix of the graph, how it is quantized (``QuantConfig.precision``): the
four matrices of each block by their GPT-2 names (``MATRIX_TYPES``), the LM head and the embedding.
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass, field, replace
from typing import Any

from cpm_infer.errors import CpmError

SCHEMES = ("int8", "int4")
ALGORITHMS = ("rtn", "k_quant")
# The exporter's weight names (export.gpt2) -> GPT-2's names of the four matrices of a block.
MATRIX_TYPES = {"attn_w": "attn.c_attn", "proj_w": "attn.c_proj", "fc_w": "mlp.c_fc", "mlp_proj_w": "mlp.c_proj"}
LM_HEAD, EMBEDDING = "lm_head", "embedding"
INT8_BLOCK = 32  # 8-bit MatMulNBits blocks: the int8 scheme's, and an int4 artifact's 8-bit matrices (q8_0's)
LM_HEAD_INT8_BLOCK = INT8_BLOCK
_WEIGHT = re.compile(r"blocks\.(\d+)\.(" + "|".join(MATRIX_TYPES) + r")")
_LAYER = re.compile(r"h\.(\d+)(?:\.(.+))?")


class QuantizeError(CpmError):
    """The graph cannot be quantized as asked (wrong source, unknown scheme, quantizer failure)."""


def matrix_of(weight: str) -> tuple[str, int] | None:
    """(matrix type, layer) of a block's weight by its name in the exported graph, None for any other."""
    match = _WEIGHT.fullmatch(weight)
    return None if match is None else (MATRIX_TYPES[match.group(2)], int(match.group(1)))


def parse_selector(text: str) -> tuple[str | None, int | None]:
    """(matrix type or None, layer or None) of a set of block matrices: "mlp.c_proj" (every layer's), "h.3" (all
    four of layer 3), "h.3.mlp.c_proj"."""
    match = _LAYER.fullmatch(text)
    kind, layer = (match.group(2), int(match.group(1))) if match else (text, None)
    if kind is not None and kind not in MATRIX_TYPES.values():
        types = ", ".join(MATRIX_TYPES.values())
        raise QuantizeError(f"unknown matrix selector {text!r}: use a matrix type ({types}), h.N or h.N.TYPE")
    return kind, layer


def _selected(selectors: tuple[str, ...], matrix: str, layer: int | None) -> bool:
    for selector in selectors:
        kind, index = parse_selector(selector)
        if (kind is None or kind == matrix) and (index is None or index == layer):
            return True
    return False


@dataclass(frozen=True)
class Precision:
    """How one weight matrix is stored: ``bits`` 4 or 8 in MatMulNBits blocks of ``block_size`` input rows
    (None: int8 per output channel, MatMulInteger), with or without zero points, scales from ``algorithm``
    ("rtn": round to nearest over each block's range, "k_quant": llama.cpp's k-quant search of scale and
    minimum, weighted by magnitude)."""

    bits: int
    block_size: int | None
    zero_points: bool
    algorithm: str = "rtn"

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class QuantConfig:
    """What one scheme does. ``lm_head``/``embedding``: quantized with the scheme, or "float32"; the int4
    scheme's LM head may also be "int8" (8-bit blocks of ``INT8_BLOCK``, as llama.cpp keeps the output matrix
    of q4_0 files at 6 bits). ``int8_matrices`` (int4) / ``float32_matrices``: block matrices (selectors of
    ``parse_selector``) kept at 8 bits in blocks of ``INT8_BLOCK`` / left float32, as llama.cpp's q4_K_M keeps
    its most sensitive matrices at 6 bits."""

    scheme: str
    lm_head: str
    embedding: str
    per_channel: bool = True  # int8: one scale per output column
    reduce_range: bool = False  # int8: 7-bit weights (avoids u8s8 saturation on AVX2 without VNNI)
    weight_type: str = "QInt8"  # int8
    block_size: int | None = 128  # MatMulNBits blocks; None (int8 only): per-channel dynamic quantization
    symmetric: bool = True  # MatMulNBits: no zero points
    accuracy_level: int = 4  # MatMulNBits: int8 compute inside (activations quantized per block)
    algorithm: str = "rtn"  # MatMulNBits scales: "rtn" (DefaultWeightOnlyQuantizer) or "k_quant" (zero points)
    int8_matrices: tuple[str, ...] = ()  # int4: block matrices at 8 bits
    float32_matrices: tuple[str, ...] = field(default=())  # block matrices left unquantized
    int8_block_size: int = INT8_BLOCK  # int4: blocks of its 8-bit matrices (LM head "int8", int8_matrices)
    lm_head_block_size: int | None = None  # int8: the LM head in symmetric round-to-nearest blocks of this size
    recipe: str = "default"  # the name of the scheme's recipe this config started from (RECIPES)

    @property
    def bits(self) -> int:
        return 4 if self.scheme == "int4" else 8

    @property
    def block_wise(self) -> bool:
        """MatMulNBits (int4, or int8 with a block size) rather than quantize_dynamic's MatMulInteger."""
        return self.block_size is not None

    def precision(self, matrix: str, layer: int | None = None) -> Precision | None:
        """How ``matrix`` (a ``MATRIX_TYPES`` value of ``layer``, ``LM_HEAD`` or ``EMBEDDING``) is quantized,
        None where it stays float32. A MatMul weight the exporter did not name is a block matrix of no layer."""
        body = Precision(self.bits, self.block_size, not self.symmetric, self.algorithm)
        if matrix == EMBEDDING:  # GatherBlockQuantized: 4-bit round to nearest
            return None if self.embedding == "float32" else replace(body, algorithm="rtn")
        if matrix == LM_HEAD:
            if self.lm_head == "float32":
                return None
            if self.scheme == "int4":
                return self._int8 if self.lm_head == "int8" else body
            return body if self.lm_head_block_size is None else Precision(8, self.lm_head_block_size, False)
        if _selected(self.float32_matrices, matrix, layer):
            return None
        if self.scheme == "int4" and _selected(self.int8_matrices, matrix, layer):
            return self._int8
        return body

    @property
    def _int8(self) -> Precision:
        """An int4 artifact's 8-bit matrices: round to nearest, symmetric (the int8 scheme's, llama.cpp q8_0's)."""
        return Precision(8, self.int8_block_size, zero_points=False)

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["int8_matrices"], data["float32_matrices"] = list(self.int8_matrices), list(self.float32_matrices)
        if self.lm_head_block_size is None:
            data.pop("lm_head_block_size")
        if self.scheme == "int4" and self.lm_head == "int8":
            data["lm_head_block_size"] = self.int8_block_size
        if self.scheme != "int4" or not (self.lm_head == "int8" or self.int8_matrices):
            data.pop("int8_block_size")
        if not self.block_wise:
            for key in ("block_size", "symmetric", "accuracy_level", "algorithm"):
                data.pop(key)
            data["method"] = (
                "onnxruntime.quantization.quantize_dynamic (MatMulInteger, activations uint8 per tensor per call)"
            )
        else:
            for key in ("per_channel", "reduce_range", "weight_type"):
                data.pop(key)
            bits = (
                "bits 4 and 8"
                if self.scheme == "int4" and (self.int8_matrices or self.lm_head == "int8")
                else (f"bits {self.bits}")
            )
            quantizer = (
                "k-quant: onnxruntime.quantization.neural_compressor.weight_only.quant_tensor_k_quant_cpu, "
                "as matmul_nbits_quantizer with KQuantWeightOnlyQuantConfig"
                if self.algorithm == "k_quant"
                else "onnxruntime.quantization.matmul_nbits_quantizer"
            )
            data["method"] = f"{quantizer} (com.microsoft.MatMulNBits, {bits})"
        return data


# Decided from measurements (README: quantization table; CPM-small-shape decode on 2 AVX2 cores, batch 1,
# and held-out perplexity of the demo model on its chapter 60):
# - int8 in blocks (MatMulNBits), not per channel: the per-channel scheme's next-token KL from float32 was 4.0x
#   llama.cpp q8_0's on the demo model's held-out chapter (per-tensor activations), symmetric blocks of 32 0.85x
#   (benchmarks/results/peers-llamacpp-native-recipes-intel-xeon-2c). Per channel stays available (--per-channel).
# - int8 body in k-quant blocks of 64 with zero points, the LM head in q8_0's symmetric blocks of 32: blocks of 64
#   are faster than 32 at every row count (nbits_kernels.json of the peer results), but round to nearest in 64s is
#   1.05x q8_0's KL and k-quant in 64s with the head too 0.99x (benchmarks/results/peers-llamacpp-native-int8-blocks-
#   intel-xeon-2c); the head in 32s brings it to 0.94x, decoding CPM-small in 0.93x the time of symmetric blocks of
#   32 throughout (the former default, 0.85x q8_0's KL, the peer script's ours-int8-b32; same run:
#   benchmarks/results/peers-llamacpp-native-intel-xeon-2c).
# - LM head quantized in both: it is the largest matrix (30000x768), and keeping it float32 made a decode
#   step 19-28% slower for int8 (7.7-8.9 -> 9.9-10.6 ms) and 64-113% slower for int4 (4.7-5.1 -> 8.4-10.1
#   ms), for at most 0.07% perplexity.
# - int8 per channel, reduce_range: AVX2 without VNNI multiplies u8 x s8 pairs into saturating int16;
#   7-bit weights avoid that. On the demo models the two differ by under 0.1% perplexity either way.
# - int8 embedding: quantize_dynamic's Gather gets one scale for the whole table, so it stays float32.
# - int4 (benchmarks/results/quant-search-intel-xeon-2c: mean next-token KL from float32 eager on the demo
#   model's held-out chapter; llama.cpp q4_K_M 4.6e-4): the former default (every matrix and the embedding at
#   4 bits, symmetric blocks of 128; now --fast) measured 6.1e-3. One part at 4 bits, the rest float32: the LM
#   head 3.2e-3, the embedding 2.3e-3, the first block 5.2e-4, each other block 2-3e-5. So the default keeps the
#   embedding float32 (one row read per token: size, not speed), the LM head and the first block at 8 bits and
#   the rest at 4 bits, all in symmetric blocks of 128: KL 1.3e-4, the least decode work of the recipes under
#   q4_K_M's KL: 69.5 MiB read per CPM-small decode step (former default 55.2), 1.07-1.09x the former default's
#   CPU time per step in two runs (8-bit blocks of 32: KL 1.1e-4, 72.2 MiB, 1.13-1.25x). With the head and
#   the first block at 8 bits, zero points (asymmetric round to nearest 9.4e-5) and k-quant (1.0-1.2e-4) gain
#   little and cost decode work; an 8-bit head alone (4-bit first block) is 6.2e-4 at 128-blocks and reaches
#   4.5e-4 only with k-quant blocks of 64 (71.4 MiB, 1.22-1.28x). No 4-bit LM head met the KL: the 8-bit head
#   is the price of the new default.
CONFIGS = {
    "int8": QuantConfig(
        "int8",
        lm_head="int8",
        embedding="float32",
        reduce_range=True,
        block_size=64,
        symmetric=False,
        algorithm="k_quant",
        lm_head_block_size=INT8_BLOCK,
    ),
    "int4": QuantConfig("int4", lm_head="int8", embedding="float32", int8_matrices=("h.0",), int8_block_size=128),
}
# Other recipes of a scheme, one flag away (``--fast``).
RECIPES = {("int4", "fast"): QuantConfig("int4", lm_head="int4", embedding="int4", recipe="fast")}


def config_for(scheme: str, recipe: str = "default", **overrides: Any) -> QuantConfig:
    """The scheme's recipe with ``overrides``, refused where a setting does not apply."""
    if scheme not in CONFIGS:
        raise QuantizeError(f"unknown quantization scheme {scheme!r}; use {' or '.join(SCHEMES)}")
    if recipe != "default" and (scheme, recipe) not in RECIPES:
        known = ", ".join(name for s, name in RECIPES if s == scheme) or "none"
        raise QuantizeError(f"the {scheme} scheme has no recipe {recipe!r} (others than its default: {known})")
    base = CONFIGS[scheme] if recipe == "default" else RECIPES[(scheme, recipe)]
    for key in ("int8_matrices", "float32_matrices"):
        if key in overrides:
            overrides[key] = tuple(overrides[key])
    config = replace(base, **overrides)
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
    if config.algorithm not in ALGORITHMS:
        raise QuantizeError(f"unknown algorithm {config.algorithm!r}; use {' or '.join(ALGORITHMS)}")
    if config.algorithm == "k_quant":
        if config.block_size is None:
            raise QuantizeError("k-quant applies to block-wise quantization (MatMulNBits): it needs a block size")
        if config.symmetric:
            raise QuantizeError("k-quant searches a scale and a minimum per block: it needs zero points (asymmetric)")
    if config.lm_head_block_size is not None and (config.scheme != "int8" or not config.block_wise):
        raise QuantizeError("a block size of its own for the LM head applies to int8 in blocks (int4: int8_block_size)")
    if config.int8_matrices and config.scheme != "int4":
        raise QuantizeError("8-bit matrices apply to int4 (the int8 scheme is 8-bit throughout)")
    for selector in (*config.int8_matrices, *config.float32_matrices):
        parse_selector(selector)
    for size in (config.block_size, config.int8_block_size, config.lm_head_block_size):
        if size is not None and (size < 16 or size & (size - 1)):
            raise QuantizeError(f"block sizes must be powers of two >= 16, got {size}")
    return config
