"""The `cpm` CLI as a user sees it: outputs, one-line errors with exit code 1, a fast --help."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from conftest import run_cli as run


def test_help_does_not_import_torch():
    code = (
        "import sys; sys.argv=['cpm','--help']\n"
        "from cpm_infer.cli.app import main\n"
        "try:\n    main()\nexcept SystemExit: pass\n"
        "heavy = [m for m in ('torch', 'transformers', 'onnxruntime', 'tensorrt') if m in sys.modules]\n"
        "print('HEAVY', heavy)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert "HEAVY []" in out and "generate" in out


def test_generate_prompt_greedy_is_deterministic(monkeypatch, capsys, tiny_checkpoint):
    args = ("generate", "-m", str(tiny_checkpoint), "-p", "话说天下", "-n", "12", "-t", "0")
    code, first, err = run(monkeypatch, capsys, *args)
    assert code == 0, err
    assert first.strip()
    assert run(monkeypatch, capsys, *args)[1] == first


def test_generate_title_context_stream_matches_plain(monkeypatch, capsys, tiny_checkpoint):
    base = ("generate", "-m", str(tiny_checkpoint), "--title", "三国", "--context", "话说", "-n", "10", "--seed", "3")
    code, plain, _ = run(monkeypatch, capsys, *base)
    assert code == 0
    code, streamed, _ = run(monkeypatch, capsys, *base, "--stream")
    assert code == 0 and streamed == plain


def test_generate_input_file_to_jsonl(monkeypatch, capsys, tmp_path, tiny_checkpoint):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text('话说天下\n{"title": "赤壁", "context": "东风"}\n\n滚滚长江\n', encoding="utf-8")
    out = tmp_path / "out.jsonl"
    common = ("generate", "-m", str(tiny_checkpoint), "-i", str(prompts), "-n", "8", "--num-samples", "2")
    code, _, err = run(monkeypatch, capsys, *common, "-o", str(out), "--batch-size", "2")
    assert code == 0, err
    rows = [json.loads(line) for line in out.read_text(encoding="utf-8").splitlines()]
    assert [(r.get("prompt") or r.get("title"), r["sample"]) for r in rows] == [
        ("话说天下", 0),
        ("话说天下", 1),
        ("赤壁", 0),
        ("赤壁", 1),
        ("滚滚长江", 0),
        ("滚滚长江", 1),
    ]
    assert all(r["new_tokens"] <= 8 and r["finish_reason"] in {"eos", "length"} for r in rows)
    # the batch size does not change what each prompt gets
    out1 = tmp_path / "out1.jsonl"
    assert run(monkeypatch, capsys, *common, "-o", str(out1), "--batch-size", "1")[0] == 0
    assert out1.read_text(encoding="utf-8") == out.read_text(encoding="utf-8")


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("-p", "x", "--top-p", "1.5"), "top_p must be in (0, 1]"),
        (("-p", "x", "-t", "-1"), "temperature must be >= 0"),
        (("-p", "x", "--repetition-penalty", "0"), "repetition_penalty must be > 0"),
        (("-p", "x", "--backend", "tpu"), "unknown backend"),
        (("-p", "x", "--device", "cuda"), "no CUDA GPU"),
        (("-p", "话说" * 200, "-n", "5"), "context is 128"),
        ((), "exactly one of"),
        (("-i", "/nonexistent/prompts.txt"), "input file not found"),
    ],
)
def test_generate_bad_input_is_one_line(monkeypatch, capsys, tiny_checkpoint, args, message):
    code, _out, err = run(monkeypatch, capsys, "generate", "-m", str(tiny_checkpoint), *args)
    assert code == 1
    assert message in err and err.count("\n") == 1 and err.startswith("error: ")


def test_truncate_makes_long_prompts_fit(monkeypatch, capsys, tiny_checkpoint):
    code, _out, err = run(
        monkeypatch, capsys, "generate", "-m", str(tiny_checkpoint), "-p", "话说" * 200, "-n", "5", "--truncate"
    )
    assert code == 0, err


def test_missing_model_and_corrupt_model(monkeypatch, capsys, tmp_path, tiny_checkpoint):
    code, _, err = run(monkeypatch, capsys, "generate", "-m", str(tmp_path / "absent"), "-p", "x")
    assert code == 1 and "not found" in err
    import shutil

    broken = tmp_path / "broken"
    shutil.copytree(tiny_checkpoint, broken)
    (broken / "model.safetensors").write_bytes(b"garbage")
    code, _, err = run(monkeypatch, capsys, "generate", "-m", str(broken), "-p", "x")
    assert code == 1 and "cannot read weights" in err and err.count("\n") == 1


def test_info(monkeypatch, capsys, tiny_checkpoint):
    code, out, err = run(monkeypatch, capsys, "info", str(tiny_checkpoint))
    assert code == 0, err
    assert "2 layers" in out and "embedding" in out and "<eod>" in out


def test_tokenize_text_and_jsonl(monkeypatch, capsys, tmp_path, tiny_checkpoint, tiny_vocab):
    code, out, _ = run(monkeypatch, capsys, "tokenize", "-m", str(tiny_checkpoint), "话说 天下\n")
    record = json.loads(out)
    assert code == 0 and record["decoded"] == "话说 天下\n" and record["ids"]
    data = tmp_path / "t.jsonl"
    data.write_text('{"text": "滚滚长江"}\n{"text": "东逝水"}\n', encoding="utf-8")
    code, out, _ = run(monkeypatch, capsys, "tokenize", "--vocab", str(tiny_vocab), "-i", str(data), "--pieces")
    rows = [json.loads(line) for line in out.splitlines()]
    assert code == 0 and [r["decoded"] for r in rows] == ["滚滚长江", "东逝水"] and all(r["pieces"] for r in rows)
    data.write_text('{"txt": 1}\n', encoding="utf-8")
    code, _, err = run(monkeypatch, capsys, "tokenize", "--vocab", str(tiny_vocab), "-i", str(data))
    assert code == 1 and ":1:" in err


def test_model_create_refuses_existing_dir(monkeypatch, capsys, tmp_path, tiny_vocab):
    out = tmp_path / "m"
    args = (
        "model",
        "create",
        str(out),
        "--tokenizer",
        str(tiny_vocab),
        "--layers",
        "1",
        "--hidden",
        "16",
        "--heads",
        "2",
        "--context",
        "64",
    )
    assert run(monkeypatch, capsys, *args)[0] == 0
    assert (out / "config.json").is_file() and (out / "spiece.model").is_file()
    code, _, err = run(monkeypatch, capsys, *args)
    assert code == 1 and "--force" in err
    assert run(monkeypatch, capsys, *args, "--force")[0] == 0
