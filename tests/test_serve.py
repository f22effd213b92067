"""`cpm serve` over real HTTP: a live uvicorn server on a free loopback port (in a thread, or the CLI in
a subprocess), talked to with the standard library's http.client. Request counts and model sizes are
small; every wait is bounded."""

from __future__ import annotations

import http.client
import json
import queue
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.parse
from concurrent.futures import ThreadPoolExecutor
from types import SimpleNamespace

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")

from cpm_infer.backends import load_backend
from cpm_infer.cli.serve_options import Given, declared_options
from cpm_infer.config import GenerationConfig
from cpm_infer.engine.generate import generate
from cpm_infer.prompts import essay_prompt
from cpm_infer.serve import schemas
from cpm_infer.serve.app import create_app
from cpm_infer.serve.completions import finish_reason
from cpm_infer.serve.server import BackgroundServer
from cpm_infer.serve.settings import ServeSettings

SETTINGS = ServeSettings(
    max_batch=8, batch_wait_ms=250, queue_size=32, max_new_tokens_cap=64, timeout_s=30, max_body_bytes=4096
)
SAMPLING = {"temperature": 0.9, "top_k": 50, "top_p": 0.95, "max_tokens": 16}


# -- a small HTTP client --------------------------------------------------------------------------
def request(srv, method: str, path: str, body=None, *, raw: bytes | None = None, timeout: float = 30):
    conn = http.client.HTTPConnection(srv.host, srv.port, timeout=timeout)
    try:
        data = raw if raw is not None else (json.dumps(body, ensure_ascii=False).encode() if body is not None else None)
        conn.request(method, path, data, {"Content-Type": "application/json"} if data is not None else {})
        resp = conn.getresponse()
        return resp.status, json.loads(resp.read() or b"null")
    finally:
        conn.close()


class EventStream:
    """A streaming completion, read one server-sent event at a time."""

    def __init__(self, srv, body: dict, timeout: float = 30) -> None:
        self.conn = http.client.HTTPConnection(srv.host, srv.port, timeout=timeout)
        self.conn.request(
            "POST", "/v1/completions", json.dumps({**body, "stream": True}), {"Content-Type": "application/json"}
        )
        self.resp = self.conn.getresponse()

    def next(self):
        while True:
            line = self.resp.readline()
            if not line:
                return None
            line = line.decode().rstrip("\n")
            if line.startswith("data: "):
                payload = line[len("data: ") :]
                return payload if payload == "[DONE]" else json.loads(payload)

    def all(self) -> list:
        events = []
        while (event := self.next()) is not None:
            events.append(event)
        self.close()
        return events

    def close(self) -> None:
        self.conn.close()  # mid-stream: the client disconnects


def wait_until(predicate, timeout: float = 120.0, what: str = "condition"):  # generous: it waits on state
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.02)
    raise AssertionError(f"timed out waiting for {what}")


def health(srv) -> dict:
    return request(srv, "GET", "/health")[1]


# -- fixtures -------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def reference(tiny_checkpoint):
    """The same checkpoint loaded in the test process: what generating alone gives."""
    return load_backend("torch", tiny_checkpoint)


def serve_checkpoint(checkpoint, settings: ServeSettings, **app_options) -> BackgroundServer:
    """A server (not started yet) over its own copy of the checkpoint."""
    backend, tok = load_backend("torch", checkpoint)
    return BackgroundServer(create_app(backend, tok, settings, **app_options))


@pytest.fixture(scope="module")
def server(tiny_checkpoint):
    with serve_checkpoint(tiny_checkpoint, SETTINGS, model_name="tiny") as srv:
        yield srv


@pytest.fixture(scope="module")
def long_checkpoint(tmp_path_factory, tiny_vocab):
    """A tiny model with a 1024-token context: 1000 new tokens take long enough to interrupt."""
    from conftest import make_tiny_model

    from cpm_infer.tokenizer import CpmTokenizer
    from cpm_infer.torch_model import save_checkpoint

    tok = CpmTokenizer(tiny_vocab)
    model = make_tiny_model(tok.vocab_size, eod_id=tok.eod_id, pad_id=tok.pad_id, n_positions=1024)
    return save_checkpoint(model, tiny_vocab, tmp_path_factory.mktemp("long") / "tiny-1024")


def long_server(checkpoint, **settings) -> BackgroundServer:
    base = {"max_batch": 1, "batch_wait_ms": 0, "queue_size": 1, "max_new_tokens_cap": 1000, "timeout_s": 30}
    return serve_checkpoint(checkpoint, ServeSettings(**{**base, **settings}), warmup=False)


LONG = {"prompt": "话说", "max_tokens": 1000, "ignore_eos": True}


def expected(reference, ids, seed, **sampling):
    backend, tok = reference
    settings = {**SAMPLING, **sampling}
    settings["max_new_tokens"] = settings.pop("max_tokens")
    config = GenerationConfig(**settings, seed=seed)
    return generate(backend, [ids], config, tok)[0]


# -- the API --------------------------------------------------------------------------------------
def test_health_info_and_models(server):
    status, body = request(server, "GET", "/health")
    assert status == 200 and body["status"] == "ok" and body["queued"] == 0
    status, info = request(server, "GET", "/info")
    assert status == 200 and info["backend"] == "torch" and info["spec"]["n_positions"] == 128
    assert info["limits"]["max_new_tokens_cap"] == 64
    assert info["kv_cache_reserved_bytes"] == 0  # torch keeps no shared KV buffers to set aside
    status, models = request(server, "GET", "/v1/models")
    assert status == 200 and models["data"][0]["id"] == "tiny"


def test_completion_is_what_generating_alone_gives(server, reference):
    _, tok = reference
    status, body = request(server, "POST", "/v1/completions", {"prompt": "话说天下大势", "seed": 7, **SAMPLING})
    assert status == 200, body
    want = expected(reference, tok.encode("话说天下大势"), 7)
    choice = body["choices"][0]
    assert choice["text"] == want.text and choice["finish_reason"] == finish_reason(want.finish_reason)
    assert body["usage"] == {
        "prompt_tokens": want.prompt_tokens,
        "completion_tokens": len(want.token_ids),
        "total_tokens": want.prompt_tokens + len(want.token_ids),
    }
    timings = body["timings"]
    assert timings["batch_rows"] >= 1 and 0 <= timings["queue_ms"] <= timings["first_token_ms"] <= timings["total_ms"]

    status, body = request(
        server, "POST", "/v1/completions", {"title": "三国", "context": "话说", "seed": 2, **SAMPLING}
    )
    assert (
        status == 200 and body["choices"][0]["text"] == expected(reference, essay_prompt(tok, "三国", "话说"), 2).text
    )


def test_essay_route_keeps_the_seed_services_contract(server, reference):
    backend, tok = reference
    query = urllib.parse.urlencode({"title": "三国", "context": "话说天下", "max_len": 30, "seed": 5})
    status, got = request(server, "GET", f"/zuowen?{query}")
    assert status == 200 and set(got) == {"title", "content"} and got["title"] == "三国"
    ids = essay_prompt(tok, "三国", "话说天下")
    config = schemas.essay_config(30, len(ids), 5, SETTINGS)
    result = generate(backend, [ids], config, tok)[0]
    assert got["content"] == tok.decode(tok.encode("话说天下") + result.token_ids)
    assert got["content"].startswith("话说天下")
    status, posted = request(
        server, "POST", "/zuowen", {"title": "三国", "context": "话说天下", "max_len": 30, "seed": 5}
    )
    assert status == 200 and posted == got


def test_streaming_sends_text_as_it_is_generated(server, reference):
    _, tok = reference
    events = EventStream(server, {"prompt": "滚滚长江", "seed": 3, **SAMPLING}).all()
    assert events[-1] == "[DONE]"
    texts = [e["choices"][0]["text"] for e in events[:-2]]
    final = events[-2]
    assert len(texts) > 1 and all(e["choices"][0]["finish_reason"] is None for e in events[:-2])
    want = expected(reference, tok.encode("滚滚长江"), 3)
    assert "".join(texts) == want.text
    assert final["choices"][0]["finish_reason"] == finish_reason(want.finish_reason) and final["usage"][
        "completion_tokens"
    ] == len(want.token_ids)


def test_concurrent_clients_are_batched_and_each_gets_its_own_answer(server, reference):
    _, tok = reference
    jobs = [
        ({"prompt": p, "seed": s, **SAMPLING}, {})
        for p, s in [
            ("话说天下大势", 1),
            ("滚滚长江东逝水", 2),
            ("白发渔樵", 3),
            ("话说天下大势", 4),
            ("青山依旧在", 1),
        ]
    ]
    jobs.append(
        ({"prompt": "白发渔樵", "seed": 3, **SAMPLING, "temperature": 0.5}, {"temperature": 0.5})
    )  # other settings
    streamed = {1}  # one client streams; it is batched like the others

    def call(i, start):
        body = jobs[i][0]
        start.wait(120)
        if i in streamed:
            events = EventStream(server, body).all()
            return "".join(e["choices"][0]["text"] for e in events[:-2]), None
        status, out = request(server, "POST", "/v1/completions", body)
        assert status == 200, out
        return out["choices"][0]["text"], out["timings"]["batch_rows"]

    # Clients released together arrive within the batch wait (250 ms) unless the machine stalls one of them that
    # long; then the round is repeated (every round's answers are checked).
    for _ in range(5):
        start = threading.Barrier(len(jobs) + 1)
        with ThreadPoolExecutor(len(jobs)) as pool:
            futures = [pool.submit(call, i, start) for i in range(len(jobs))]
            start.wait(120)
            answers = [f.result(timeout=180) for f in futures]
        for (body, extra), (text, _) in zip(jobs, answers, strict=False):
            assert text == expected(reference, tok.encode(body["prompt"]), body["seed"], **extra).text
        sizes = [size for _, size in answers if size is not None]
        if max(sizes) > 1:
            break
    assert max(sizes) > 1 and max(sizes) <= SETTINGS.max_batch  # requests shared the batch, whatever their settings


@pytest.mark.parametrize(
    ("body", "status", "says"),
    [
        ({"prompt": "x", "temperature": -1}, 400, "temperature"),
        ({"prompt": "x", "top_p": 0}, 400, "top_p"),
        ({"prompt": "x", "top_p": float("nan")}, 400, "top_p"),
        ({"prompt": "x", "temperature": "hot"}, 400, "temperature"),
        ({"prompt": "x", "max_tokens": 65}, 400, "max_tokens: Input should be less than or equal to 64"),
        ({"prompt": "x", "max_tokens": -1}, 400, "max_tokens"),
        ({"prompt": "x", "n": 17}, 400, "n: Input should be less than or equal to 16"),
        ({"prompt": "x", "temprature": 1}, 400, "temprature"),
        ({"prompt": "x", "title": "y"}, 400, "exactly one"),
        ({}, 400, "exactly one"),
        ({"prompt": "x", "max_new_tokens": 4}, 400, '"max_new_tokens" is now called "max_tokens"'),
        ({"prompt": "x", "num_samples": 2}, 400, '"num_samples" is now called "n"'),
        ({"prompt": "话说" * 400}, 400, "context is 128"),
    ],
)
def test_bad_requests_get_a_json_4xx(server, body, status, says):
    got, answer = request(server, "POST", "/v1/completions", raw=json.dumps(body, ensure_ascii=False).encode())
    assert got == status and says in answer["error"]["message"], answer
    assert (
        set(answer["error"]) == {"message", "type", "param", "code"}
        and answer["error"]["type"] == "invalid_request_error"
    )


def test_limits_and_malformed_requests(server):
    status, answer = request(server, "POST", "/v1/completions", {"prompt": "话" * 3000})
    assert status == 413 and "4096" in answer["error"]["message"]
    assert request(server, "POST", "/v1/completions", raw=b"{not json")[0] == 400
    assert request(server, "GET", "/nowhere")[1]["error"]["code"] == "not_found"
    assert request(server, "GET", "/zuowen?max_len=abc&title=x")[0] == 400
    assert request(server, "GET", "/zuowen")[0] == 400  # no title
    status, answer = request(
        server, "POST", "/v1/completions", {"prompt": "话说" * 400, "truncate": True, "max_tokens": 4}
    )
    assert status == 200 and answer["usage"]["prompt_tokens"] == 124


# -- load, disconnects, timeouts, shutdown --------------------------------------------------------
def test_full_queue_answers_503_at_once_and_a_disconnect_frees_the_slot(long_checkpoint):
    with long_server(long_checkpoint) as srv:
        running = EventStream(srv, LONG)
        assert running.next()["choices"][0]["finish_reason"] is None  # generating now
        with ThreadPoolExecutor(1) as pool:
            queued = pool.submit(request, srv, "POST", "/v1/completions", {"prompt": "天下", "max_tokens": 8})
            wait_until(lambda: health(srv)["queued"] == 1, what="the second request to queue")
            status, answer = request(srv, "POST", "/v1/completions", {"prompt": "三国"})
            assert status == 503 and answer["error"]["code"] == "queue_full"
            # at once: answered while the queue is still full, not after waiting for room in it
            assert not queued.done() and health(srv)["queued"] == 1
            running.close()  # the streaming client goes away mid-stream
            assert queued.result(timeout=120)[0] == 200  # its slot went to the queued request
        state = health(srv)
        assert state["counters"]["cancelled_disconnected"] == 1
        assert state["counters"].get("generated_tokens", 0) < 1000  # the abandoned stream stopped early
        assert request(srv, "POST", "/v1/completions", {"prompt": "三国", "max_tokens": 4})[0] == 200


def test_a_short_request_joins_the_running_batch_and_finishes_first(long_checkpoint):
    with long_server(long_checkpoint, max_batch=4, queue_size=4) as srv:
        running = EventStream(srv, LONG)
        assert running.next()["choices"][0]["finish_reason"] is None  # generating now
        status, short = request(
            srv, "POST", "/v1/completions", {"prompt": "天下", "max_tokens": 8, "temperature": 0.5, "ignore_eos": True}
        )
        assert status == 200 and short["usage"]["completion_tokens"] == 8
        assert short["timings"]["batch_rows"] == 2  # it ran beside the long request
        assert running.next()["choices"][0]["finish_reason"] is None  # which is still generating
        running.close()


def test_a_non_streaming_client_that_leaves_is_cancelled_too(long_checkpoint):
    with long_server(long_checkpoint) as srv:
        body = json.dumps(LONG).encode()
        sock = socket.create_connection((srv.host, srv.port), timeout=10)
        sock.sendall(
            b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            b"Content-Length: %d\r\n\r\n%s" % (len(body), body)
        )
        wait_until(lambda: health(srv)["running"] == 1, what="the request to start")
        sock.close()
        wait_until(lambda: health(srv)["running"] == 0, what="the abandoned request to stop")
        state = health(srv)
        assert state["counters"]["cancelled_disconnected"] == 1 and state["counters"].get("generated_tokens", 0) < 1000


def test_a_request_over_the_timeout_gets_504_and_stops(long_checkpoint):
    with long_server(long_checkpoint, timeout_s=0.5, queue_size=4) as srv:
        status, answer = request(srv, "POST", "/v1/completions", LONG)
        assert status == 504 and answer["error"]["code"] == "timeout"
        events = EventStream(srv, LONG).all()  # streaming: the timeout arrives as an error event
        assert events[-1]["error"]["code"] == "timeout"
        wait_until(lambda: health(srv)["running"] == 0, what="the timed-out rows to stop")
        counters = health(srv)["counters"]
        # both stopped at the timeout, long before their 1000 tokens
        assert counters["cancelled_timeout"] == 2 and counters.get("generated_tokens", 0) < 2 * 1000
        assert request(srv, "POST", "/v1/completions", {"prompt": "三国", "max_tokens": 4})[0] == 200


def test_graceful_shutdown_lets_in_flight_requests_finish(long_checkpoint):
    srv = long_server(long_checkpoint, shutdown_grace_s=120).start()  # 150 tokens finish well within it
    with ThreadPoolExecutor(1) as pool:
        in_flight = pool.submit(request, srv, "POST", "/v1/completions", {**LONG, "max_tokens": 150})
        wait_until(lambda: health(srv)["running"] == 1, what="the request to start")
        stopper = threading.Thread(target=srv.stop)
        stopper.start()
        status, answer = in_flight.result(timeout=180)
        stopper.join(180)
    assert status == 200 and answer["usage"]["completion_tokens"] == 150 and not stopper.is_alive()
    with pytest.raises(OSError):  # stopped: no longer listening
        request(srv, "GET", "/health", timeout=2)


def test_cli_serves_and_stops_cleanly_on_sigterm(long_checkpoint):
    cmd = [
        sys.executable,
        "-m",
        "cpm_infer.cli.app",
        "serve",
        "--model",
        str(long_checkpoint),
        "--port",
        "0",
        "--max-new-tokens-cap",
        "1000",
        "--shutdown-grace",
        "0.5",
        "--no-warmup",
    ]
    proc = subprocess.Popen(cmd, stderr=subprocess.PIPE, text=True)
    lines: queue.Queue[str] = queue.Queue()
    threading.Thread(target=lambda: [lines.put(line) for line in proc.stderr], daemon=True).start()
    try:
        first = ""
        while "on http://127.0.0.1:" not in first:  # skip any warnings printed while the model loads
            first = lines.get(timeout=300)  # the CLI imports torch and loads the model first
        srv = SimpleNamespace(host="127.0.0.1", port=int(first.split("on http://127.0.0.1:")[1].split()[0]))

        def up():
            try:
                return request(srv, "GET", "/health", timeout=30)[0] == 200
            except OSError:
                return False

        wait_until(up, what="the CLI server to answer")
        stream = EventStream(srv, LONG)
        assert stream.next()["choices"][0]["finish_reason"] is None
        proc.send_signal(signal.SIGTERM)
        rest = stream.all()
        assert rest[-1]["error"]["code"] == "shutting_down"  # cancelled after the grace, with an answer
        assert proc.wait(timeout=120) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
    err = "".join(iter(lambda: lines.get(timeout=5) if not lines.empty() else "", ""))
    assert "server stopped" in err


def test_cli_options_are_generated_from_the_declarations():
    """``cpm serve``'s limit options come from ``ServeSettings``: flag names, units (KiB -> bytes), ranges."""
    import typer
    from typer.testing import CliRunner

    got = {}

    @declared_options(settings=ServeSettings)
    def command(*, settings: Given[ServeSettings], verbose: bool = False) -> None:
        got["settings"], got["verbose"] = settings.build(), verbose

    app = typer.Typer()
    app.command()(command)
    app.command("other")(lambda: None)  # (a Typer app with two commands keeps the command's name)
    runner = CliRunner()
    args = ["command", "--max-body-kb", "2", "--timeout", "5", "--batching", "static", "--verbose"]
    assert runner.invoke(app, args).exit_code == 0
    assert got["settings"] == ServeSettings(max_body_bytes=2048, timeout_s=5.0, batching="static") and got["verbose"]
    assert runner.invoke(app, ["command"]).exit_code == 0 and got["settings"] == ServeSettings()
    result = runner.invoke(app, ["command", "--max-batch", "0"])
    assert result.exit_code == 2 and "--max-batch" in result.output  # the declared range, checked by the CLI
