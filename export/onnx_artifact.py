"""What both writers of ONNX artifacts share: the export from a checkpoint (``export.onnx_export``) and
the quantization of an existing artifact (``export.quantize_artifact``).

Kept apart so that neither imports the other for it (``onnx_export`` hands ``--quantize`` on an
artifact to ``quantize_artifact``). No torch or ONNX import here.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from cpm_infer.artifact import Manifest
from cpm_infer.errors import CpmError
from export.validate import ValidationReport

PROTOBUF_LIMIT = 2 * 1024**3  # a single ONNX protobuf cannot exceed 2 GB
TOOLS = ("cpm-infer", "torch", "transformers", "onnx", "onnxruntime", "onnxscript")

Progress = Callable[[str], None]


class ExportError(CpmError):
    """The export cannot start or cannot finish (nothing is written)."""


@dataclass
class ExportResult:
    path: Path
    manifest: Manifest
    reports: list[ValidationReport]
