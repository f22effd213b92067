"""The bundled demo model (cpm_infer/demo/sanguo): present, small, loadable, writes 三国演义-like text."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from typer.testing import CliRunner

from cpm_infer.demo import DEMO_DIR, demo_model_dir

FILES = ("config.json", "model.safetensors", "generation_config.json", "spiece.model", "README.md")
WORDS = ("曹操", "玄德", "孔明", "关公", "云长", "张飞", "孙权", "曰", "兵", "将军", "丞相", "却说")


@pytest.fixture(scope="module")
def demo() -> Path:
    path = demo_model_dir()
    if path is None:
        pytest.skip(
            f"the demo model is not installed at {DEMO_DIR} (build it with python -m trainer.recipes.demo_sanguo)"
        )
    return path


def test_demo_files_and_size(demo: Path) -> None:
    for name in FILES:
        assert (demo / name).is_file(), name
    assert (demo / "model.safetensors").stat().st_size <= 25 * 2**20
    card = (demo / "README.md").read_text(encoding="utf-8")
    assert re.search(r"perplexity \*\*\d+(\.\d+)?\*\*", card), "the model card records the held-out perplexity"


def test_demo_loads_and_generates_sanguo_like_text(demo: Path) -> None:
    from cpm_infer.backends import load_backend
    from cpm_infer.config import GenerationConfig
    from cpm_infer.engine.generate import generate
    from cpm_infer.prompts import plain_prompt

    backend, tok = load_backend("torch", demo)
    assert backend.spec.vocab_size == tok.vocab_size
    config = GenerationConfig(max_new_tokens=40, temperature=0, repetition_penalty=1.2)
    (result,) = generate(backend, [plain_prompt(tok, "却说曹操")], config, tok)
    text = result.text
    assert len(text) >= 10 and "\u2047" not in text  # no <unk> surface
    cjk = sum("\u4e00" <= ch <= "\u9fff" for ch in text)
    assert cjk >= 0.6 * len(text.replace("\n", "")), text
    assert any(word in text for word in WORDS), text


def test_cpm_generate_defaults_to_the_demo(demo: Path) -> None:
    from cpm_infer.cli.app import app

    result = CliRunner().invoke(app, ["generate", "-p", "话说天下大势", "-n", "12", "--temperature", "0"])
    assert result.exit_code == 0, result.output
    assert result.output.strip()
