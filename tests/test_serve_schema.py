"""The server against its own OpenAPI schema, by schemathesis: a real server on loopback (a tiny model), the
schema it publishes at /openapi.json, every operation in it, every check schemathesis has (`--checks all`: no 5xx,
documented status codes, content types, headers and response bodies, valid data accepted, invalid data refused,
unsupported methods answered 405, ...). Examples are few per operation and derived from a fixed seed, so a run
is short and repeatable; a failing check fails the test with schemathesis' report (the request, as curl, and the
answer)."""

from __future__ import annotations

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("schemathesis")

import schemathesis
from schemathesis.config import SchemathesisConfig

from cpm_infer.backends import load_backend
from cpm_infer.serve.app import create_app
from cpm_infer.serve.server import BackgroundServer
from cpm_infer.serve.settings import ServeSettings

# Small caps: an accepted request generates at most 4 tokens x 4 choices, so examples stay fast.
LIMITS = ServeSettings(max_batch=8, batch_wait_ms=0, queue_size=64, max_new_tokens_cap=4, max_samples=4, timeout_s=30)
EXAMPLES = 25  # per operation and phase

CONFIG = {
    "seed": 20240601,
    "checks": {"enabled": True},  # every check (`st run --checks all`)
    "generation": {"mode": "all", "max-examples": EXAMPLES, "deterministic": True, "database": "none"},
    "phases": {"stateful": {"enabled": False}},  # the API keeps no resources between requests
    "request-timeout": 60,
    "output": {"sanitization": {"enabled": False}},  # show every field of a failing request (max_tokens too)
}


@pytest.fixture(scope="module")
def server(tiny_checkpoint):
    backend, tok = load_backend("torch", tiny_checkpoint)
    with BackgroundServer(create_app(backend, tok, LIMITS, model_name="tiny", warmup=False)) as srv:
        yield srv


@pytest.fixture(scope="module")
def api_schema(server):
    return schemathesis.openapi.from_url(f"{server.url}/openapi.json", config=SchemathesisConfig.from_dict(CONFIG))


schema = schemathesis.pytest.from_fixture("api_schema")


@pytest.fixture(autouse=True)
def _node_id(request):
    """schemathesis 4.32's fixture-loaded schemas read and set the test item's private ``_nodeid`` (to name each
    operation's subtest), which pytest 9 no longer has: give it one."""
    if not hasattr(request.node, "_nodeid"):
        request.node._nodeid = request.node.nodeid


@pytest.mark.timeout(300)
@schema.parametrize()
def test_server_keeps_its_schema(case):
    case.call_and_validate()


def test_essay_post_takes_json_numbers_and_ignores_extra_keys(server):
    """POST /zuowen as its schema states it: `false` is not a seed, 5.0 is the seed 5, unknown keys are ignored,
    max_len and seed have the ranges the schema gives."""
    import requests

    def post(**body):
        return requests.post(f"{server.url}/zuowen", json={"title": "三国", "context": "话说", **body}, timeout=60)

    five = post(max_len=12, seed=5)
    assert five.status_code == 200, five.text
    assert post(max_len=12.0, seed=5.0, colour="red").json() == five.json()
    for bad in ({"seed": False}, {"seed": True}, {"seed": "5"}, {"max_len": "12"}, {"max_len": 0}, {"seed": -1}):
        answer = post(**bad)
        assert answer.status_code == 400 and next(iter(bad)) in answer.json()["error"]["message"], (bad, answer.text)
    assert post(seed=2**53).status_code == 400 and post(seed=2**53 - 1, max_len=8).status_code == 200
