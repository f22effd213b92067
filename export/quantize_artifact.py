"""Quantize an existing float32 ONNX artifact (``cpm export onnx ARTIFACT OUT --quantize ...``), no torch needed.

The same scheme and quality gate as a quantized export from a checkpoint (``export.quantize``); the
float32 graph the artifact holds was validated against eager PyTorch when it was exported.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable
from pathlib import Path

from cpm_infer.artifact import read_manifest, tool_versions, write_manifest
from cpm_infer.atomic import staged_dir
from cpm_infer.tokenizer import CpmTokenizer
from export.onnx_artifact import PROTOBUF_LIMIT, TOOLS, ExportError, ExportResult
from export.onnx_weights import finish_layout
from export.quantize import QuantizeError, QuantizeOptions, apply_quantization, quantized_scheme


def quantize_artifact(
    source: str | os.PathLike[str],
    out_dir: str | os.PathLike[str],
    options: QuantizeOptions,
    *,
    force: bool = False,
    threads: int | None = None,
    progress: Callable[[str], None] | None = None,
) -> ExportResult:
    say = progress or (lambda message: None)
    source, out = Path(source), Path(out_dir)
    scheme = quantized_scheme(source)
    if scheme:
        raise QuantizeError(
            f"{source} is already quantized ({scheme}); quantize its float32 checkpoint or artifact instead"
        )
    manifest = read_manifest(source, expected_format="onnx")
    if manifest.dtype != "float32":
        raise QuantizeError(f"{source} is a {manifest.dtype} artifact; --quantize starts from a float32 one")
    if out.exists() and not force:
        raise ExportError(f"{out} exists; pass --force to replace it")
    if out.resolve() == source.resolve():
        raise ExportError("the quantized artifact must go to another directory than its source")
    tokenizer = CpmTokenizer(source / manifest.tokenizer_file)
    out.parent.mkdir(parents=True, exist_ok=True)
    with staged_dir(out) as tmp:
        graph_files, quantization = apply_quantization(
            tmp,
            dict(manifest.graph_files),
            manifest.spec,
            tokenizer,
            options,
            threads=threads,
            source_dir=source,
            say=say,
        )
        manifest.graph_files = finish_layout(tmp, graph_files, PROTOBUF_LIMIT)
        say("writing artifact")
        shutil.copyfile(source / manifest.tokenizer_file, tmp / manifest.tokenizer_file)
        if manifest.validation_report and (source / manifest.validation_report).is_file():
            shutil.copyfile(source / manifest.validation_report, tmp / manifest.validation_report)
        manifest.details = {
            **manifest.details,
            "quantization": {**quantization, "source_artifact": str(source.resolve())},
        }
        manifest.tools = {**manifest.tools, **tool_versions(TOOLS)}
        write_manifest(tmp, manifest)
    return ExportResult(out, manifest, [])
