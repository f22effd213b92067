"""`cpm serve --draft`: speculative decoding behind the HTTP API. Greedy answers equal a server without a draft
(prompt lookup and a model draft), a request opts out with ``"speculative": false``, the speculation counters in
/metrics only grow (also across a new engine after a failed step), and a bad ``--draft`` is a one-line error."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from conftest import make_tiny_model, run_cli

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")

from test_serve import request

from cpm_infer.backends import load_backend
from cpm_infer.config import ConfigError
from cpm_infer.serve.app import create_app
from cpm_infer.serve.server import BackgroundServer
from cpm_infer.serve.settings import ServeSettings

BASE = {"max_batch": 4, "batch_wait_ms": 0, "max_new_tokens_cap": 64, "timeout_s": 60}
TEXT = "话说天下大势，分久必合，合久必分。周末七国分争，并入于秦。及秦灭之后，楚、汉分争，又并入于汉。"
PROMPTS = [TEXT + "话说天下大势", "滚滚长江东逝水，浪花淘尽英雄。是非成败转头空。滚滚长江", "汉朝自高祖斩白蛇而起义"]
GREEDY = {"temperature": 0, "max_tokens": 24}
PASSES = "cpm_speculation_verify_passes_total"


def server(checkpoint: Path, **settings) -> BackgroundServer:
    """A server (not started yet) over its own copy of the checkpoint; ``srv.app`` is its app."""
    backend, tok = load_backend("torch", checkpoint)
    app = create_app(backend, tok, ServeSettings(**{**BASE, **settings}), warmup=False)
    srv = BackgroundServer(app)
    srv.app = app
    return srv


def metric(srv, name: str) -> float | None:
    import urllib.request

    with urllib.request.urlopen(srv.url + "/metrics", timeout=30) as response:
        text = response.read().decode()
    found = re.search(rf"^{name} (\S+)$", text, re.MULTILINE)
    return float(found.group(1)) if found else None


def complete(srv, body: dict) -> dict:
    status, answer = request(srv, "POST", "/v1/completions", body)
    assert status == 200, answer
    return answer


def greedy_texts(srv) -> list[str]:
    return [complete(srv, {"prompt": p, **GREEDY})["choices"][0]["text"] for p in PROMPTS]


@pytest.fixture(scope="module")
def plain_texts(tiny_checkpoint) -> list[str]:
    with server(tiny_checkpoint) as srv:
        assert metric(srv, PASSES) is None  # no draft: no speculation counters
        return greedy_texts(srv)


@pytest.fixture(scope="module")
def other_vocabulary(tmp_path_factory, tiny_vocab) -> Path:
    """A checkpoint with the tiny tokenizer but a wider output layer (8 more logits)."""
    from cpm_infer.tokenizer import CpmTokenizer
    from cpm_infer.torch_model import save_checkpoint

    tok = CpmTokenizer(tiny_vocab)
    model = make_tiny_model(tok.vocab_size + 8, eod_id=tok.eod_id, pad_id=tok.pad_id)
    return save_checkpoint(model, tiny_vocab, tmp_path_factory.mktemp("wide") / "wide")


# -- the answers are the target's -------------------------------------------------------------------------------
@pytest.mark.parametrize("draft", ["ngram", "model"])
def test_greedy_answers_equal_a_server_without_a_draft(tiny_checkpoint, plain_texts, draft):
    spec = "ngram" if draft == "ngram" else str(tiny_checkpoint)
    with server(tiny_checkpoint, draft=spec, draft_tokens=3) as srv:
        assert greedy_texts(srv) == plain_texts
        passes, proposed = metric(srv, PASSES), metric(srv, "cpm_speculation_proposed_tokens_total")
        accepted = metric(srv, "cpm_speculation_accepted_tokens_total")
        emitted = metric(srv, "cpm_speculation_emitted_tokens_total")
        assert passes > 0 and 0 <= accepted <= proposed and passes <= emitted <= accepted + passes
        if draft == "model":  # the target as its own draft: every proposal is accepted
            assert accepted == proposed > 0
        status, info = request(srv, "GET", "/info")
        assert status == 200 and info["limits"]["draft"] == spec and info["limits"]["draft_tokens"] == 3
        assert info["speculation"]["draft"] == spec and info["speculation"]["passes"] == passes


# -- the opt-out and the counters --------------------------------------------------------------------------------
def test_a_request_opts_out_and_the_counters_only_grow(tiny_checkpoint, plain_texts):
    with server(tiny_checkpoint, draft=str(tiny_checkpoint)) as srv:
        assert metric(srv, PASSES) == 0
        off = complete(srv, {"prompt": PROMPTS[0], **GREEDY, "speculative": False})
        assert off["choices"][0]["text"] == plain_texts[0]
        assert metric(srv, PASSES) == 0  # opted out: no verify pass
        on = complete(srv, {"prompt": PROMPTS[0], **GREEDY})
        assert on["choices"][0]["text"] == plain_texts[0]
        first = metric(srv, PASSES)
        assert first > 0
        complete(srv, {"prompt": PROMPTS[1], **GREEDY, "speculative": True})
        second = metric(srv, PASSES)
        assert second > first

        status, body = request(srv, "POST", "/v1/completions", {"prompt": "x", "speculative": "no"})
        assert status == 400 and body["error"]["param"] == "speculative"

        # A failed step: the scheduler makes a new engine, which counts on from the same totals.
        scheduler = srv.app.state.scheduler
        broken = scheduler.engine

        def fail() -> list:
            raise RuntimeError("injected failure")

        broken.step = fail
        status, body = request(srv, "POST", "/v1/completions", {"prompt": PROMPTS[2], **GREEDY})
        assert status == 500 and "injected failure" in body["error"]["message"]
        assert scheduler.engine is not broken and scheduler.engine.speculation is scheduler.speculation
        assert metric(srv, PASSES) == second
        assert complete(srv, {"prompt": PROMPTS[2], **GREEDY})["choices"][0]["text"] == plain_texts[2]
        assert metric(srv, PASSES) > second


def test_the_request_field_is_documented_in_the_schema(tiny_checkpoint):
    with server(tiny_checkpoint) as srv:
        status, schema = request(srv, "GET", "/openapi.json")
    assert status == 200
    field = schema["components"]["schemas"]["CompletionRequest"]["properties"]["speculative"]
    assert field["type"] == "boolean" and field["default"] is True and "draft" in field["description"]


# -- bad drafts: one-line errors --------------------------------------------------------------------------------
def one_line_error(err: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in err, err
    return lines[0]


def test_a_missing_draft_is_a_one_line_error(monkeypatch, capsys, tiny_checkpoint):
    import cpm_infer.serve.app as app_module

    def never(*args, **kwargs):
        raise AssertionError("the model was loaded")

    monkeypatch.setattr(app_module, "load_app", never)  # refused before any model loads
    code, _, err = run_cli(
        monkeypatch, capsys, "serve", "--model", str(tiny_checkpoint), "--port", "0", "--draft", "/nonexistent"
    )
    assert code == 1
    assert "draft model not found: /nonexistent" in one_line_error(err)


def test_a_draft_with_another_vocabulary_is_a_one_line_error(
    monkeypatch, capsys, tiny_checkpoint, tiny_vocab, other_vocabulary
):
    from cpm_infer.tokenizer import CpmTokenizer

    vocab = CpmTokenizer(tiny_vocab).vocab_size
    args = ["serve", "--model", str(tiny_checkpoint), "--port", "0", "--no-warmup", "--draft", str(other_vocabulary)]
    code, _, err = run_cli(monkeypatch, capsys, *args)
    assert code == 1
    line = one_line_error(err)
    assert f"vocabulary of {vocab + 8} tokens, the target {vocab}" in line, line


def test_a_target_that_cannot_verify_is_a_one_line_error(monkeypatch, capsys, tiny_checkpoint):
    """A TensorRT engine cannot verify several tokens in one pass: stood in for by a backend without ``extend_all``."""
    import cpm_infer.backends as backends

    real = backends.load_backend
    closed = []

    class NoVerify:
        name = "trt"

        def __init__(self, inner) -> None:
            self.spec, self.inner = inner.spec, inner

        def close(self) -> None:
            closed.append(True)
            self.inner.close()

    def load(name, path, **kwargs):
        backend, tok = real(name, path, **kwargs)
        return NoVerify(backend), tok

    monkeypatch.setattr(backends, "load_backend", load)
    code, _, err = run_cli(
        monkeypatch, capsys, "serve", "--model", str(tiny_checkpoint), "--port", "0", "--draft", "ngram"
    )
    assert code == 1 and closed
    assert "trt backend cannot verify several tokens" in one_line_error(err)
    backend, tok = real("torch", tiny_checkpoint)
    with pytest.raises(ConfigError, match="cannot verify"):
        create_app(NoVerify(backend), tok, ServeSettings(draft="ngram"))


def test_the_flags_reach_the_settings(monkeypatch, capsys, tiny_checkpoint):
    import cpm_infer.cli.serve as serve_cli

    got = {}
    monkeypatch.setattr(serve_cli, "_serve_here", lambda config, *args: got.setdefault("config", config))
    args = ["serve", "--model", str(tiny_checkpoint), "--draft", "ngram", "--draft-tokens", "6"]
    assert run_cli(monkeypatch, capsys, *args)[0] == 0
    assert got["config"].settings.draft == "ngram" and got["config"].settings.draft_tokens == 6
    code, _, err = run_cli(monkeypatch, capsys, "serve", "--model", str(tiny_checkpoint), "--draft-tokens", "0")
    assert code == 2 and "--draft-tokens" in err
    with pytest.raises(ConfigError, match="draft must be a model directory"):
        ServeSettings(draft=" ")


def test_ray_build_arguments_take_the_draft():
    pytest.importorskip("ray.serve")
    from cpm_infer.serve.ray_app import parse_build_args

    config, _ = parse_build_args({"model": "m", "draft": "ngram", "draft_tokens": "3"}, {})
    assert config.settings.draft == "ngram" and config.settings.draft_tokens == 3
    config, _ = parse_build_args({"model": "m"}, {"CPM_SERVE_DRAFT": "/models/int4"})
    assert config.settings.draft == "/models/int4"
    with pytest.raises(ConfigError, match="draft tokens must be <= 16"):
        parse_build_args({"model": "m", "draft_tokens": 17}, {})


def test_warmup_runs_a_speculative_step_and_counts_nothing():
    """The server's warm-up also warms the draft and the verify pass; /metrics then counts requests only."""
    from test_engine import HashTok
    from test_speculative import VerifyingBackend

    from cpm_infer.engine.speculative import ModelDraft
    from cpm_infer.serve.scheduler import Scheduler

    scheduler = Scheduler(VerifyingBackend(), HashTok(), ServeSettings(), draft=ModelDraft(VerifyingBackend()))
    speculated = []
    step = scheduler.engine._speculate
    scheduler.engine._speculate = lambda row, events: speculated.append(step(row, events)) or speculated[-1]
    scheduler.warmup()
    assert speculated[: scheduler.engine.plain_step.warm] == [False] * scheduler.engine.plain_step.warm
    assert True in speculated  # after the plain steps that time the model
    assert scheduler.speculation.passes == scheduler.speculation.proposed == 0
