"""Shared fixtures: tiny tokenizers and models built on the fly (no network, no downloads)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SHARED_VOCAB_DIR = Path(os.environ.get("CPM_VOCAB_DIR", ROOT.parent / "shared" / "cpm-vocab"))

# Public-domain text (三国演义, chapter 1) to train a tiny SentencePiece model on.
CORPUS = """滚滚长江东逝水，浪花淘尽英雄。是非成败转头空。青山依旧在，几度夕阳红。
白发渔樵江渚上，惯看秋月春风。一壶浊酒喜相逢。古今多少事，都付笑谈中。
话说天下大势，分久必合，合久必分。周末七国分争，并入于秦。及秦灭之后，楚、汉分争，又并入于汉。
汉朝自高祖斩白蛇而起义，一统天下，后来光武中兴，传至献帝，遂分为三国。
推其致乱之由，殆始于桓、灵二帝。桓帝禁锢善类，崇信宦官。及桓帝崩，灵帝即位，大将军窦武、太傅陈蕃共相辅佐。
时有宦官曹节等弄权，窦武、陈蕃谋诛之，机事不密，反为所害，中涓自此愈横。
建宁二年四月望日，帝御温德殿。方升座，殿角狂风骤起。只见一条大青蛇，从梁上飞将下来，蟠于椅上。
帝惊倒，左右急救入宫，百官俱奔避。须臾，蛇不见了。忽然大雷大雨，加以冰雹，落到半夜方止，坏却房屋无数。
Hello world 123 abc, the quick brown fox.
"""


def _hypothesis_profile() -> None:
    """No per-example deadline (hypothesis' default 200 ms fails examples that run real models on a busy
    machine) and no too-slow health check (generating examples is slow there too); everything else as hypothesis
    has it, and a test's own @settings still wins."""
    try:
        from hypothesis import HealthCheck, settings
    except ImportError:  # only the property tests need it
        return
    settings.register_profile("cpm", deadline=None, suppress_health_check=[HealthCheck.too_slow])
    settings.load_profile("cpm")


def pytest_configure(config: pytest.Config) -> None:
    _hypothesis_profile()
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    # Ray clusters the tests start stay on loopback (Ray reads this once, on import; their processes inherit it).
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")


@pytest.fixture(scope="session")
def shared_vocab() -> Path:
    """The real CPM vocabulary (../shared/cpm-vocab), or skip."""
    path = SHARED_VOCAB_DIR / "chinese_vocab.model"
    if not path.is_file():
        pytest.skip(f"real CPM vocabulary not found at {path} (set CPM_VOCAB_DIR to its folder)")
    return path


@pytest.fixture(scope="session")
def tiny_vocab(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny CPM-style SentencePiece model (has <unk> <sep> <pad> <eod>, ▂ and ▃)."""
    import sentencepiece as spm

    out = tmp_path_factory.mktemp("vocab")
    corpus = out / "corpus.txt"
    lines = [line.replace(" ", "\u2582") for line in CORPUS.strip().splitlines()]
    corpus.write_text("\n".join(lines * 4) + "\n", encoding="utf-8")
    spm.SentencePieceTrainer.Train(
        input=str(corpus),
        model_prefix=str(out / "tiny"),
        vocab_size=300,
        model_type="unigram",
        character_coverage=1.0,
        hard_vocab_limit=False,
        control_symbols=["<sep>", "<pad>"],
        user_defined_symbols=["<eod>", "\u2582", "\u2583"],
        minloglevel=2,
    )
    return out / "tiny.model"


def make_tiny_model(
    vocab_size: int,
    *,
    seed: int = 0,
    n_layer: int = 2,
    n_head: int = 4,
    n_embd: int = 32,
    n_positions: int = 128,
    eod_id: int = 7,
    pad_id: int = 5,
):
    """A random GPT-2 with a wide init (0.3) so its greedy output varies instead of repeating one token."""
    import torch
    import transformers

    from cpm_infer.config import ModelSpec
    from cpm_infer.torch_model import hf_config

    spec = ModelSpec(n_layer=n_layer, n_head=n_head, n_embd=n_embd, vocab_size=vocab_size, n_positions=n_positions)
    torch.manual_seed(seed)
    config = hf_config(spec, eod_id, pad_id, base={"initializer_range": 0.3})
    return transformers.GPT2LMHeadModel(config).eval()


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory: pytest.TempPathFactory, tiny_vocab: Path) -> Path:
    """A saved tiny checkpoint (HF format, safetensors, tokenizer as spiece.model)."""
    from cpm_infer.tokenizer import CpmTokenizer
    from cpm_infer.torch_model import save_checkpoint

    tok = CpmTokenizer(tiny_vocab)
    model = make_tiny_model(tok.vocab_size, eod_id=tok.eod_id, pad_id=tok.pad_id)
    return save_checkpoint(model, tiny_vocab, tmp_path_factory.mktemp("ckpt") / "tiny")


def run_cli(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture, *args: str) -> tuple[int, str, str]:
    """``cpm ARGS`` through the real entry point (one-line errors, exit codes): (code, stdout, stderr)."""
    import sys

    from cpm_infer.cli.app import main

    monkeypatch.setattr(sys, "argv", ["cpm", *args])
    monkeypatch.delenv("CPM_DEBUG", raising=False)
    try:
        main()
        code = 0
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture(autouse=True)
def _shared_ort_pool_ends_with_the_test():
    """The ``cpm`` entry point (``run_cli``) allows onnxruntime's process-wide thread pool (``cpm_infer.ort_pool``):
    in this one test process that permission would carry over and bind later tests' sessions to the pool, so it
    ends with the test that ran ``main()``."""
    yield
    from cpm_infer import ort_pool

    ort_pool._pool.pop("allowed", None)
