"""Backends by name. Each loader is imported only when asked for, so the CLI starts without torch,
onnxruntime or tensorrt."""

from __future__ import annotations

import importlib
import json
import os
from pathlib import Path

from cpm_infer.backends.base import Backend, Loader
from cpm_infer.devices import Device
from cpm_infer.errors import CpmError
from cpm_infer.tokenizer import CpmTokenizer

# name -> "module:function" naming a base.Loader (imported only when that backend is asked for)
LOADERS: dict[str, str] = {
    "torch": "cpm_infer.backends.torch_backend:load",
    "ort": "cpm_infer.backends.ort_backend:load",
    "trt": "cpm_infer.backends.trt.backend:load",
}
MANIFEST = "manifest.json"
_FORMAT_TO_BACKEND = {"onnx": "ort", "tensorrt": "trt"}


class BackendError(CpmError):
    """Unknown backend, or a model path that the backend cannot serve."""


def detect_backend(path: str | os.PathLike[str]) -> str:
    """``torch`` for a checkpoint directory, the artifact's runtime for an exported artifact."""
    directory = Path(path)
    manifest = directory / MANIFEST
    if manifest.is_file():
        try:
            fmt = json.loads(manifest.read_text(encoding="utf-8")).get("format")
        except (OSError, ValueError, AttributeError) as exc:
            raise BackendError(f"cannot read {manifest}: {exc}") from exc
        if fmt not in _FORMAT_TO_BACKEND:
            raise BackendError(f"{manifest} names an unknown artifact format {fmt!r}")
        return _FORMAT_TO_BACKEND[fmt]
    if (directory / "config.json").is_file():
        return "torch"
    if not directory.exists():
        raise BackendError(f"model path not found: {directory}")
    raise BackendError(f"{directory} is neither a checkpoint (config.json) nor an exported artifact ({MANIFEST})")


def load_backend(
    name: str,
    path: str | os.PathLike[str],
    *,
    device: str | Device = "cpu",
    tokenizer_file: str | os.PathLike[str] | None = None,
    threads: int | None = None,
) -> tuple[Backend, CpmTokenizer]:
    """Open ``path`` with backend ``name`` (``auto`` picks from the directory's contents) on ``device``
    (``auto`` = the GPU when that backend has one, see ``cpm_infer.devices``)."""
    if name == "auto":
        name = detect_backend(path)
    return get_loader(name)(Path(path), device=device, tokenizer_file=tokenizer_file, threads=threads)


def get_loader(name: str) -> Loader:
    """The loader function of backend ``name`` (one of ``LOADERS``), imported now."""
    if name not in LOADERS:
        raise BackendError(f"unknown backend {name!r}; choose one of auto, {', '.join(LOADERS)}")
    module_name, func = LOADERS[name].split(":")
    return getattr(importlib.import_module(module_name), func)
