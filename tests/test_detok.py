"""Incremental detokenization: the released pieces concatenate to ``tokenizer.decode(all ids)``, with a
bounded amount of decoding per token; stop strings are cut and never streamed."""

from __future__ import annotations

import json

import numpy as np
import pytest

from cpm_infer.engine.detok import IncrementalDetokenizer, TextStream


class CountingTok:
    """Wraps a tokenizer, counting the ids it is asked to decode."""

    def __init__(self, inner):
        self.inner, self.decoded = inner, 0

    def decode(self, ids):
        self.decoded += len(ids)
        return self.inner.decode(ids)


def incremental(tok, ids) -> tuple[str, list[str]]:
    detok = IncrementalDetokenizer(tok)
    pieces = [detok.add(i) for i in ids]
    pieces.append(detok.flush())
    return "".join(pieces), pieces


@pytest.fixture(scope="module")
def cpm_tok(shared_vocab):
    from cpm_infer.tokenizer import CpmTokenizer

    return CpmTokenizer(shared_vocab)


def test_golden_file_decodes_identically(cpm_tok, shared_vocab):
    lines = (shared_vocab.parent / "golden-public.jsonl").read_text(encoding="utf-8").splitlines()
    for line in lines:
        case = json.loads(line)
        text, _ = incremental(cpm_tok, case["ids"])
        assert text == cpm_tok.decode(case["ids"]) == case["decoded"]


def test_random_ids_decode_identically_with_constant_work(cpm_tok):
    rng = np.random.default_rng(0)
    specials = [cpm_tok.unk_id, cpm_tok.sep_id, cpm_tok.pad_id, cpm_tok.eod_id, 1, 2, 3, 8, 10]
    for _ in range(300):
        ids = rng.integers(0, cpm_tok.vocab_size, size=int(rng.integers(1, 120)))
        special = rng.random(len(ids)) < 0.2
        ids[special] = rng.choice(specials, size=int(special.sum()))
        ids = ids.tolist()
        counting = CountingTok(cpm_tok)
        text, _ = incremental(counting, ids)
        assert text == cpm_tok.decode(ids), ids
        assert counting.decoded <= 4 * len(ids) + 2, "each token decodes a bounded window"


def test_space_and_newline_pieces_map_like_decode(cpm_tok):
    ids = cpm_tok.encode("第一行 有空格\n第二行\n\n  两个空格")
    assert cpm_tok.id_to_piece(10) == "\u2582" and cpm_tok.id_to_piece(3) == "\u2583"
    text, pieces = incremental(cpm_tok, ids)
    assert text == cpm_tok.decode(ids) == "第一行 有空格\n第二行\n\n  两个空格"
    assert " " in pieces and "\n" in pieces  # ▂ and ▃ come out as their own text at once


@pytest.fixture(scope="module")
def byte_tok(tmp_path_factory):
    """A SentencePiece model with byte fallback: characters outside its pieces decode from byte pieces,
    and an unfinished byte sequence decodes to U+FFFD, which the next piece changes."""
    import sentencepiece as spm

    from cpm_infer.tokenizer import CpmTokenizer

    out = tmp_path_factory.mktemp("bytes")
    (out / "corpus.txt").write_text("滚滚长江东逝水浪花淘尽英雄\n" * 20, encoding="utf-8")
    spm.SentencePieceTrainer.Train(
        input=str(out / "corpus.txt"),
        model_prefix=str(out / "b"),
        vocab_size=300,
        model_type="unigram",
        byte_fallback=True,
        character_coverage=1.0,
        hard_vocab_limit=False,
        control_symbols=["<sep>", "<pad>"],
        user_defined_symbols=["<eod>", "\u2582", "\u2583"],
        minloglevel=2,
    )
    return CpmTokenizer(out / "b.model")


def test_pieces_that_change_the_text_before_them_are_held_back(byte_tok):
    ids = byte_tok.encode("长江龘东逝水")  # 龘 is not in the vocabulary: three byte pieces
    assert sum(byte_tok.id_to_piece(i).startswith("<0x") for i in ids) == 3
    detok = IncrementalDetokenizer(byte_tok)
    pieces = [detok.add(i) for i in ids]
    assert "\ufffd" not in "".join(pieces)  # the half-done character was never released
    assert "".join(pieces) + detok.flush() == byte_tok.decode(ids) == "长江龘东逝水"
    assert "龘" in pieces or any("龘" in p for p in pieces)


def test_unfinished_bytes_at_the_end_are_released_by_flush(byte_tok):
    ids = byte_tok.encode("江龘")[:-1]  # cut inside the character
    text, pieces = incremental(byte_tok, ids)
    assert text == byte_tok.decode(ids) and pieces[-1].endswith("\ufffd")


class CharTok:
    def decode(self, ids):
        return "".join(chr(ord("a") + i) for i in ids)


def test_stop_strings_cut_the_text_and_are_never_released():
    stream = TextStream(CharTok(), ["cde", "x"])
    out = [stream.add(i) for i in [0, 1, 2, 3]]  # a b c d
    assert out == [("", False), ("", False), ("a", False), ("b", False)]  # 2 characters held back
    assert stream.add(4) == ("", True)  # e completes "cde": the text ends before it
    assert stream.text == "ab" and stream.finish() == ""


def test_held_back_text_is_released_at_the_end():
    stream = TextStream(CharTok(), ["zz"])
    released = "".join(stream.add(i)[0] for i in [0, 1, 25])
    assert released == "ab" and stream.finish() == "z" and stream.text == "abz"
    plain = TextStream(CharTok())
    assert [plain.add(i)[0] for i in [2, 3]] == ["c", "d"] and plain.finish() == ""
