"""`cpm tokenizer train`: CPM's pre-processing and special-piece layout, served by CpmTokenizer."""

from __future__ import annotations

from pathlib import Path

import pytest
from conftest import CORPUS
from typer.testing import CliRunner


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from cpm_infer.cli.app import app

    base = tmp_path_factory.mktemp("spm")
    data = base / "corpus.txt"
    data.write_text(CORPUS * 3, encoding="utf-8")
    out = base / "spiece.model"
    result = CliRunner().invoke(app, ["tokenizer", "train", str(data), "-o", str(out), "--vocab-size", "260"])
    assert result.exit_code == 0, result.output
    return out


def proto(path: Path):
    from sentencepiece import sentencepiece_model_pb2 as pb

    model = pb.ModelProto()
    model.ParseFromString(path.read_bytes())
    return model


def test_special_pieces_follow_cpm(trained: Path) -> None:
    from cpm_infer.tokenizer import CpmTokenizer

    tok = CpmTokenizer(trained)
    model = proto(trained)
    types = {p.piece: p.type for p in model.pieces}
    control, user, unknown = 3, 4, 2  # ModelProto.SentencePiece.Type
    assert tok.unk_id == 0 and types["<unk>"] == unknown
    assert types["<sep>"] == control and types["<pad>"] == control and types["<mask>"] == control
    assert types["<eod>"] == user  # an ordinary piece, as in CPM's vocabulary (not a control symbol)
    assert "\u2582" in types and "\u2583" in types
    assert model.trainer_spec.model_type == 1 and model.normalizer_spec.name == "nmt_nfkc"  # UNIGRAM, like CPM
    assert tok.vocab_size == 260


def test_encoding_applies_cpm_preprocessing(trained: Path) -> None:
    import sentencepiece as spm

    from cpm_infer.tokenizer import CpmTokenizer
    from trainer.sp_train import cpm_pretokenize

    tok = CpmTokenizer(trained)
    text = "话说天下大势，分久必合。\n青山依旧在 几度夕阳红"
    raw = spm.SentencePieceProcessor(model_file=str(trained))
    assert tok.encode(text) == raw.encode(cpm_pretokenize(text))
    assert "\u2583" in cpm_pretokenize(text) and "\u2582" in cpm_pretokenize(text)
    assert tok.decode(tok.encode(text)) == text.replace("，", ",")  # NFKC folds full-width punctuation, as CPM does


def test_layout_matches_the_real_cpm_vocab(trained: Path, shared_vocab: Path) -> None:
    ours, cpm = proto(trained), proto(shared_vocab)
    for field in ("model_type", "unk_id", "bos_id", "eos_id", "pad_id", "unk_piece", "split_by_whitespace"):
        assert getattr(ours.trainer_spec, field) == getattr(cpm.trainer_spec, field), field
    assert ours.normalizer_spec.name == cpm.normalizer_spec.name
    cpm_types = {p.piece: p.type for p in cpm.pieces}
    our_types = {p.piece: p.type for p in ours.pieces}
    for piece in ("<unk>", "<sep>", "<pad>", "<mask>"):
        assert our_types[piece] == cpm_types[piece], piece


def test_bad_tokenizer_requests(tmp_path: Path) -> None:
    from cpm_infer.cli.app import app

    data = tmp_path / "d.txt"
    data.write_text(CORPUS, encoding="utf-8")
    result = CliRunner().invoke(
        app, ["tokenizer", "train", str(data), "-o", str(tmp_path / "x.model"), "--vocab-size", "50000"]
    )
    assert result.exit_code == 1 and "Vocabulary size too high" in str(result.exception)
    assert not (tmp_path / "x.model").exists()
    (tmp_path / "empty.txt").write_text("\n", encoding="utf-8")
    result = CliRunner().invoke(
        app, ["tokenizer", "train", str(tmp_path / "empty.txt"), "-o", str(tmp_path / "y.model")]
    )
    assert result.exit_code == 1 and "empty" in str(result.exception)
