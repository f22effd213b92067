"""``--quantize int8|int4``: read fewer weight bytes per token (fp32 CPU decoding is memory-bound).

Schemes (ONNX Runtime, CPU provider), applied to the float32 graph the export validated:

- ``int8``: weight-only 8-bit ``com.microsoft.MatMulNBits``, a scale per ``block_size`` (32) input rows as
  llama.cpp's q8_0, activations quantized per block inside (``accuracy_level`` 4). ``per_channel``
  (``--per-channel``): ``onnxruntime.quantization``'s dynamic quantization instead, weights int8 per output
  channel (MatMulInteger / DynamicQuantizeMatMul, activations quantized per tensor per call): faster, further
  from float32.
- ``int4``: weight-only 4-bit ``com.microsoft.MatMulNBits`` (``matmul_nbits_quantizer``), blocks of
  ``block_size`` input rows with their own scale, ``accuracy_level`` 4 (int8 activations inside).

Both run node by node with bounded memory (``export.quantize_graph``).

The tied LM head: the export writes it as ``Gemm(x, wte, transB=1)`` sharing ``wte`` with the embedding
``Gather``. Neither quantizer handles Gemm, and it is a fifth of CPM-small's bytes, so
``quantize_graph.untie_lm_head``
gives it a transposed copy of ``wte`` as a plain MatMul that the quantizer then takes like any other.
The embedding Gather reads one row per token (no bandwidth cost) and stays float32 unless the config
says otherwise. Which of these each scheme does was decided from measurements (see ``CONFIGS`` and
the README); every choice is written to the manifest's ``details.quantization``.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

from cpm_infer.config import ModelSpec
from cpm_infer.errors import CpmError

log = logging.getLogger(__name__)

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


@dataclass(frozen=True)
class QuantizeOptions:
    """What the user asked for: the scheme and its quality gate."""

    scheme: str
    gate_file: Path | None = None
    gate_threshold: float | None = None  # None: the scheme's default (quality_gate.THRESHOLDS)
    force_quality: bool = False
    block_size: int | None = None  # weights per scale (None: the scheme's default)
    lm_head: str | None = None  # "float32" unquantized, "int8" (int4 only) 8-bit; None: quantized like the rest
    per_channel: bool = False  # int8: a scale per output column and dynamic activations instead of blocks

    def config(self) -> QuantConfig:
        """The scheme's configuration with what the user changed (refused where it does not apply)."""
        overrides: dict[str, Any] = {}
        if self.per_channel:
            if self.scheme != "int8":
                raise QuantizeError(f"--per-channel applies to int8, not {self.scheme}")
            if self.block_size is not None:
                raise QuantizeError("--per-channel and --block-size exclude each other")
            overrides["block_size"] = None
        if self.block_size is not None:
            if self.block_size < 16 or self.block_size & (self.block_size - 1):
                raise QuantizeError(f"--block-size must be a power of two >= 16, got {self.block_size}")
            overrides["block_size"] = self.block_size
        if self.lm_head is not None:
            if self.lm_head not in ("float32", "int8", "quantized"):
                raise QuantizeError(f"--lm-head must be float32, int8 or quantized, got {self.lm_head!r}")
            overrides["lm_head"] = self.scheme if self.lm_head == "quantized" else self.lm_head
        return config_for(self.scheme, **overrides)


def check_request(model_dir: str | os.PathLike[str], options: QuantizeOptions, *, fp16: bool, device: str) -> None:
    """Refuse what cannot be quantized before any work: fp16, GPU, an already-quantized artifact."""
    options.config()
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


def quantization_details(directory: str | os.PathLike[str]) -> dict[str, Any] | None:
    """``details.quantization`` of an artifact directory's manifest, None for anything not quantized."""
    path = Path(directory) / "manifest.json"
    if not path.is_file():
        return None
    from cpm_infer.artifact import read_json

    data = read_json(path)
    details = data.get("details") if isinstance(data, dict) else None
    quantization = details.get("quantization") if isinstance(details, dict) else None
    return quantization if isinstance(quantization, dict) else None


def quantized_scheme(directory: str | os.PathLike[str]) -> str | None:
    """The scheme of a quantized artifact directory, None for anything else."""
    quantization = quantization_details(directory)
    return None if quantization is None else str(quantization.get("scheme", "quantized"))


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
    from export.quantize_graph import quantize_graph

    config = options.config()
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
    files = {"model": target}  # its data file, target.data, is kept or packed by onnx_weights.finish_layout
    details = {
        **config.to_dict(),
        **info,
        "source_graph": f"{source} (float32, validated against eager; not shipped)",
        "gate": gate.to_dict(),
    }
    return files, details
