"""No request of any shape gets a 5xx: hypothesis-generated JSON bodies (known fields with values of every type,
unknown keys, nesting, lone surrogates, huge numbers, NaN), raw bytes that are not JSON or not UTF-8, and query
strings, against a real server on loopback. Every answer is a 2xx or a 4xx; every 4xx is in OpenAI's shape."""

from __future__ import annotations

import http.client
import json
import urllib.parse

import pytest

pytest.importorskip("fastapi")

from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from cpm_infer.backends import load_backend
from cpm_infer.serve.app import create_app
from cpm_infer.serve.schemas import RENAMED, CompletionRequest
from cpm_infer.serve.server import BackgroundServer
from cpm_infer.serve.settings import ServeSettings

# Small caps: an accepted request generates at most 4 tokens x 4 choices, so examples stay fast.
LIMITS = ServeSettings(max_batch=8, batch_wait_ms=0, queue_size=64, max_new_tokens_cap=4, max_samples=4, timeout_s=30)
FIELDS = sorted(set(CompletionRequest.model_fields) | set(RENAMED) | {"stream_options"})

# Any code point, surrogates included (hypothesis leaves them out unless asked).
any_char = st.characters(exclude_categories=[])
text = st.text(any_char, max_size=12)
scalars = (
    st.none()
    | st.booleans()
    | st.integers()
    | st.integers(min_value=-(10**40), max_value=10**40)
    | st.floats()  # NaN and infinities too: Python's JSON reads them
    | text
)
values = st.recursive(
    scalars, lambda inner: st.lists(inner, max_size=4) | st.dictionaries(text, inner, max_size=4), max_leaves=12
)
# Mostly plausible values per field, so that validation passes often and generation runs too.
plausible = {
    "prompt": st.one_of(text, st.lists(text, max_size=3), st.lists(st.integers(-2, 400), max_size=5)),
    "max_tokens": st.integers(-1, 6),
    "n": st.integers(-1, 5),
    "temperature": st.floats(-1, 3),
    "top_p": st.floats(-0.5, 1.5),
    "stream": st.booleans(),
    "stream_options": st.fixed_dictionaries({"include_usage": st.booleans()}),
    "stop": st.one_of(text, st.lists(text, max_size=5)),
    "logprobs": st.integers(-1, 25),
    "echo": st.booleans(),
    "seed": st.integers(-5, 2**64),
}
# Valid requests with random settings (so that generation, streaming and stop strings run under fuzzing too).
valid = st.fixed_dictionaries(
    {"prompt": st.one_of(text, st.lists(text, min_size=1, max_size=2), st.lists(st.integers(0, 299), min_size=1))},
    optional={
        "max_tokens": st.integers(1, 4),
        "n": st.integers(1, 2),
        "temperature": st.floats(0, 2),
        "top_p": st.floats(0.01, 1),
        "top_k": st.integers(0, 10**6),
        "stream": st.booleans(),
        "stream_options": st.fixed_dictionaries({"include_usage": st.booleans()}),
        "stop": st.one_of(st.text(any_char, min_size=1, max_size=3), st.lists(st.text(min_size=1), max_size=4)),
        "echo": st.booleans(),
        "seed": st.integers(0, 2**63 - 1),
        "repetition_penalty": st.floats(0.01, 100),
        "min_tokens": st.integers(0, 4),
        "ignore_eos": st.booleans(),
        "truncate": st.booleans(),
    },
)
field_values = st.sampled_from(FIELDS).flatmap(lambda k: st.tuples(st.just(k), plausible.get(k, values) | values))
bodies = st.one_of(
    valid,
    st.lists(field_values, max_size=8).map(dict),
    st.lists(field_values, max_size=6).map(lambda kv: {"prompt": "话说", **dict(kv)}),
    st.dictionaries(text, values, max_size=5),
    values,
)
raw_bodies = st.one_of(
    st.binary(max_size=64),
    st.sampled_from([b"", b"{", b'{"prompt": "x"', b"[]", b"null", b"NaN", b'{"prompt": "\xff\xfe"}', b"\x00" * 8]),
)


@pytest.fixture(scope="module")
def server(tiny_checkpoint):
    backend, tok = load_backend("torch", tiny_checkpoint)
    with BackgroundServer(create_app(backend, tok, LIMITS, model_name="tiny", warmup=False)) as srv:
        yield srv


def send(srv, method: str, path: str, body: bytes | None = None) -> tuple[int, bytes, str]:
    conn = http.client.HTTPConnection(srv.host, srv.port, timeout=60)
    try:
        conn.request(method, path, body, {"Content-Type": "application/json"})
        resp = conn.getresponse()
        return resp.status, resp.read(), resp.getheader("content-type", "")
    finally:
        conn.close()


def check(status: int, answer: bytes, content_type: str) -> None:
    event(f"status {status}")
    assert status < 500, answer[:500]
    if status >= 400:
        error = json.loads(answer)["error"]
        assert set(error) == {"message", "type", "param", "code"} and error["message"], error
    elif content_type.startswith("text/event-stream"):
        events = [line for line in answer.decode().splitlines() if line.startswith("data: ")]
        assert events[-1] == "data: [DONE]", answer[-500:]
        assert not any('"error"' in e and "server_error" in e for e in events), answer[-500:]


SETTINGS = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@SETTINGS
@given(body=bodies)
def test_completions_never_answer_5xx_to_json(server, body):
    check(*send(server, "POST", "/v1/completions", json.dumps(body).encode()))


@settings(max_examples=60, deadline=None)
@given(body=raw_bodies)
def test_completions_never_answer_5xx_to_bytes(server, body):
    check(*send(server, "POST", "/v1/completions", body))


@settings(max_examples=60, deadline=None)
@given(body=bodies, query=st.dictionaries(st.sampled_from(["title", "context", "max_len", "seed", "x"]), text))
def test_essay_route_never_answers_5xx(server, body, query):
    check(*send(server, "POST", "/zuowen", json.dumps(body).encode()))
    check(*send(server, "GET", "/zuowen?" + urllib.parse.urlencode(query, errors="surrogatepass")))
