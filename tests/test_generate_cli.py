"""``cpm generate``'s engine flags: penalties, logprobs (JSONL), beam search; bad values in one line."""

from __future__ import annotations

import json

import pytest
from conftest import run_cli as run


def test_logprobs_go_into_the_jsonl_output(monkeypatch, capsys, tmp_path, tiny_checkpoint):
    out = tmp_path / "out.jsonl"
    args = ("generate", "-m", str(tiny_checkpoint), "-p", "话说天下", "-n", "6", "--ignore-eos", "--logprobs", "3")
    code, _, err = run(monkeypatch, capsys, *args, "-o", str(out))
    assert code == 0, err
    (record,) = [json.loads(line) for line in out.read_text(encoding="utf-8").splitlines()]
    steps = record["logprobs"]
    assert len(steps) == record["new_tokens"] == 6
    for step in steps:
        assert step["logprob"] <= 0 and len(step["top"]) == 3
        values = [alt["logprob"] for alt in step["top"]]
        assert values == sorted(values, reverse=True) and step["logprob"] <= values[0] + 1e-6
    assert "".join(step["text"] for step in steps) == record["text"]
    # without --output the records print as JSONL
    code, printed, _ = run(monkeypatch, capsys, *args)
    assert code == 0 and json.loads(printed)["logprobs"] == steps


def test_beam_search_from_the_cli_matches_the_library(monkeypatch, capsys, tmp_path, tiny_checkpoint):
    from cpm_infer.backends import load_backend
    from cpm_infer.config import GenerationConfig
    from cpm_infer.engine.generate import generate
    from cpm_infer.prompts import plain_prompt

    out = tmp_path / "beams.jsonl"
    code, _, err = run(
        monkeypatch, capsys, "generate", "-m", str(tiny_checkpoint), "-p", "滚滚长江", "-n", "8",
        "--num-beams", "3", "--num-return-sequences", "2", "--length-penalty", "0.5", "--early-stopping",
        "--no-repeat-ngram-size", "2", "-o", str(out),
    )  # fmt: skip
    assert code == 0, err
    rows = [json.loads(line) for line in out.read_text(encoding="utf-8").splitlines()]
    backend, tok = load_backend("torch", tiny_checkpoint)
    config = GenerationConfig(
        temperature=0, max_new_tokens=8, num_beams=3, num_return_sequences=2, length_penalty=0.5,
        early_stopping=True, no_repeat_ngram_size=2,
    )  # fmt: skip
    want = generate(backend, [plain_prompt(tok, "滚滚长江")], config, tok)
    assert [(r["sample"], r["text"]) for r in rows] == [(w.sample_index, w.text) for w in want]
    assert rows[0]["score"] >= rows[1]["score"]


def test_penalties_change_the_output(monkeypatch, capsys, tiny_checkpoint):
    base = ("generate", "-m", str(tiny_checkpoint), "-p", "话说天下", "-n", "20", "-t", "0", "--ignore-eos")
    plain = run(monkeypatch, capsys, *base)[1]
    no_repeat = run(monkeypatch, capsys, *base, "--no-repeat-ngram-size", "1")[1]
    assert no_repeat != plain
    assert run(monkeypatch, capsys, *base, "--presence-penalty", "2", "--frequency-penalty", "1")[0] == 0


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("--num-beams", "0"), "num_beams must be >= 1 (1 = off), got 0"),
        (("--num-beams", "2", "-t", "0.7"), "cannot combine with --temperature"),
        (("--num-beams", "2", "--top-p", "0.5"), "cannot combine with --top-p"),
        (("--num-beams", "2", "--num-return-sequences", "3"), "num_return_sequences must be between 1 and num_beams"),
        (("--num-beams", "2", "--stream"), "--stream cannot show beam search"),
        (("--num-beams", "2", "--num-samples", "2"), "use num_return_sequences"),
        (("--num-beams", "2", "--logprobs", "2"), "logprobs is not supported with beams"),
        (("--presence-penalty", "-3"), "presence_penalty must be between -2 and 2"),
        (("--frequency-penalty", "2.5"), "frequency_penalty must be between -2 and 2"),
        (("--no-repeat-ngram-size", "-1"), "no_repeat_ngram_size must be >= 0"),
        (("--logprobs", "21"), "logprobs must be between 0 and 20"),
    ],
)
def test_bad_engine_values_are_one_line_errors(monkeypatch, capsys, tiny_checkpoint, args, message):
    code, _, err = run(monkeypatch, capsys, "generate", "-m", str(tiny_checkpoint), "-p", "x", *args)
    assert code == 1
    assert message in err and err.count("\n") == 1 and err.startswith("error: ")
