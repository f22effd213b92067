"""The manifest of an exported artifact directory (``manifest.json``), for any runtime format.

An artifact is a self-contained directory: graph file(s) or engine(s), the tokenizer file and this
manifest, which says what the graph is (model spec, KV-contract IO names and dynamic axes, dtype),
where it came from (sha256 of the source weights, tool versions), how to generate with it, and where
its validation report lies. ONNX and TensorRT artifacts share this layout; what only one format
needs (the ONNX opset, TensorRT profiles) goes in ``details``.

Imports neither torch nor any runtime: servers read manifests with only numpy installed.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterable
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

from cpm_infer import kv
from cpm_infer.config import ConfigError, ModelSpec
from cpm_infer.errors import CpmError

MANIFEST = "manifest.json"
SCHEMA_VERSION = 1
FORMATS = ("onnx", "tensorrt")
DTYPES = ("float32", "float16")


class ManifestError(CpmError):
    """A manifest is missing, unreadable, inconsistent, or does not match its graph."""


@dataclass
class Manifest:
    """What ``manifest.json`` holds. ``graph_files`` maps a role to a file inside the artifact:
    ``model`` is what the runtime loads; other roles (``portable``: the graph before ORT-only
    fusions, ``weights``: external data) are kept for tools that need them."""

    format: str
    spec: ModelSpec
    dtype: str  # of the weights and of the past/present tensors; logits are always float32
    graph_files: dict[str, str]
    tokenizer_file: str
    source_sha256: str
    inputs: list[str] = field(default_factory=list)
    outputs: list[str] = field(default_factory=list)
    dynamic_axes: dict[str, dict[int, str]] = field(default_factory=dict)
    tools: dict[str, str] = field(default_factory=dict)
    generation: dict[str, Any] = field(default_factory=dict)
    validation_report: str | None = None
    details: dict[str, Any] = field(default_factory=dict)
    schema_version: int = SCHEMA_VERSION

    def __post_init__(self) -> None:
        # Default IO: the one KV contract (cpm_infer.kv) for this many layers.
        n = self.spec.n_layer
        self.inputs = list(self.inputs) or kv.input_names(n)
        self.outputs = list(self.outputs) or kv.output_names(n)
        self.dynamic_axes = self.dynamic_axes or kv.dynamic_axes(n)

    def check(self) -> None:
        """Raise ManifestError if the fields contradict each other or the KV contract."""
        n = self.spec.n_layer
        if self.format not in FORMATS:
            raise ManifestError(f"manifest format {self.format!r} is not one of {', '.join(FORMATS)}")
        if self.dtype not in DTYPES:
            raise ManifestError(f"manifest dtype {self.dtype!r} is not one of {', '.join(DTYPES)}")
        if "model" not in self.graph_files:
            raise ManifestError('manifest graph_files has no "model" entry')
        # ONNX graphs take logits_to_keep after the KV contract's inputs (those exported before it do not).
        keep = kv.keeps_logits(self.inputs)
        names = kv.graph_input_names(n) if keep else kv.input_names(n)
        if self.inputs != names or self.outputs != kv.output_names(n):
            raise ManifestError(
                f"manifest IO names do not follow the KV contract for {n} layers "
                f"({len(self.inputs)} inputs / {len(self.outputs)} outputs, expected {len(names)} / {1 + 2 * n})"
            )
        if self.dynamic_axes != kv.dynamic_axes(n, keep=keep):
            raise ManifestError("manifest dynamic_axes differ from the KV contract (cpm_infer.kv.dynamic_axes)")

    def to_dict(self) -> dict[str, Any]:
        return {
            "format": self.format,
            "schema_version": self.schema_version,
            "spec": self.spec.to_dict(),
            "dtype": self.dtype,
            "graph_files": dict(self.graph_files),
            "tokenizer_file": self.tokenizer_file,
            "source_sha256": self.source_sha256,
            "inputs": list(self.inputs),
            "outputs": list(self.outputs),
            # JSON keys are strings: axis indices are written as "0", "2" and read back as ints.
            "dynamic_axes": {name: {str(i): d for i, d in axes.items()} for name, axes in self.dynamic_axes.items()},
            "tools": dict(self.tools),
            "generation": dict(self.generation),
            "validation_report": self.validation_report,
            "details": dict(self.details),
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any], where: str = "manifest") -> Manifest:
        if not isinstance(data, dict):
            raise ManifestError(f"{where} does not hold a JSON object")
        version = data.get("schema_version")
        if version != SCHEMA_VERSION:
            raise ManifestError(
                f"{where} has schema_version {version!r}; this cpm-infer reads version {SCHEMA_VERSION}"
            )
        try:
            spec = ModelSpec.from_dict(data["spec"])
            axes = {name: {int(i): str(d) for i, d in dims.items()} for name, dims in data["dynamic_axes"].items()}
            return cls(
                format=str(data["format"]),
                spec=spec,
                dtype=str(data["dtype"]),
                graph_files={str(k): str(v) for k, v in data["graph_files"].items()},
                tokenizer_file=str(data["tokenizer_file"]),
                source_sha256=str(data["source_sha256"]),
                inputs=[str(x) for x in data["inputs"]],
                outputs=[str(x) for x in data["outputs"]],
                dynamic_axes=axes,
                tools=dict(data.get("tools", {})),
                generation=dict(data.get("generation", {})),
                validation_report=data.get("validation_report"),
                details=dict(data.get("details", {})),
            )
        except ConfigError as exc:
            raise ManifestError(f"{where}: {exc}") from exc
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise ManifestError(f"{where} lacks a valid field: {type(exc).__name__} {exc}") from exc


def read_manifest(directory: str | os.PathLike[str], expected_format: str | None = None) -> Manifest:
    """Read and check ``directory/manifest.json``; the files it names must exist."""
    root = Path(directory)
    path = root / MANIFEST
    if not path.is_file():
        raise ManifestError(f"{root} is not an exported artifact: no {MANIFEST}")
    manifest = Manifest.from_dict(read_json(path), str(path))
    try:
        manifest.check()
    except ManifestError as exc:
        raise ManifestError(f"{path}: {exc}") from exc
    if expected_format is not None and manifest.format != expected_format:
        raise ManifestError(f"{path} describes a {manifest.format} artifact, not {expected_format}")
    for name in [*manifest.graph_files.values(), manifest.tokenizer_file]:
        if not (root / name).is_file():
            raise ManifestError(f"{path} names {name}, which is missing from the artifact")
    return manifest


def write_manifest(directory: str | os.PathLike[str], manifest: Manifest) -> Path:
    """Write ``manifest.json`` atomically (temp file + rename) after checking it."""
    manifest.check()
    path = Path(directory) / MANIFEST
    tmp = path.with_name(f".{MANIFEST}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(manifest.to_dict(), indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    os.replace(tmp, path)
    return path


def sha256_files(paths: Iterable[str | os.PathLike[str]]) -> str:
    """One digest over the files' bytes, in order (identical to ``Checkpoint.weights_sha256``)."""
    digest = hashlib.sha256()
    for path in paths:
        with open(path, "rb") as handle:
            for chunk in iter(lambda: handle.read(1 << 20), b""):
                digest.update(chunk)
    return digest.hexdigest()


def tool_versions(packages: Iterable[str]) -> dict[str, str]:
    """Installed versions of ``packages`` (by distribution name), read without importing them."""
    versions = {}
    for name in packages:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return versions


def read_json(path: str | os.PathLike[str], error: type[CpmError] = ManifestError) -> Any:
    """A JSON file of an artifact (e.g. its validation report) or of a checkpoint, with a one-line
    ``error`` ("cannot read PATH: why")."""
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise error(f"cannot read {path}: {exc}") from exc
