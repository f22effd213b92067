"""Trainer data: formats -> documents (with file:line errors), windows, the on-disk cache."""

from __future__ import annotations

import functools
import json
import operator
from pathlib import Path

import numpy as np
import pytest

from trainer.batches import EpochSampler, collate, eval_windows, split_documents, train_windows
from trainer.errors import DataError, TrainError
from trainer.formats import Document, read_documents
from trainer.windows import document_ids, load_windows, window_starts, windows_for

SEED_DOC = "---\n标题：桃园结义\n日期：2020-05-01\n作者：罗贯中\n---\n\n话说天下大势，分久必合。\n\n  合久必分。\n"


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    return path


def test_seed_format_directory(tmp_path: Path) -> None:
    write(tmp_path / "d" / "a.txt", SEED_DOC)
    write(tmp_path / "d" / "b.txt", "---\n标题: 第二篇\n---\n正文一行\n")
    write(tmp_path / "d" / ".hidden", "ignored")
    docs = read_documents([tmp_path / "d"])
    assert [(d.title, d.content) for d in docs] == [
        ("桃园结义", "话说天下大势，分久必合。\n合久必分。"),
        ("第二篇", "正文一行"),
    ]
    assert docs[0].source.endswith("a.txt:1")


@pytest.mark.parametrize(
    ("text", "where", "what"),
    [
        ("---\n标题：x\n作者：y\n", ":3", "not closed"),
        ("---\n标题：x\n作者：y\n正文\n", ":4", "key：value"),
        ("---\n标题：x\n---\n\n", ":1", "title but no body"),
        ("---\n标题：\n---\n\n", ":1", "document is empty"),
        ("", ":1", "holds no text"),
    ],
)
def test_malformed_seed_files_name_file_and_line(tmp_path: Path, text: str, where: str, what: str) -> None:
    path = write(tmp_path / "bad.txt", text)
    write(tmp_path / "good.txt", SEED_DOC)
    # skipped by default (the good file is still read), refused with --strict
    assert [d.title for d in read_documents([path, tmp_path / "good.txt"], "seed")] == ["桃园结义"]
    with pytest.raises(DataError, match=what) as info:
        read_documents([path, tmp_path / "good.txt"], "seed", strict=True)
    assert str(info.value).startswith(f"{path}{where}: ")
    assert "\n" not in str(info.value)


def test_jsonl_title_content_and_text(tmp_path: Path) -> None:
    lines = [
        {"title": "标题", "content": "内容\n第二行"},
        {"text": "只有正文"},
        {"title": "", "content": "无题"},
        {"title": "有题", "text": "正文在 text"},
    ]
    path = write(tmp_path / "d.jsonl", "\n".join(json.dumps(x, ensure_ascii=False) for x in lines) + "\n\n")
    docs = read_documents([path])
    assert [(d.title, d.content) for d in docs] == [
        ("标题", "内容\n第二行"),
        (None, "只有正文"),
        (None, "无题"),
        ("有题", "正文在 text"),
    ]
    assert docs[1].source == f"{path}:2"


@pytest.mark.parametrize(
    ("line", "what"),
    [
        ("{not json", "invalid JSON"),
        ('["a"]', "string fields"),
        ('{"title": "t"}', "string fields"),
        ('{"title": "t", "content": " "}', "title but no body"),
        ('{"text": "  "}', "document is empty"),
    ],
)
def test_malformed_jsonl_names_the_line(tmp_path: Path, line: str, what: str) -> None:
    path = write(tmp_path / "d.jsonl", '{"text": "好"}\n\n' + line + "\n" + '{"text": "后面的行"}\n')
    assert [d.content for d in read_documents([path])] == ["好", "后面的行"]
    with pytest.raises(DataError, match=what) as info:
        read_documents([path], strict=True)
    assert str(info.value).startswith(f"{path}:3:")


def test_plain_text_lines_and_paragraphs(tmp_path: Path) -> None:
    lines = write(tmp_path / "lines.txt", "\n第一篇\n第二篇\n\n")
    paras = write(tmp_path / "paras.txt", "第一段\n续行\n\n\n第二段\n")
    assert [d.content for d in read_documents([lines])] == ["第一篇", "第二篇"]
    docs = read_documents([paras])
    assert [d.content for d in docs] == ["第一段\n续行", "第二段"]
    assert docs[1].source == f"{paras}:5"


def test_empty_missing_and_undecodable_data(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="holds no text: no usable documents"):
        read_documents([write(tmp_path / "blank.txt", "\n  \n")])
    with pytest.raises(DataError, match="not found"):
        read_documents([tmp_path / "nope.txt"])
    bad = tmp_path / "latin1.txt"
    bad.write_bytes("好\n第二行\n".encode() + b"caf\xe9\n")
    assert [d.content for d in read_documents([bad])] == ["好", "第二行", "caf\ufffd"]
    with pytest.raises(DataError, match=rf"{bad}:3: invalid bytes"):
        read_documents([bad], strict=True)


def test_window_starts_cover_every_token() -> None:
    assert window_starts(10, 4, 2) == [0, 2, 4, 6]
    assert window_starts(3, 4, 4) == [0]
    for n, max_len, stride in [(1, 2, 1), (17, 5, 3), (100, 8, 8), (9, 8, 1)]:
        covered = set()
        for s in window_starts(n, max_len, stride):
            covered.update(range(s, min(n, s + max_len)))
        assert covered == set(range(n))
    with pytest.raises(TrainError):
        window_starts(10, 4, 5)


def test_document_ids_layout(tiny_vocab: Path) -> None:
    from cpm_infer.tokenizer import CpmTokenizer

    tok = CpmTokenizer(tiny_vocab)
    ids = document_ids(tok, Document(content="天下大势", title="三国", source="x:1"))
    assert ids == [*tok.encode("三国"), tok.sep_id, *tok.encode("天下大势"), tok.eod_id]
    assert document_ids(tok, Document(content="天下", title=None, source="x:1")) == [*tok.encode("天下"), tok.eod_id]


def test_cache_is_built_once_and_keyed_by_lengths(
    tmp_path: Path, tiny_vocab: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from cpm_infer.tokenizer import CpmTokenizer

    tok = CpmTokenizer(tiny_vocab)
    data = write(
        tmp_path / "d.txt", "话说天下大势，分久必合，合久必分。\n\n滚滚长江东逝水，浪花淘尽英雄。\n是非成败转头空。\n"
    )
    seen: list[tuple[int, int]] = []
    cache = load_windows([data], tok, 8, 4, cache_dir=tmp_path / "c", progress=lambda d, t: seen.append((d, t)))
    assert seen[-1] == (2, 2)
    assert isinstance(cache.tokens, np.memmap) and cache.meta["n_docs"] == 2
    offsets = np.asarray(cache.doc_offsets)
    assert cache.tokens[offsets[1] - 1] == tok.eod_id and cache.tokens[offsets[2] - 1] == tok.eod_id
    np.testing.assert_array_equal(cache.windows, windows_for(offsets, 8, 4))

    monkeypatch.setattr("trainer.windows.read_with_summary", lambda *a, **k: pytest.fail("cache miss"))
    again = load_windows([data], tok, 8, 4, cache_dir=tmp_path / "c")
    assert again.directory == cache.directory
    monkeypatch.undo()
    other = load_windows([data], tok, 8, 8, cache_dir=tmp_path / "c")
    assert other.directory != cache.directory and len(other.windows) < len(cache.windows)


def test_interrupted_cache_build_leaves_no_entry(
    tmp_path: Path, tiny_vocab: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from cpm_infer.tokenizer import CpmTokenizer

    tok = CpmTokenizer(tiny_vocab)
    data = write(tmp_path / "d.txt", "话说天下大势\n分久必合\n")
    real_save = np.save

    def dying_save(path, array):
        if str(path).endswith("windows.npy"):
            raise KeyboardInterrupt
        real_save(path, array)

    monkeypatch.setattr(np, "save", dying_save)
    with pytest.raises(KeyboardInterrupt):
        load_windows([data], tok, 8, 8, cache_dir=tmp_path / "c")
    assert list((tmp_path / "c").iterdir()) == []
    monkeypatch.undo()
    assert load_windows([data], tok, 8, 8, cache_dir=tmp_path / "c").meta["n_docs"] == 2


def test_split_sampler_and_collate(tmp_path: Path, tiny_vocab: Path) -> None:
    from cpm_infer.tokenizer import CpmTokenizer

    tok = CpmTokenizer(tiny_vocab)
    data = write(
        tmp_path / "d.txt",
        "\n".join(["话说天下大势，分久必合，合久必分。", "滚滚长江东逝水", "是非成败转头空", "青山依旧在"] * 3),
    )
    cache = load_windows([data], tok, 6, 3, cache_dir=tmp_path / "c")
    train_docs, val_docs = split_documents(cache.n_docs, 0.25, seed=1)
    assert len(val_docs) == 3 and not set(train_docs) & set(val_docs)
    assert split_documents(cache.n_docs, 0.25, seed=1) == (train_docs, val_docs)
    train = train_windows(cache, train_docs)
    assert set(train[:, 2].tolist()) <= set(train_docs)
    val = eval_windows(cache, val_docs)
    assert val[:, 1].sum() == sum(int(cache.doc_offsets[d + 1] - cache.doc_offsets[d]) for d in val_docs)

    sampler = EpochSampler(len(train), 2, seed=3)
    epoch0 = [sampler.batch(0, i).tolist() for i in range(sampler.batches_per_epoch)]
    flat = functools.reduce(operator.iadd, epoch0, [])
    assert len(set(flat)) == len(flat) == 2 * sampler.batches_per_epoch and max(flat) < len(train)
    assert epoch0 != [sampler.batch(1, i).tolist() for i in range(sampler.batches_per_epoch)]
    ranks = [EpochSampler(len(train), 2, seed=3, rank=r, world=2) for r in range(2)]
    assert not set(ranks[0].batch(0, 0).tolist()) & set(ranks[1].batch(0, 0).tolist())

    batch = collate(cache, train, np.array([0, 1]), tok.pad_id)
    lengths = train[[0, 1], 1]
    assert batch["input_ids"].shape == (2, lengths.max())
    assert (batch["attention_mask"].sum(1) == lengths).all()
    assert ((batch["labels"] == -100) == (batch["attention_mask"] == 0)).all()
    with pytest.raises(DataError, match="fewer than one global batch"):
        EpochSampler(3, 4, seed=0).check()
