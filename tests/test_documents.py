"""Data files as found in the wild (cpm_infer.documents, used by `cpm train` and `cpm eval`)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import ROOT, SHARED_VOCAB_DIR, run_cli

from cpm_infer.documents import DataError, ReadSummary, read_documents

BODY = "话说天下大势，分久必合，合久必分。\n周末七国分争，并入于秦。\n"


def seed(title_line: str = "标题：桃园结义", body: str = BODY, extra: str = "") -> str:
    return f"---\n{title_line}\n日期：2020-05-01\n{extra}作者：罗贯中\n---\n\n{body}"


# file bytes -> (title, content) kept, or the skip reason
CASES = {
    "clean": (seed().encode(), ("桃园结义", BODY.strip())),
    "empty title": (seed("标题：").encode(), (None, BODY.strip())),
    "no title line": (seed("来源：网络").encode(), (None, BODY.strip())),
    "ascii colon": (seed("标题: 桃园结义").encode(), ("桃园结义", BODY.strip())),
    "colon in title": (seed("标题：Python: 入门").encode(), ("Python: 入门", BODY.strip())),
    "extra fields": (seed(extra="来源：https://x.invalid/a\ntags: 三国\n").encode(), ("桃园结义", BODY.strip())),
    "bom": (b"\xef\xbb\xbf" + seed().encode(), ("桃园结义", BODY.strip())),
    "crlf": (seed().replace("\n", "\r\n").encode(), ("桃园结义", BODY.strip())),
    "gbk": (seed().encode("gbk"), ("桃园结义", BODY.strip())),
    "title without body": (seed(body="\n\n").encode(), "title without body"),
    "empty document": (seed("标题：", body="").encode(), "empty document"),
    "blank file": (b" \n\n", "empty file"),
    "zero bytes": (b"", "empty file"),
    "binary junk": (bytes(range(256)), "binary file"),
    "unclosed header": (b"---\n\xe6\xa0\x87\xe9\xa2\x98\xef\xbc\x9ax\n", "malformed header"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_each_wild_case_is_kept_or_skipped_by_reason(tmp_path: Path, case: str) -> None:
    data, outcome = CASES[case]
    path = tmp_path / "a.txt"
    path.write_bytes(data)
    (tmp_path / "other.txt").write_text(seed("标题：另一篇"), encoding="utf-8")
    docs, summary = read_documents([tmp_path])
    if isinstance(outcome, tuple):
        assert (docs[0].title, docs[0].content) == outcome
        assert summary.kept == 2 and not summary.skipped
    else:
        assert [d.title for d in docs] == ["另一篇"]
        assert summary.skipped == {outcome: 1} and summary.first[outcome].startswith(str(path))
        with pytest.raises(DataError, match="--strict refuses it") as info:
            read_documents([tmp_path], strict=True)
        assert str(info.value).startswith(str(path)) and "\n" not in str(info.value)


def test_summary_names_reasons_encodings_and_round_trips(tmp_path: Path) -> None:
    for name, (data, _) in CASES.items():
        (tmp_path / f"{name}.txt").write_bytes(data)
    (tmp_path / "damaged.txt").write_bytes(seed().encode() + b"\xff tail\n")
    docs, summary = read_documents([tmp_path])
    assert summary.files == len(CASES) + 1 and summary.read == len(CASES) + 1
    assert summary.kept == len(docs) == 10
    assert summary.encodings["gb18030"] == 1 and summary.replaced == [f"{tmp_path / 'damaged.txt'}:9"]
    text = summary.describe()
    for part in ("16 document(s) read", "10 kept", "6 skipped", "GB18030: 1"):
        assert part in text
    assert ReadSummary.from_dict(summary.to_dict()).describe() == text
    with pytest.raises(DataError, match=r"binary file|empty file|title|header|empty document"):
        ReadSummary.from_dict(summary.to_dict()).check_strict()


def test_forced_encoding_and_unknown_encoding(tmp_path: Path) -> None:
    path = tmp_path / "big5.txt"
    path.write_bytes("話說天下大勢\n".encode("big5"))
    docs, summary = read_documents([path], encoding="big5")
    assert docs[0].content == "話說天下大勢" and summary.encodings == {"big5": 1}
    with pytest.raises(DataError, match="unknown encoding 'nope'"):
        read_documents([path], encoding="nope")


def test_assembled_scraped_sample_matches_what_was_planted(tmp_path: Path) -> None:
    """benchmarks/wild_data.py plants each case at a known rate; the reader's counts must match exactly."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "CPM_VOCAB_DIR": str(SHARED_VOCAB_DIR)}
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "wild_data.py"), "--out", str(tmp_path / "wild"), "--check"],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "kept" in proc.stdout and "skipped" in proc.stdout


def test_train_cli_prints_the_summary_and_strict_refuses(tmp_path: Path, tiny_checkpoint: Path) -> None:
    pytest.importorskip("accelerate")
    from typer.testing import CliRunner

    from cpm_infer.cli.app import app

    data = tmp_path / "data"
    data.mkdir()
    for name in ("clean", "gbk", "crlf", "empty title", "title without body", "binary junk", "blank file"):
        (data / f"{name}.txt").write_bytes(CASES[name][0])
    common = [str(data), "-m", str(tiny_checkpoint), "--cache-dir", str(tmp_path / "cache"), "--max-len", "16"]
    common += ["--batch-size", "2", "--max-steps", "1", "--val-fraction", "0", "--warmup-steps", "0"]
    result = CliRunner().invoke(app, ["train", "finetune", *common, "-o", str(tmp_path / "run")])
    assert result.exit_code == 0, result.output
    assert "train data: 7 file(s), 7 document(s) read: 4 kept, 3 skipped" in " ".join(result.output.split())
    assert "GB18030: 1" in result.output
    # strict: refused on the cache hit too, naming the file
    result = CliRunner().invoke(app, ["train", "finetune", *common, "-o", str(tmp_path / "run2"), "--strict"])
    assert result.exit_code == 1 and isinstance(result.exception, DataError)
    assert str(result.exception).startswith(str(data)) and "--strict" in str(result.exception)


def test_eval_cli_reads_a_wild_file_and_says_so(monkeypatch, capsys, tmp_path: Path, tiny_checkpoint: Path) -> None:
    path = tmp_path / "eval.txt"
    path.write_bytes("第一段话说天下大势\r\n\r\n".encode() + b"\xff\xfe\r\n\r\n" + "第三段".encode())
    code, _, err = run_cli(monkeypatch, capsys, "eval", "ppl", str(tiny_checkpoint), str(path))
    assert code == 0, err
    assert "3 document(s) read: 3 kept" in err and "replaced by U+FFFD" in err
    code, _, err = run_cli(monkeypatch, capsys, "eval", "ppl", str(tiny_checkpoint), str(path), "--strict")
    assert code == 1 and err.startswith(f"error: {path}:3: invalid bytes") and err.count("\n") == 1
    gbk = tmp_path / "gbk.txt"
    gbk.write_bytes(BODY.encode("gbk"))
    code, _, err = run_cli(monkeypatch, capsys, "eval", "ppl", str(tiny_checkpoint), str(gbk))
    assert code == 0 and "GB18030: 1 file(s)" in err, err


def test_jsonl_escapes_of_lone_surrogates_follow_the_text_policy(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    import logging

    path = tmp_path / "d.jsonl"
    path.write_text('{"title": "\\ud800题", "content": "正文\\udc00"}\n{"text": "好"}\n', encoding="utf-8")
    with caplog.at_level(logging.WARNING, logger="cpm_infer.text"):
        docs, _ = read_documents([path])
    assert [(d.title, d.content) for d in docs] == [("\ufffd题", "正文\ufffd"), (None, "好")]
    assert f"{path}:1: 1 lone surrogate(s) replaced with U+FFFD" in caplog.text
