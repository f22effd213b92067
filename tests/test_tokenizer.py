import json

import pytest

from cpm_infer.tokenizer import CpmTokenizer, TokenizerError, find_tokenizer_file


def test_golden_file_matches_exactly(shared_vocab):
    tok = CpmTokenizer(shared_vocab)
    rows = [
        json.loads(line)
        for line in (shared_vocab.parent / "golden-public.jsonl").read_text(encoding="utf-8").splitlines()
    ]
    assert len(rows) > 100
    id_mismatch = [r["text"] for r in rows if tok.encode(r["text"]) != r["ids"]]
    decode_mismatch = [r["text"] for r in rows if tok.decode(r["ids"]) != r["decoded"]]
    assert id_mismatch == [] and decode_mismatch == []
    assert tok.encode_batch([r["text"] for r in rows]) == [r["ids"] for r in rows]


def test_real_vocab_special_ids(shared_vocab):
    tok = CpmTokenizer(shared_vocab)
    assert (tok.unk_id, tok.sep_id, tok.pad_id, tok.eod_id, tok.eos_id) == (0, 4, 5, 7, 7)
    assert tok.vocab_size == 30000
    # space and newline survive a round trip through ▂ / ▃
    assert tok.encode(" ") == [8, 10] and tok.encode("\n") == [8, 3]
    assert tok.decode(tok.encode("a b\nc")) == "a b\nc"


def test_tiny_vocab_round_trip_and_batch(tiny_vocab):
    tok = CpmTokenizer(tiny_vocab)
    texts = ["话说天下大势，分久必合", "滚滚长江 东逝水\n浪花", ""]
    batch = tok.encode_batch(texts)
    assert batch == [tok.encode(t) for t in texts]
    assert batch[2] == []
    assert [tok.decode(ids) for ids in batch] == tok.decode_batch(batch)
    assert tok.decode(tok.encode("滚滚长江 东逝水\n浪花")) == "滚滚长江 东逝水\n浪花"
    assert len({tok.unk_id, tok.sep_id, tok.pad_id, tok.eod_id}) == 4


def test_missing_file(tmp_path):
    with pytest.raises(TokenizerError, match="not found"):
        CpmTokenizer(tmp_path / "nope.model")


def test_corrupt_file(tmp_path):
    bad = tmp_path / "spiece.model"
    bad.write_bytes(b"not a sentencepiece model")
    with pytest.raises(TokenizerError, match="cannot read"):
        CpmTokenizer(bad)


def test_vocab_without_cpm_specials_is_refused(tmp_path):
    import sentencepiece as spm

    corpus = tmp_path / "c.txt"
    corpus.write_text("hello world\nthe quick brown fox\n" * 20, encoding="utf-8")
    spm.SentencePieceTrainer.Train(
        input=str(corpus), model_prefix=str(tmp_path / "plain"), vocab_size=30, hard_vocab_limit=False, minloglevel=2
    )
    with pytest.raises(TokenizerError, match="not a CPM-style vocabulary"):
        CpmTokenizer(tmp_path / "plain.model")


def test_from_dir_finds_either_name(tmp_path, tiny_vocab):
    assert find_tokenizer_file(tmp_path) is None
    with pytest.raises(TokenizerError, match="no tokenizer file"):
        CpmTokenizer.from_dir(tmp_path)
    (tmp_path / "chinese_vocab.model").write_bytes(tiny_vocab.read_bytes())
    assert CpmTokenizer.from_dir(tmp_path).path.name == "chinese_vocab.model"
