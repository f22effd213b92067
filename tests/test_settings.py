"""The settings declaration (cpm_infer.settings) reaches every front door it names: `cpm generate` and `cpm batch`
options, the server's request schema (with its OpenAPI ranges) and request -> config, `cpm bench --sampling`;
and the processors of the newest settings (min_p, logit_bias) do what they say."""

from __future__ import annotations

import json

import numpy as np
import pytest
from conftest import run_cli

from cpm_infer.cli import gen_options
from cpm_infer.config import ConfigError, GenerationConfig
from cpm_infer.engine import processors
from cpm_infer.errors import CpmError
from cpm_infer.settings import SETTINGS, Setting, for_door

VOCAB = 30000


def probe(s: Setting):
    """A valid value of ``s`` other than its default (and its beam value)."""
    if s.kind == "bool":
        return not s.default
    if s.kind == "ids":
        return (3,)
    if s.kind == "strings":
        return ("。",)
    if s.kind == "bias":
        return ((3, 1.5),)
    if s.kind == "int":
        return (s.default if s.default is not None else s.range.ge or 0) + 1 + (s.name == "num_return_sequences")
    step = 0.05 if s.range.contains(s.default + 0.05) else -0.05
    return round(s.default + step, 4)


def cli_args(s: Setting, value) -> list[str]:
    if s.kind == "bool":
        on, _, off = s.cli_flag.partition("/")
        return [on if value else (off or "--no-" + on[2:])]
    if s.kind in ("ids", "strings"):
        return [a for v in value for a in (s.cli_flag, str(v))]
    if s.kind == "bias":
        return [a for i, b in value for a in (s.cli_flag, f"{i}={b}")]
    return [s.cli_flag, str(value)]


def config_with(s: Setting, value) -> GenerationConfig:
    beams = {"num_beams": 3, "temperature": 0.0} if s.name == "num_return_sequences" else {}
    return GenerationConfig(**{s.name: value, **beams})


@pytest.mark.parametrize("door", ["generate", "batch"])
@pytest.mark.parametrize("setting", SETTINGS, ids=[s.name for s in SETTINGS])
def test_each_cli_setting_reaches_the_config(monkeypatch, capsys, tmp_path, door, setting):
    if door not in setting.doors:
        return
    captured = {}

    def capture(self, **fixed):
        captured.update(self.given)
        raise CpmError("captured")

    monkeypatch.setattr(gen_options.GenOptions, "config", capture)
    value = probe(setting)
    base = ["generate", "-p", "x"] if door == "generate" else ["batch", str(tmp_path / "in.txt"), "-o", str(tmp_path)]
    code, _, err = run_cli(monkeypatch, capsys, *base, *cli_args(setting, value))
    assert code == 1 and "captured" in err, err
    given = captured[setting.name]
    if setting.kind == "bias":
        given = gen_options.parse_bias(given)
    elif setting.kind in ("ids", "strings"):
        given = tuple(given)
    assert given == value
    monkeypatch.undo()
    if setting.name == "num_return_sequences":
        captured["num_beams"] = 3
    assert getattr(gen_options.GenOptions(captured).config(), setting.name) == value


@pytest.mark.parametrize("door", ["generate", "batch"])
def test_help_lists_every_setting_of_the_door(monkeypatch, capsys, door):
    monkeypatch.setenv("COLUMNS", "250")
    code, out, _ = run_cli(monkeypatch, capsys, door, "--help")
    assert code == 0
    for setting in for_door(door):
        assert setting.cli_flag.split("/")[0] in out, setting.name


def test_each_serving_setting_is_a_request_field_with_its_range():
    from cpm_infer.serve.completions import request_config
    from cpm_infer.serve.schemas import completion_request_model
    from cpm_infer.serve.settings import ServeSettings

    settings = ServeSettings()
    model = completion_request_model(settings, VOCAB)
    props = model.model_json_schema()["properties"]
    names = {"ge": "minimum", "gt": "exclusiveMinimum", "le": "maximum", "lt": "exclusiveMaximum"}
    for s in for_door("serve"):
        assert s.api_name in props, s.name
        schema = json.dumps(props[s.api_name])
        for key, bound in (s.api_range or s.range).pydantic().items():
            if s.name not in ("max_new_tokens", "num_samples"):  # the server's caps narrow these
                assert f'"{names[key]}": {bound}' in schema.replace(".0,", ",").replace(".0}", "}"), (s.name, schema)
        value = probe(s)
        body = {"prompt": "x", s.api_name: _api_value(s, value)}
        if s.name == "num_samples":
            value = min(value, settings.max_samples)
            body[s.api_name] = value
        config = request_config(model.model_validate(body), settings)
        assert getattr(config, s.name) == value, s.name


def _api_value(s: Setting, value):
    if s.kind == "bias":
        return {str(i): b for i, b in value}
    if s.kind in ("ids", "strings"):
        return list(value)
    return value


def test_each_bench_setting_parses_into_the_config():
    from cpm_infer.bench.runners import parse_sampling

    for s in for_door("bench"):
        value = probe(s)
        assert getattr(parse_sampling(f"{s.name}={value}").config(4), s.name) == value, s.name


def test_config_checks_come_from_the_declaration():
    for s in SETTINGS:
        if s.numeric and s.range.pydantic():
            bad = (s.range.ge if s.range.ge is not None else s.range.gt) - 1
            with pytest.raises(ConfigError, match=s.name):
                GenerationConfig(**{s.name: int(bad) if s.kind == "int" else float(bad)})
    with pytest.raises(ConfigError, match="logit_bias"):
        GenerationConfig(logit_bias=((3, 101.0),))


def test_min_p_keeps_tokens_within_the_ratio_of_the_top_one():
    row = np.log(np.array([0.5, 0.3, 0.1, 0.06, 0.04], dtype=np.float32))
    (min_p,) = processors.build_warpers(GenerationConfig(min_p=0.2))
    min_p(row)
    assert np.isfinite(row).tolist() == [True, True, True, False, False]  # 0.06 < 0.2 * 0.5
    assert not processors.build_warpers(GenerationConfig())  # built only where it changes something
    assert not processors.build_warpers(GenerationConfig(min_p=0.5, temperature=0))  # greedy rows have none


def test_logit_bias_adds_and_minus_100_bans():
    ctx = processors.RowContext(6, np.array([], dtype=np.int64), eos=5)
    config = GenerationConfig(logit_bias={1: 2.0, 2: -100, 40: 5.0})  # ids outside the logits are ignored
    row = np.zeros(6, dtype=np.float32)
    processors.apply(processors.build(config, [0], [], ctx), row)
    assert row.tolist() == [0, 2.0, -np.inf, 0, 0, 0]
    assert config.logit_bias == ((1, 2.0), (2, -100.0), (40, 5.0))


def test_logit_bias_from_the_cli_changes_greedy_output(monkeypatch, capsys, tiny_checkpoint):
    def greedy(*extra):
        code, out, err = run_cli(
            monkeypatch, capsys, "generate", "-m", str(tiny_checkpoint), "-p", "话说", "-n", "4", "-t", "0",
            "--logprobs", "0", *extra,
        )  # fmt: skip
        assert code == 0, err
        return json.loads(out)["logprobs"]

    first = greedy()[0]["token_id"]
    banned = [step["token_id"] for step in greedy("--logit-bias", f"{first}=-100")]
    assert first not in banned
    code, _, err = run_cli(monkeypatch, capsys, "generate", "-m", str(tiny_checkpoint), "-p", "x", "--logit-bias", "3")
    assert code == 1 and "--logit-bias takes ID=BIAS" in err


def test_typical_p_keeps_what_transformers_keeps():
    import torch
    from transformers import TypicalLogitsWarper

    rng = np.random.default_rng(0)
    for mass in (0.2, 0.5, 0.9, 0.99):
        for _ in range(20):
            row = (rng.standard_normal(300) * 3).astype(np.float32)
            (ours,) = processors.build_warpers(GenerationConfig(typical_p=mass))
            got = row.copy()
            ours(got)
            want = TypicalLogitsWarper(mass)(None, torch.from_numpy(row[None].copy()))[0].numpy()
            assert (np.isfinite(got) == np.isfinite(want)).all(), mass


def test_stop_token_ids_end_a_row_after_the_token():
    from test_engine import HashBackend, HashTok

    from cpm_infer.engine.generate import generate

    config = GenerationConfig(max_new_tokens=12, temperature=0, ignore_eos=True)
    (free,) = generate(HashBackend(), [[1, 2, 3]], config, HashTok())
    stop_at = free.token_ids[3]
    (stopped,) = generate(HashBackend(), [[1, 2, 3]], config.replace(stop_token_ids=(stop_at,)), HashTok())
    first = free.token_ids.index(stop_at)
    assert stopped.token_ids == free.token_ids[: first + 1] and stopped.finish_reason == "stop"
    with pytest.raises(ConfigError, match="stop_token_ids is not supported with beams"):
        GenerationConfig(num_beams=2, temperature=0, stop_token_ids=(3,))
