"""The bundled demo model (a small CPM-architecture GPT-2 trained on 三国演义; see trainer/recipes)."""

from __future__ import annotations

from pathlib import Path

DEMO_DIR = Path(__file__).resolve().parent / "sanguo"


def demo_model_dir() -> Path | None:
    """The demo checkpoint directory, or None where the package was installed without it."""
    return DEMO_DIR if (DEMO_DIR / "config.json").is_file() else None
