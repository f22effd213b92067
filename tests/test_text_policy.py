"""The one policy for text that is not clean Unicode: files, command-line prompts, prompt files."""

from __future__ import annotations

import json
import logging
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import run_cli
from hypothesis import given, settings
from hypothesis import strategies as st

from cpm_infer.text import REPLACEMENT, read_text_file, split_lines

GBK_TEXT = "话说天下大势，分久必合，合久必分。\n周末七国分争，并入于秦。\n滚滚长江东逝水，浪花淘尽英雄。\n"


def test_bom_crlf_and_cr_are_read_as_plain_lines(tmp_path: Path) -> None:
    path = tmp_path / "a.txt"
    path.write_bytes(b"\xef\xbb\xbf" + "一\r\n二\r三\n\u2028仍是三\n".encode())
    text = read_text_file(path)
    assert (text.encoding, text.lines, text.replaced_lines) == ("utf-8", ["一", "二", "三", "\u2028仍是三"], [])


def test_invalid_utf8_is_replaced_and_named_and_nothing_after_is_lost(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "a.txt"
    path.write_bytes("第一行\n".encode() + b"caf\xe9 \xe4\xbd\n" + "第三行\n第四行".encode())
    with caplog.at_level(logging.WARNING, logger="cpm_infer.text"):
        text = read_text_file(path)
    assert text.lines == ["第一行", f"caf{REPLACEMENT} {REPLACEMENT}", "第三行", "第四行"]
    assert text.replaced_lines == [2]
    assert f"{path}:2: invalid UTF-8 replaced with U+FFFD" in caplog.text


def test_gb18030_is_detected_and_binary_is_flagged(tmp_path: Path) -> None:
    gbk = tmp_path / "gbk.txt"
    gbk.write_bytes(GBK_TEXT.encode("gbk"))
    text = read_text_file(gbk)
    assert (text.encoding, text.lines) == ("gb18030", GBK_TEXT.splitlines())
    utf16 = tmp_path / "u16.txt"
    utf16.write_bytes(GBK_TEXT.encode("utf-16"))
    assert read_text_file(utf16).lines == GBK_TEXT.splitlines()
    junk = tmp_path / "junk.bin"
    junk.write_bytes(bytes(range(256)) * 4)
    assert read_text_file(junk).binary
    forced = read_text_file(gbk, encoding="gbk")
    assert forced.encoding == "gbk" and forced.lines == GBK_TEXT.splitlines()


@settings(max_examples=300, deadline=None)
@given(data=st.binary(max_size=300))
def test_any_bytes_read_without_error_and_without_surrogates(tmp_path_factory, data: bytes) -> None:
    path = tmp_path_factory.mktemp("b") / "f"
    path.write_bytes(data)
    text = read_text_file(path)
    for line in text.lines:
        line.encode("utf-8")  # never a lone surrogate
        assert "\n" not in line and "\r" not in line


@settings(max_examples=300, deadline=None)
@given(text=st.text(st.characters(exclude_categories=("Cs", "Cc")) | st.sampled_from("\n\r\t"), max_size=200))
def test_utf8_text_reads_back_exactly(tmp_path_factory, text: str) -> None:
    path = tmp_path_factory.mktemp("t") / "f"
    path.write_bytes(text.encode("utf-8"))
    assert read_text_file(path).lines == split_lines(text.removeprefix("\ufeff"))


def test_cli_prompt_bytes_not_utf8_generate_and_warn(tiny_checkpoint: Path) -> None:
    """A real process whose argv holds bytes that are not UTF-8 (Python passes them on as lone surrogates)."""
    argv = [b"generate", b"-m", bytes(tiny_checkpoint), b"-p", "话说".encode() + b"\xff", b"-n", b"4", b"-t", b"0"]
    proc = subprocess.run([sys.executable, "-m", "cpm_infer.cli.app", *argv], capture_output=True, timeout=120)
    err = proc.stderr.decode()
    assert proc.returncode == 0, err
    assert proc.stdout.strip()
    assert "--prompt: 1 lone surrogate(s) replaced with U+FFFD" in err


def test_cli_input_file_with_broken_lines_keeps_every_prompt(
    monkeypatch, capsys, caplog, tmp_path, tiny_checkpoint
) -> None:
    prompts = tmp_path / "p.txt"
    prompts.write_bytes(
        "话说天下\n".encode()
        + b"\xff\xfe\xe4 broken\n"
        + b'{"prompt": "\\ud800\xe5\xa4\xa9"}\n'
        + "滚滚长江\n".encode()
    )
    out = tmp_path / "out.jsonl"
    with caplog.at_level(logging.WARNING, logger="cpm_infer"):
        code, _, err = run_cli(
            monkeypatch, capsys, "generate", "-m", str(tiny_checkpoint), "-i", str(prompts), "-n", "3", "-o", str(out)
        )
    assert code == 0, err
    rows = [json.loads(line) for line in out.read_text(encoding="utf-8").splitlines()]
    bad = REPLACEMENT * 3
    assert [r["prompt"] for r in rows] == ["话说天下", f"{bad} broken", f"{REPLACEMENT}天", "滚滚长江"]
    assert [r["index"] for r in rows] == [0, 1, 2, 3]
    assert f"{prompts}:2: invalid UTF-8 replaced" in caplog.text and f"{prompts}:3: 1 lone surrogate" in caplog.text


@pytest.mark.parametrize(
    ("content", "message"),
    [(b"", "holds no prompts"), (b"\n  \n", "holds no prompts"), (b"\x00\x01\x02binary" * 50, "binary file")],
)
def test_cli_empty_or_binary_input_is_one_line(monkeypatch, capsys, tmp_path, tiny_checkpoint, content, message):
    prompts = tmp_path / "p.txt"
    prompts.write_bytes(content)
    code, _, err = run_cli(monkeypatch, capsys, "generate", "-m", str(tiny_checkpoint), "-i", str(prompts))
    assert code == 1 and message in err and str(prompts) in err and err.count("\n") == 1


def test_cli_tokenize_takes_any_text(monkeypatch, capsys, tiny_checkpoint) -> None:
    code, out, err = run_cli(monkeypatch, capsys, "tokenize", "-m", str(tiny_checkpoint), "天下\udcff")
    assert code == 0, err
    assert json.loads(out)["decoded"].startswith("天下")
