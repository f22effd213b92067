"""``--quantize int8|int4``: read fewer weight bytes per token (fp32 CPU decoding is memory-bound).

Schemes (ONNX Runtime, CPU provider), applied to the float32 graph the export validated:

- ``int8``: weight-only 8-bit ``com.microsoft.MatMulNBits``, a scale and a zero point per ``block_size`` (64) input
  rows from ORT's k-quant search, the LM head in symmetric blocks of ``lm_head_block_size`` (32) as llama.cpp's
  q8_0; activations quantized per block inside (``accuracy_level`` 4). ``per_channel``
  (``--per-channel``): ``onnxruntime.quantization``'s dynamic quantization instead, weights int8 per output
  channel (MatMulInteger / DynamicQuantizeMatMul, activations quantized per tensor per call): faster, further
  from float32.
- ``int4``: weight-only ``com.microsoft.MatMulNBits`` (``matmul_nbits_quantizer``), mixed precision per matrix
  as llama.cpp's q4_K_M: 4-bit blocks of ``block_size`` (128) input rows with their own scale for the body, the
  most sensitive matrices at 8 bits (blocks of ``int8_block_size``, 128): the LM head and the first block
  (``int8_matrices``); the embedding float32; ``accuracy_level`` 4 (int8 activations inside). ``--fast`` keeps
  the former default, every matrix and the embedding (``GatherBlockQuantized``) at 4 bits: fewer bytes per
  token, further from float32.
  Zero points (asymmetric blocks) and ORT's k-quant search of scales and minimums are options of the config
  (``QuantConfig.symmetric``, ``algorithm``).

Both run node by node with bounded memory (``export.quantize_graph``).

The tied LM head: the export writes it as ``Gemm(x, wte, transB=1)`` sharing ``wte`` with the embedding
``Gather``. Neither quantizer handles Gemm, and it is a fifth of CPM-small's bytes, so
``quantize_graph.untie_lm_head``
gives it a transposed copy of ``wte`` as a plain MatMul that the quantizer then takes like any other.
The embedding Gather reads one row per token (no bandwidth cost) and stays float32 unless the config
says otherwise. Which of these each scheme does was decided from measurements (see ``CONFIGS`` in
``export.quant_config``, and ``benchmarks/results/quant-search-*``); every choice, and what each matrix became,
is written to the manifest's ``details.quantization``.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cpm_infer.config import ModelSpec
from export.quality_gate import run_gate
from export.quant_config import (  # noqa: F401 (re-exported: the peer scripts import them from here)
    CONFIGS,
    LM_HEAD_INT8_BLOCK,
    SCHEMES,
    QuantConfig,
    QuantizeError,
    config_for,
)
from export.quantize_graph import quantize_graph

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class QuantizeOptions:
    """What the user asked for: the scheme, its recipe and what the user changed in it, and the quality gate."""

    scheme: str
    gate_file: Path | None = None
    gate_threshold: float | None = None  # None: the scheme's default (quality_gate.THRESHOLDS)
    force_quality: bool = False
    block_size: int | None = None  # weights per scale (None: the scheme's default)
    lm_head: str | None = None  # "float32", "int8" (int4 only) or "quantized" (like the rest); None: the recipe's
    per_channel: bool = False  # int8: a scale per output column and dynamic activations instead of blocks
    fast: bool = False  # int4: the former default recipe (RECIPES), faster and further from float32
    int8_matrices: tuple[str, ...] | None = None  # int4: block matrices at 8 bits (None: the recipe's)
    gate_kl_threshold: float | None = None  # None: the scheme's default (quant_kl.KL_THRESHOLDS)

    def config(self) -> QuantConfig:
        """The scheme's configuration with what the user changed (refused where it does not apply)."""
        overrides: dict[str, Any] = {}
        if self.per_channel:
            if self.scheme != "int8":
                raise QuantizeError(f"--per-channel applies to int8, not {self.scheme}")
            if self.block_size is not None:
                raise QuantizeError("--per-channel and --block-size exclude each other")
            # quantize_dynamic: no blocks, so none of the block recipe's settings
            overrides.update(block_size=None, symmetric=True, algorithm="rtn", lm_head_block_size=None)
        if self.fast and self.scheme != "int4":
            raise QuantizeError(f"--fast applies to int4 (int8's faster scheme is --per-channel), not {self.scheme}")
        if self.int8_matrices is not None:
            if self.scheme != "int4":
                raise QuantizeError(f"--int8-matrices applies to int4, not {self.scheme}")
            overrides["int8_matrices"] = tuple(self.int8_matrices)
        if self.block_size is not None:
            if self.block_size < 16 or self.block_size & (self.block_size - 1):
                raise QuantizeError(f"--block-size must be a power of two >= 16, got {self.block_size}")
            overrides["block_size"] = self.block_size
        if self.lm_head is not None:
            if self.lm_head not in ("float32", "int8", "quantized"):
                raise QuantizeError(f"--lm-head must be float32, int8 or quantized, got {self.lm_head!r}")
            overrides["lm_head"] = self.scheme if self.lm_head == "quantized" else self.lm_head
            if self.scheme == "int8" and self.lm_head != "int8":  # int8's "int8": its default 8-bit head
                overrides["lm_head_block_size"] = None
        return config_for(self.scheme, "fast" if self.fast else "default", **overrides)


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

    config = options.config()
    source = graph_files["model"]
    fp32_graph = (source_dir or directory) / source
    target = f"model_{options.scheme}.onnx"
    say(f"quantizing {source} to {options.scheme}")
    info = quantize_graph(fp32_graph, directory / target, spec, config, say=say)
    gate = run_gate(
        fp32_graph,
        directory / target,
        spec,
        tokenizer,
        scheme=options.scheme,
        gate_file=options.gate_file,
        threshold=options.gate_threshold,
        kl_threshold=options.gate_kl_threshold,
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
