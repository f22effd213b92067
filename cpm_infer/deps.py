"""Optional dependencies: import on demand, fail with the extra that provides them."""

from __future__ import annotations

import importlib
from types import ModuleType

from cpm_infer.errors import CpmError


class MissingDependencyError(CpmError):
    """An optional package is not installed."""


def require(module: str, extra: str) -> ModuleType:
    """Import ``module`` or raise a one-line error naming ``pip install 'cpm-infer[extra]'``."""
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise MissingDependencyError(
            f"{module} is not available ({exc}); install it with: pip install 'cpm-infer[{extra}]'"
        ) from exc
