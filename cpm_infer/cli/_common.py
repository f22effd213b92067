"""Helpers shared by CLI commands."""

from __future__ import annotations

from pathlib import Path

from cpm_infer.errors import CpmError


def resolve_model(model: Path | None) -> Path:
    """The given model path, or the bundled demo model when none is given."""
    if model is not None:
        return model
    from cpm_infer.demo import demo_model_dir

    path = demo_model_dir()
    if path is None:
        raise CpmError("no --model given and the bundled demo model is not installed")
    return path
