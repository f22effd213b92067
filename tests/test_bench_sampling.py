"""cpm bench --sampling (greedy, the CLI defaults, given settings) and a terminal table that never cuts a number."""

from __future__ import annotations

import io
import json

import pytest
from conftest import run_cli as _cli

from cpm_infer.bench import harness, report
from cpm_infer.bench.runners import GREEDY, parse_sampling
from cpm_infer.errors import CpmError


def test_sampling_modes_parse_and_validate():
    assert parse_sampling("greedy") is GREEDY and GREEDY.greedy
    default = parse_sampling("default")
    assert dict(default.settings) == {"temperature": 1.0, "top_p": 0.9}
    assert "the CLI defaults" in default.describe()
    custom = parse_sampling("temperature=0.7, top_k=50,presence_penalty=0.5")
    assert custom.label == "temperature=0.7,top_k=50,presence_penalty=0.5"
    assert custom.config(8).top_k == 50 and custom.config(8).max_new_tokens == 8
    for bad, says in (("top_q=1", "key=value"), ("top_p=x", "must be a number"), ("top_p=2", "top_p must be")):
        with pytest.raises(CpmError, match=says):
            parse_sampling(bad)


def _m(backend, sampling, decode, batch=1):
    return harness.Measurement(
        backend, batch, 16, 8, "base", 40.0, decode, decode, decode, 100.0, 50.0, None, 1, sampling=sampling
    )


def test_ratio_to_greedy_and_baseline_per_sampling_mode():
    rows = report.with_ratios(
        [
            _m("hf-generate", "greedy", 10.0),
            _m("hf-generate", "default", 12.5),
            _m("ort", "greedy", 2.0),
            _m("ort", "default", 2.2),
        ]
    )
    by = {(r["backend"], r["sampling"]): r for r in rows}
    assert by[("ort", "default")]["vs_greedy"] == pytest.approx(1.1)
    assert by[("ort", "greedy")]["vs_greedy"] is None
    assert by[("ort", "default")]["decode_speedup"] == pytest.approx(12.5 / 2.2)  # against hf sampling too
    assert [c[0] for c in report.columns_for(rows)][:2] == ["backend", "sampling"]
    greedy_only = report.with_ratios([_m("ort", "greedy", 2.0)])
    assert "sampling" not in [c[0] for c in report.columns_for(greedy_only)]


@pytest.mark.parametrize("width", [40, 60, 80, 120, 200])
def test_terminal_table_never_cuts_a_value(width):
    from rich.console import Console

    rows = report.with_ratios(
        [
            _m("hf-generate", "greedy", 22.123456),
            _m("ort:model-int4-optimized", "temperature=0.7,top_k=50", 2.345678),
            _m("ort:model-int4-optimized", "greedy", 1.5),
        ]
    )
    out = io.StringIO()
    console = Console(file=out, width=width, force_terminal=False, color_system=None)
    console.print(report.terminal_table(rows, width=width))
    text = out.getvalue()
    assert "…" not in text
    assert max(len(line) for line in text.splitlines()) <= width
    for key, _, fmt in report.columns_for(rows):
        for row in rows:
            assert report._cell(row, key, fmt) in text, (key, width)


def test_cli_measures_each_sampling_mode_and_says_which(monkeypatch, capsys, tmp_path, tiny_checkpoint):
    out = tmp_path / "bench"
    code, stdout, err = _cli(
        monkeypatch, capsys, "bench", "-m", str(tiny_checkpoint), "--backends", "hf,torch", "--new-tokens", "4",
        "--context", "", "--repeats", "1", "--sampling", "greedy", "--sampling", "default",
        "--sampling", "temperature=0.8,presence_penalty=0.5", "-o", str(out),
    )  # fmt: skip
    assert code == 0, err
    data = json.loads((out / "bench.json").read_text())
    got = {(r["backend"], r["sampling"]) for r in data["results"]}
    custom = "temperature=0.8,presence_penalty=0.5"
    assert got == {("hf-generate", "greedy"), ("hf-generate", "default"), ("torch", "greedy"), ("torch", "default"),
                   ("torch", custom)}  # fmt: skip
    assert f"hf-generate ({custom})" in data["skipped"]  # transformers has no presence penalty
    assert data["environment"]["sampling"]["default"] == "temperature 1.0, top_p 0.9 (the CLI defaults)"
    md = (out / "bench.md").read_text()
    assert "`default` = temperature 1.0, top_p 0.9 (the CLI defaults)" in md and "x greedy" in md
    assert "x greedy" in stdout and "…" not in stdout
