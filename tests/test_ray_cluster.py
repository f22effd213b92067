"""Scale-out on a real Ray cluster started here on loopback (2 CPUs, no dashboard; shut down at the end).

Ray Serve: two replicas both answer; the service answers as `cpm serve` does; a replica killed under load leaves
the service answering and is replaced. Ray Data: `cpm batch` with 2 actors equals `cpm generate`; a `cpm batch`
process killed mid-run resumes, skipping its finished parts. Tiny models; every wait is bounded."""

from __future__ import annotations

import http.client
import json
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

pytest.importorskip("ray.serve")
pytest.importorskip("ray.data")
pytest.importorskip("fastapi")

import ray
from conftest import run_cli
from ray import serve

from cpm_infer.serve.ray_app import REPLICA_HEADER, ReplicaConfig, Scaling, application
from cpm_infer.serve.settings import ServeSettings

SETTINGS = ServeSettings(max_batch=8, batch_wait_ms=5, queue_size=32, max_new_tokens_cap=64, timeout_s=60)
BODY = {"prompt": "滚滚长江东逝水", "max_tokens": 12, "temperature": 0.9, "top_k": 40, "seed": 11}


@pytest.fixture(scope="module")
def cluster():
    with pytest.MonkeyPatch.context() as env:
        # On a loaded machine Serve's proxy can miss its default 5 s readiness check three times and be restarted.
        env.setenv("RAY_SERVE_PROXY_READY_CHECK_TIMEOUT_S", "60")
        ray.init(
            num_cpus=2,
            include_dashboard=False,
            log_to_driver=False,
            logging_level="WARNING",
        )
    address = ray.get_runtime_context().gcs_address
    assert address.startswith("127.0.0.1:"), address  # loopback only (conftest)
    try:
        yield address
    finally:
        serve.shutdown()
        ray.shutdown()


def _free_port() -> int:
    from cpm_infer.serve.server import bind

    sock = bind("127.0.0.1", 0)
    port = sock.getsockname()[1]
    sock.close()
    return port


def post(port: int, path: str, body: dict, timeout: float = 60) -> tuple[int, str | None, dict | None]:
    """(status, replica, json body); status 0 when the connection failed."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        data = json.dumps(body, ensure_ascii=False).encode()
        conn.request("POST", path, data, {"Content-Type": "application/json"})
        resp = conn.getresponse()
        raw = resp.read()
        try:
            payload = json.loads(raw)
        except ValueError:
            payload = None
        return resp.status, resp.getheader(REPLICA_HEADER), payload
    except OSError:
        return 0, None, None
    finally:
        conn.close()


@pytest.fixture(scope="class")
def service(cluster, tiny_checkpoint):
    """The application on two replicas behind Ray's proxy; yields the proxy's port."""
    port = _free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    config = ReplicaConfig(model=str(tiny_checkpoint), settings=SETTINGS)
    serve.run(application(config, Scaling(replicas=2, cpus=0.5)), name="cpm", route_prefix="/")
    try:
        yield port
    finally:
        serve.shutdown()  # frees the CPUs for the bulk tests


class TestServe:
    def test_two_replicas_answer_the_same_as_cpm_serve(self, service, tiny_checkpoint):
        """The unmodified OpenAI client, through Ray's proxy and straight to `cpm serve`'s app: same answers."""
        import openai
        from prometheus_client.parser import text_string_to_metric_families

        from cpm_infer.backends import load_backend
        from cpm_infer.serve.app import create_app
        from cpm_infer.serve.server import BackgroundServer

        def ask(port: int) -> tuple[str | None, str]:
            client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="-", max_retries=0, timeout=60)
            raw = client.completions.with_raw_response.create(
                model=tiny_checkpoint.name, prompt=BODY["prompt"], max_tokens=12, temperature=0.9, seed=11, n=2
            )
            return raw.headers.get(REPLICA_HEADER), "|".join(c.text for c in raw.parse().choices)

        seen: dict[str, str] = {}
        for _ in range(60):
            replica, text = ask(service)
            seen[replica] = text
            if len(seen) == 2:
                break
        assert len(seen) == 2 and None not in seen, f"one replica answered everything: {seen}"
        assert len(set(seen.values())) == 1  # same seed, same text, whichever replica
        bad = {**BODY, "temperature": -1}
        ray_bad = post(service, "/v1/completions", bad)
        backend, tok = load_backend("torch", tiny_checkpoint)
        with BackgroundServer(create_app(backend, tok, SETTINGS, model_name=tiny_checkpoint.name)) as local:
            assert ask(local.port)[1] == next(iter(seen.values()))
            local_bad = post(local.port, "/v1/completions", bad)
        assert ray_bad[0] == local_bad[0] == 400 and ray_bad[2] == local_bad[2]
        # /metrics per replica: each scrape is one replica's registry, labelled with the replica that answered.
        scraped: set[str] = set()
        for _ in range(60):
            conn = http.client.HTTPConnection("127.0.0.1", service, timeout=30)
            conn.request("GET", "/metrics")
            resp = conn.getresponse()
            families = {f.name: f for f in text_string_to_metric_families(resp.read().decode())}
            (sample,) = families["cpm_replica_info"].samples
            assert sample.labels["replica"] == resp.getheader(REPLICA_HEADER)
            assert any(s.value > 0 for s in families["cpm_requests"].samples)
            scraped.add(sample.labels["replica"])
            if scraped == set(seen):
                break
        assert scraped == set(seen)

    def test_a_replica_killed_under_load_leaves_the_service_answering(self, service):
        log: list[tuple[float, int, str | None]] = []
        stop = threading.Event()

        def client() -> None:
            while not stop.is_set():
                status, replica, _ = post(service, "/v1/completions", {**BODY, "max_tokens": 24})
                log.append((time.monotonic(), status, replica))

        def wait_for(check, timeout: float) -> None:
            deadline = time.monotonic() + timeout
            while not check():
                assert time.monotonic() < deadline, f"timed out; log tail {log[-5:]}"
                time.sleep(0.05)

        clients = [threading.Thread(target=client, daemon=True) for _ in range(4)]
        for thread in clients:
            thread.start()
        try:
            wait_for(lambda: len({r for _, s, r in log if s == 200}) == 2, 60)
            victim = next(r for _, s, r in log if s == 200)
            (name,) = [n for n in _replica_actors() if n.endswith(victim)]
            ray.kill(ray.get_actor(name, namespace="serve"), no_restart=True)
            killed = time.monotonic()
            wait_for(lambda: sum(1 for t, s, _ in log if t > killed + 1 and s == 200) >= 10, 60)
        finally:
            stop.set()
            for thread in clients:
                thread.join(90)
        after = [(s, r) for t, s, r in log if t > killed]
        failed = [s for s, _ in after if s != 200]
        # Only requests the dead replica was holding fail (at most one per client), each with an error status or a
        # closed connection, never a hang; everything after is answered by the survivor (or its replacement).
        assert len(failed) <= len(clients) and all(s == 0 or s >= 500 for s in failed), failed
        assert all(r != victim for t, s, r in log if t > killed + 1 and s == 200)
        # Serve replaces the dead replica: two running replicas again, neither of them the victim, and the
        # newcomer answers too.
        deadline = time.monotonic() + 180
        while _running() != 2 or len(replicas := _replica_actors()) != 2 or any(n.endswith(victim) for n in replicas):
            assert time.monotonic() < deadline, serve.status()
            time.sleep(0.5)
        survivor = {r for t, s, r in log if t > killed + 1 and s == 200}
        answered = {post(service, "/v1/completions", BODY)[1] for _ in range(30)}
        assert answered - survivor - {None}, (answered, survivor)


def _running() -> int:
    app = serve.status().applications.get("cpm")
    return app.deployments["cpm"].replica_states.get("RUNNING", 0) if app else 0


def _replica_actors() -> list[str]:
    """Names of the live replica actors of the application (Ray names them SERVE_REPLICA::app#deployment#id)."""
    names = [a["name"] for a in ray.util.list_named_actors(all_namespaces=True)]
    return [n for n in names if n.startswith("SERVE_REPLICA::cpm#")]


def _wait_until_idle(timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while ray.available_resources().get("CPU", 0) < ray.cluster_resources()["CPU"]:
        assert time.monotonic() < deadline, ray.available_resources()
        time.sleep(0.2)


PROMPTS_A = ["天下大势", '{"title": "春天", "context": "春天来了"}', "", "话说天下", '{"prompt": "合久必分"}', "汉朝"]
PROMPTS_B = ["滚滚长江", "  ", "浪花淘尽", "古今多少事", "青山依旧在"]
GEN = ["-n", "10", "-t", "0.9", "--top-k", "40", "--seed", "7", "--num-samples", "2", "--batch-size", "2"]


def _single(monkeypatch, capsys, tmp_path: Path, model: Path, lines: list[str], args: list[str]) -> list[dict]:
    """`cpm generate --input` over the same prompts: the single-process reference."""
    path = tmp_path / "all.txt"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    out = tmp_path / "single.jsonl"
    code, _, err = run_cli(monkeypatch, capsys, "generate", "-m", str(model), "-i", str(path), "-o", str(out), *args)
    assert code == 0, err
    return [json.loads(line) for line in out.read_text(encoding="utf-8").splitlines()]


def _parts(out: Path) -> list[dict]:
    rows: list[dict] = []
    for path in sorted(out.glob("part-*.jsonl")):
        rows += [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]
    for path in sorted(out.glob("part-*.parquet")):
        import pyarrow.parquet as pq

        rows += [{k: v for k, v in r.items() if v is not None} for r in pq.read_table(path).to_pylist()]
    return rows


def _without_seed(rows: list[dict]) -> list[dict]:
    return [{k: v for k, v in r.items() if k != "seed"} for r in rows]


def test_bulk_with_two_actors_equals_cpm_generate(cluster, monkeypatch, capsys, tmp_path, tiny_checkpoint):
    single = _single(monkeypatch, capsys, tmp_path, tiny_checkpoint, PROMPTS_A + PROMPTS_B, GEN)
    (tmp_path / "a.txt").write_text("\n".join(PROMPTS_A), encoding="utf-8")
    (tmp_path / "b.txt").write_text("\n".join(PROMPTS_B), encoding="utf-8")
    out = tmp_path / "bulk"
    args = [str(tmp_path / "a.txt"), str(tmp_path / "b.txt"), "-o", str(out), "-m", str(tiny_checkpoint), *GEN]
    pool = ["--actors", "2", "--actor-cpus", "0.5", "--part-size", "2"]
    code, _, err = run_cli(monkeypatch, capsys, "batch", *args, *pool)
    assert code == 0, err
    assert "wrote 9 prompt(s) x 2 sample(s)" in err
    rows = _parts(out)
    assert _without_seed(rows) == single
    assert [r["index"] for r in rows] == [i // 2 for i in range(18)] and {r["seed"] for r in rows} == {7}
    code, _, err = run_cli(monkeypatch, capsys, "batch", *args, *pool)  # all done: nothing to do
    assert code == 0 and "wrote 0 prompt(s)" in err and "9 finished earlier" in err


def test_bulk_killed_mid_run_resumes_where_it_stopped(cluster, monkeypatch, capsys, tmp_path, tiny_checkpoint):
    import pyarrow as pa
    import pyarrow.parquet as pq

    titles = [f"第{i}回" for i in range(8)]
    gen = ["-n", "32", "--ignore-eos", "--seed", "3", "--num-samples", "2", "--batch-size", "1"]
    lines = [json.dumps({"title": t, "context": "话说"}, ensure_ascii=False) for t in titles]
    single = _single(monkeypatch, capsys, tmp_path, tiny_checkpoint, lines, gen)
    pq.write_table(pa.table({"title": titles, "context": ["话说"] * len(titles)}), tmp_path / "titles.parquet")
    out = tmp_path / "bulk"
    args = [str(tmp_path / "titles.parquet"), "-o", str(out), "--format", "parquet", "-m", str(tiny_checkpoint), *gen]
    command = [sys.executable, "-m", "cpm_infer.cli.app", "batch", *args, "--part-size", "1", "--actor-cpus", "0.5"]
    proc = subprocess.Popen([*command, "--ray-address", cluster], stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 180
        while not list(out.glob("part-*.parquet")):
            assert proc.poll() is None, proc.stderr.read()
            assert time.monotonic() < deadline, "no part written"
            time.sleep(0.05)
        proc.send_signal(signal.SIGKILL)  # killed for real: no cleanup, no goodbye
    finally:
        proc.kill()
        proc.wait(30)
        proc.stderr.close()
    _wait_until_idle()  # Ray stops the dead driver's actors; one may finish the part it was writing
    before = len(list(out.glob("part-*.parquet")))
    assert 1 <= before < len(titles)
    code, _, err = run_cli(
        monkeypatch, capsys, "batch", *args, "--part-size", "4", "--actors", "2", "--actor-cpus", "0.5"
    )
    assert code == 0, err
    assert f"{before} finished earlier" in err and f"wrote {len(titles) - before} prompt(s)" in err
    rows = _parts(out)
    assert _without_seed(sorted(rows, key=lambda r: (r["index"], r["sample"]))) == single
