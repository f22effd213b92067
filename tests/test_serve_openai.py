"""`cpm serve` driven by the unmodified OpenAI Python client (and raw HTTP where the client cannot go): a real
server on a loopback port, the client pointed at it with no retries. Answers are checked against generating
alone in the test process."""

from __future__ import annotations

import http.client
import json

import pytest

pytest.importorskip("fastapi")

import openai
from prometheus_client import parser

from cpm_infer.backends import load_backend
from cpm_infer.config import GenerationConfig
from cpm_infer.engine.generate import generate
from cpm_infer.serve.app import create_app
from cpm_infer.serve.server import BackgroundServer
from cpm_infer.serve.settings import ServeSettings

SETTINGS = ServeSettings(max_batch=8, batch_wait_ms=5, queue_size=32, max_new_tokens_cap=64, timeout_s=30)
SAMPLING = {"temperature": 0.9, "top_p": 0.95, "max_tokens": 12}
MODEL = "tiny"


def client_for(srv: BackgroundServer, api_key: str = "unused") -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{srv.url}/v1", api_key=api_key, max_retries=0, timeout=60)


def raw(srv, method: str, path: str, body: bytes | None = None, headers: dict | None = None):
    conn = http.client.HTTPConnection(srv.host, srv.port, timeout=30)
    try:
        conn.request(method, path, body, {"Content-Type": "application/json", **(headers or {})})
        resp = conn.getresponse()
        return resp.status, dict(resp.getheaders()), resp.read()
    finally:
        conn.close()


@pytest.fixture(scope="module")
def reference(tiny_checkpoint):
    return load_backend("torch", tiny_checkpoint)


@pytest.fixture(scope="module")
def server(tiny_checkpoint):
    backend, tok = load_backend("torch", tiny_checkpoint)
    with BackgroundServer(create_app(backend, tok, SETTINGS, model_name=MODEL, warmup=False)) as srv:
        yield srv


@pytest.fixture(scope="module")
def client(server):
    return client_for(server)


def alone(reference, prompt: str | list[int], seed: int, **changes) -> object:
    """What generating this prompt alone gives, with SAMPLING's settings."""
    backend, tok = reference
    ids = tok.encode(prompt) if isinstance(prompt, str) else prompt
    config = GenerationConfig(temperature=0.9, top_p=0.95, max_new_tokens=12, seed=seed).replace(**changes)
    return generate(backend, [ids], config, tok)


def test_plain_completion_equals_generating_alone(client, reference):
    got = client.completions.create(model=MODEL, prompt="话说天下大势", seed=7, **SAMPLING)
    want = alone(reference, "话说天下大势", 7)[0]
    assert got.object == "text_completion" and got.model == MODEL and got.id.startswith("cmpl-")
    assert [c.text for c in got.choices] == [want.text]
    assert got.choices[0].finish_reason == ("length" if want.finish_reason == "length" else "stop")
    assert got.usage.prompt_tokens == want.prompt_tokens
    assert got.usage.completion_tokens == len(want.token_ids)
    assert got.usage.total_tokens == want.prompt_tokens + len(want.token_ids)


def test_n_with_a_seed_is_reproducible(client, reference):
    first = client.completions.create(model=MODEL, prompt="滚滚长江", n=3, seed=11, **SAMPLING)
    again = client.completions.create(model=MODEL, prompt="滚滚长江", n=3, seed=11, **SAMPLING)
    assert [c.index for c in first.choices] == [0, 1, 2]
    assert [c.text for c in first.choices] == [c.text for c in again.choices]
    want = alone(reference, "滚滚长江", 11, num_samples=3)
    assert [c.text for c in first.choices] == [r.text for r in want]
    assert len({c.text for c in first.choices}) > 1  # n samples, not n copies


def test_a_list_of_prompts_gets_n_choices_each_in_order(client, reference):
    backend, tok = reference
    prompts = ["话说天下大势", "白发渔樵"]
    got = client.completions.create(model=MODEL, prompt=prompts, n=2, seed=3, **SAMPLING)
    assert [c.index for c in got.choices] == [0, 1, 2, 3]
    config = GenerationConfig(temperature=0.9, top_p=0.95, max_new_tokens=12, num_samples=2, seed=3)
    want = generate(backend, [tok.encode(p) for p in prompts], config, tok)  # rows seeded by (seed, prompt, sample)
    assert [c.text for c in got.choices] == [r.text for r in want]
    assert got.usage.prompt_tokens == sum(len(tok.encode(p)) for p in prompts)
    # Token ids are prompts too (one list, or a list of lists).
    ids = tok.encode(prompts[0])
    by_ids = client.completions.create(model=MODEL, prompt=ids, seed=3, **SAMPLING)
    assert by_ids.choices[0].text == want[0].text


def test_stop_cuts_the_text_before_the_stop_string(client):
    greedy = {"temperature": 0, "max_tokens": 24}
    full = client.completions.create(model=MODEL, prompt="话说", **greedy).choices[0]
    stop = full.text[len(full.text) // 2 :][:2]
    assert stop.strip(), full.text
    cut = client.completions.create(model=MODEL, prompt="话说", stop=[stop, "不会出现的字符串"], **greedy).choices[0]
    assert cut.text == full.text[: full.text.index(stop)] and cut.finish_reason == "stop"


def test_streaming_text_equals_the_non_streaming_text(client):
    settings = {"model": MODEL, "prompt": ["青山依旧在", "古今多少事"], "n": 2, "seed": 5, **SAMPLING}
    whole = client.completions.create(**settings)
    chunks = list(client.completions.create(stream=True, stream_options={"include_usage": True}, **settings))
    texts = [""] * 4
    reasons = [None] * 4
    for chunk in chunks[:-1]:
        assert chunk.object == "text_completion" and chunk.id == chunks[0].id and chunk.usage is None
        for choice in chunk.choices:
            texts[choice.index] += choice.text
            reasons[choice.index] = reasons[choice.index] or choice.finish_reason
    assert texts == [c.text for c in whole.choices]
    assert reasons == [c.finish_reason for c in whole.choices]
    assert chunks[-1].choices == [] and chunks[-1].usage == whole.usage
    # Without include_usage the last chunk still carries the usage (every answer has it).
    plain = list(client.completions.create(stream=True, **settings))
    assert plain[-1].usage == whole.usage and plain[-1].choices


def test_echo_puts_the_prompt_before_the_completion(client):
    got = client.completions.create(model=MODEL, prompt="白发渔樵", echo=True, seed=1, **SAMPLING)
    plain = client.completions.create(model=MODEL, prompt="白发渔樵", seed=1, **SAMPLING)
    assert got.choices[0].text == "白发渔樵" + plain.choices[0].text
    chunks = list(client.completions.create(model=MODEL, prompt="白发渔樵", echo=True, seed=1, stream=True, **SAMPLING))
    assert "".join(c.choices[0].text for c in chunks) == got.choices[0].text


def test_logprobs_in_openais_shape(client, reference):
    backend, tok = reference
    got = client.completions.create(model=MODEL, prompt="话说", logprobs=3, seed=2, **SAMPLING).choices[0]
    config = GenerationConfig(temperature=0.9, top_p=0.95, max_new_tokens=12, seed=2, logprobs=3)
    want = generate(backend, [tok.encode("话说")], config, tok)[0].logprobs
    lp = got.logprobs
    assert lp.tokens == [step.token_text for step in want] and len(lp.tokens) == len(want) > 0
    assert lp.token_logprobs == pytest.approx([step.logprob for step in want])
    assert all(x <= 0 for x in lp.token_logprobs)
    for top, step in zip(lp.top_logprobs, want, strict=True):
        assert step.token_text in top and 1 <= len(top) <= 4  # the 3 most likely, plus the chosen one
    assert lp.text_offset == [sum(len(t) for t in lp.tokens[:i]) for i in range(len(lp.tokens))]
    # Streamed: the same tokens and log-probabilities, chunk by chunk.
    chunks = client.completions.create(model=MODEL, prompt="话说", logprobs=3, seed=2, stream=True, **SAMPLING)
    streamed = [t for c in chunks for ch in c.choices if ch.logprobs for t in ch.logprobs.tokens]
    assert streamed == lp.tokens


def test_echo_with_logprobs_and_max_tokens_0_scores_the_prompt_as_transformers(client, tiny_checkpoint):
    import torch
    from transformers import GPT2LMHeadModel

    from cpm_infer.tokenizer import CpmTokenizer

    tok = CpmTokenizer(tiny_checkpoint / "spiece.model")
    ids = tok.encode("却说曹操引兵")
    model = GPT2LMHeadModel.from_pretrained(tiny_checkpoint).eval()
    with torch.no_grad():
        want = torch.log_softmax(model(torch.tensor([ids])).logits[0].double(), -1)
    got = client.completions.create(model=MODEL, prompt="却说曹操引兵", echo=True, logprobs=2, max_tokens=0)
    (choice,) = got.choices
    lp = choice.logprobs
    assert choice.text == "却说曹操引兵" and got.usage.completion_tokens == 0 and len(lp.tokens) == len(ids)
    assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None and lp.text_offset[0] == 0
    expected = [float(want[t - 1, ids[t]]) for t in range(1, len(ids))]
    assert lp.token_logprobs[1:] == pytest.approx(expected, abs=1e-4)
    assert all(len(top) >= 2 for top in lp.top_logprobs[1:])
    # with generation: the prompt's entries, then exactly the generated tokens' entries of the same request
    plain = client.completions.create(model=MODEL, prompt="却说曹操引兵", logprobs=2, seed=3, **SAMPLING)
    both = client.completions.create(model=MODEL, prompt="却说曹操引兵", echo=True, logprobs=2, seed=3, **SAMPLING)
    assert both.choices[0].logprobs.token_logprobs == lp.token_logprobs + plain.choices[0].logprobs.token_logprobs
    streamed = list(
        client.completions.create(model=MODEL, prompt="却说曹操引兵", echo=True, logprobs=2, max_tokens=0, stream=True)
    )
    assert streamed[0].choices[0].logprobs.token_logprobs == lp.token_logprobs
    assert streamed[-1].choices[0].finish_reason == "length"
    empty = client.completions.create(model=MODEL, prompt="却说曹操引兵", max_tokens=0)  # without echo: nothing
    assert [c.text for c in empty.choices] == [""] and empty.usage.completion_tokens == 0


def test_penalties_change_the_text_as_generating_alone_does(client, reference):
    backend, tok = reference
    base = {"model": MODEL, "prompt": "话说天下", "seed": 4, "temperature": 0, "max_tokens": 24}
    plain = client.completions.create(**base).choices[0].text
    penalised = client.completions.create(presence_penalty=2, frequency_penalty=2, **base).choices[0].text
    no_repeat = client.completions.create(extra_body={"no_repeat_ngram_size": 1}, **base).choices[0].text
    ids = tok.encode("话说天下")
    greedy = GenerationConfig(temperature=0, max_new_tokens=24)
    assert plain == generate(backend, [ids], greedy, tok)[0].text
    want = generate(backend, [ids], greedy.replace(presence_penalty=2.0, frequency_penalty=2.0), tok)[0]
    assert penalised == want.text and penalised != plain
    unique = generate(backend, [ids], greedy.replace(no_repeat_ngram_size=1), tok)[0]
    assert no_repeat == unique.text and len(set(unique.token_ids) | set(ids)) == len(unique.token_ids) + len(set(ids))


def test_models_and_a_wrong_model_id(client):
    assert [m.id for m in client.models.list().data] == [MODEL]
    assert client.models.retrieve(MODEL).id == MODEL
    with pytest.raises(openai.NotFoundError) as info:
        client.completions.create(model="gpt-3.5-turbo-instruct", prompt="x", max_tokens=2)
    assert info.value.status_code == 404 and info.value.code == "model_not_found" and info.value.param == "model"
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("nope")


@pytest.mark.parametrize(
    ("settings", "param"),
    [
        ({"temperature": 2.5}, "temperature"),
        ({"top_p": 0}, "top_p"),
        ({"max_tokens": 65}, "max_tokens"),
        ({"max_tokens": 10**30}, "max_tokens"),
        ({"n": 0}, "n"),
        ({"n": 9, "prompt": ["a", "b"]}, "n"),
        ({"logprobs": 21}, "logprobs"),
        ({"presence_penalty": 3}, "presence_penalty"),
        ({"seed": -1}, "seed"),
        ({"prompt": []}, "prompt"),
        ({"prompt": [[1, 2], []]}, "prompt"),
        ({"prompt": [10**9]}, "prompt"),
        ({"stop": ["a", "b", "c", "d", "e"]}, "stop"),
        ({"best_of": 3}, None),
        ({"extra_body": {"max_new_tokens": 3}}, None),
        ({"extra_body": {"top_k": -1}}, "top_k"),
    ],
)
def test_bad_values_are_400_in_openais_shape(client, settings, param):
    args = {"model": MODEL, "prompt": "x", **settings}
    with pytest.raises(openai.BadRequestError) as info:
        client.completions.create(**args)
    error = info.value.body
    assert info.value.status_code == 400 and error["type"] == "invalid_request_error" and error["message"]
    assert set(error) == {"message", "type", "param", "code"}
    if param is not None:
        assert error["param"] == param, error


def test_renamed_fields_name_their_new_name(client):
    with pytest.raises(openai.BadRequestError, match='"max_new_tokens" is now called "max_tokens"'):
        client.completions.create(model=MODEL, prompt="x", extra_body={"max_new_tokens": 3})


def test_broken_unicode_is_replaced_not_a_500(server, caplog):
    body = b'{"prompt": "\\ud800\\u8bdd\\udfff", "max_tokens": 2, "echo": true, "seed": 1}'
    status, _, answer = raw(server, "POST", "/v1/completions", body)
    assert status == 200, answer
    assert json.loads(answer)["choices"][0]["text"].startswith("\ufffd话\ufffd")
    assert "lone surrogate" in caplog.text and "prompt" in caplog.text
    status, _, answer = raw(server, "POST", "/v1/completions", b'{"prompt": "\xff\xfe\xe8\xaf", "max_tokens": 2}')
    assert status == 200, answer
    status, _, answer = raw(server, "POST", "/zuowen", b'{"title": "\\udc80", "max_len": 5}')
    assert status == 200 and json.loads(answer)["title"] == "\ufffd"


def test_405_names_the_allowed_methods(server):
    status, headers, answer = raw(server, "PUT", "/v1/completions", b"{}")
    assert status == 405 and headers["allow"] == "POST" and json.loads(answer)["error"]["code"] == "method_not_allowed"
    status, headers, _ = raw(server, "DELETE", "/zuowen")
    assert status == 405 and set(headers["allow"].split(", ")) == {"GET", "POST"}


def test_the_openapi_schema_states_the_limits(server):
    _, _, body = raw(server, "GET", "/openapi.json")
    schema = json.loads(body)
    request = schema["components"]["schemas"]["CompletionRequest"]
    props = request["properties"]
    assert {"maximum": 64, "minimum": 0, "type": "integer"} in props["max_tokens"]["anyOf"]  # 0: scoring
    assert {"maximum": 2, "minimum": 0, "type": "number"} in props["temperature"]["anyOf"]
    assert request["additionalProperties"] is False and len(request["oneOf"]) == 2
    responses = schema["paths"]["/v1/completions"]["post"]["responses"]
    assert {"200", "400", "404", "413", "500", "503", "504"} <= set(responses) and "422" not in json.dumps(schema)
    assert "text/event-stream" in responses["200"]["content"]


def _counts(srv, api_key: str | None = None) -> dict[tuple[str, str, str], float]:
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    status, _, text = raw(srv, "GET", "/metrics", headers=headers)
    assert status == 200
    families = {f.name: f for f in parser.text_string_to_metric_families(text.decode())}
    samples = {
        (s.labels["route"], s.labels["method"], s.labels["status"]): s.value
        for s in families["cpm_requests"].samples
        if s.name == "cpm_requests_total"
    }
    samples["tokens"] = next(s.value for s in families["cpm_generation_tokens"].samples if s.name.endswith("_total"))
    samples["ttft"] = next(
        s.value for s in families["cpm_time_to_first_token_seconds"].samples if s.name.endswith("_count")
    )
    assert {"cpm_queue_depth", "cpm_running_rows", "cpm_inter_token_latency_seconds"} <= set(families)
    return samples


def test_api_key_and_metrics(tiny_checkpoint):
    backend, tok = load_backend("torch", tiny_checkpoint)
    app = create_app(backend, tok, SETTINGS, model_name=MODEL, warmup=False, api_key="s3cret-key")
    with BackgroundServer(app) as srv:
        assert raw(srv, "GET", "/health")[0] == 200  # open
        with pytest.raises(openai.AuthenticationError) as info:
            client_for(srv, "wrong").completions.create(model=MODEL, prompt="x", max_tokens=2)
        assert info.value.status_code == 401 and info.value.code == "invalid_api_key"
        status, _, body = raw(srv, "GET", "/metrics")
        assert status == 401 and json.loads(body)["error"]["type"] == "authentication_error"
        good = client_for(srv, "s3cret-key")
        for _ in range(3):
            good.completions.create(model=MODEL, prompt="话说", max_tokens=4, extra_body={"ignore_eos": True})
        list(
            good.completions.create(
                model=MODEL, prompt="话说", max_tokens=4, stream=True, extra_body={"ignore_eos": True}
            )
        )
        with pytest.raises(openai.BadRequestError):
            good.completions.create(model=MODEL, prompt="x", temperature=9)
        counts = _counts(srv, "s3cret-key")
    assert counts[("/v1/completions", "POST", "200")] == 4
    assert counts[("/v1/completions", "POST", "400")] == 1
    assert counts[("/v1/completions", "POST", "401")] == 1
    assert counts[("/metrics", "GET", "401")] == 1 and counts[("/health", "GET", "200")] >= 1
    assert counts["ttft"] == 4 and counts["tokens"] == 16


def test_without_a_key_every_route_is_open(server, client):
    client_for(server, "anything").completions.create(model=MODEL, prompt="话说", max_tokens=2)
    assert raw(server, "GET", "/metrics")[0] == 200
    assert raw(server, "GET", "/info", headers={"Authorization": "Bearer whatever"})[0] == 200
