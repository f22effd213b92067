"""The page at ``/`` (``cpm_infer/serve/static/index.html``) in a real headless browser: Debian's chromium and
chromium-driver through Selenium, against the real server on a loopback port. Every wait is on the page's DOM or
the server's counters, with generous timeouts; nothing depends on how fast the machine generates.

The model is a tiny GPT-2 that never writes ``<eod>``, so a long request runs until it is stopped. Without a
browser, a driver or selenium the browser tests skip; the HTTP checks of the page run anyway."""

from __future__ import annotations

import http.client
import json
import shutil
import time

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")

from cpm_infer.backends import load_backend
from cpm_infer.serve.app import create_app
from cpm_infer.serve.server import BackgroundServer
from cpm_infer.serve.settings import ServeSettings

SETTINGS = ServeSettings(max_batch=4, batch_wait_ms=0, queue_size=8, max_new_tokens_cap=1000, timeout_s=60)
NAME = "tiny</script><b>"  # the page escapes the model's name wherever it shows it
KEY = "s3cret-key"
WAIT_S = 30.0  # the longest wait on the page (a few seconds on an idle machine)


# -- the server -----------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def endless_checkpoint(tmp_path_factory, tiny_vocab):
    """A tiny model with a 1024-token context whose last layer norm always leans away from ``<eod>``: its text
    never ends before ``max_tokens``, so a long request is still running when the test stops it."""
    import torch
    from conftest import make_tiny_model

    from cpm_infer.tokenizer import CpmTokenizer
    from cpm_infer.torch_model import save_checkpoint

    tok = CpmTokenizer(tiny_vocab)
    model = make_tiny_model(tok.vocab_size, eod_id=tok.eod_id, pad_id=tok.pad_id, n_positions=1024)
    with torch.no_grad():
        ln_f = model.transformer.ln_f
        ln_f.weight.mul_(0.5)
        ln_f.bias.copy_(-3 * model.transformer.wte.weight[tok.eod_id])  # <eod>'s logit far below the others'
    return save_checkpoint(model, tiny_vocab, tmp_path_factory.mktemp("endless") / "tiny-1024")


def start_server(checkpoint, **options) -> BackgroundServer:
    backend, tok = load_backend("torch", checkpoint)
    return BackgroundServer(create_app(backend, tok, SETTINGS, warmup=False, **options)).start()


@pytest.fixture(scope="module")
def server(endless_checkpoint):
    srv = start_server(endless_checkpoint, model_name=NAME)
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def keyed_server(endless_checkpoint):
    srv = start_server(endless_checkpoint, model_name="tiny", api_key=KEY)
    yield srv
    srv.stop()


def request(srv, method: str, path: str, body=None, headers=None):
    conn = http.client.HTTPConnection(srv.host, srv.port, timeout=60)
    try:
        data = json.dumps(body).encode() if body is not None else None
        conn.request(method, path, data, {"Content-Type": "application/json", **(headers or {})})
        resp = conn.getresponse()
        return resp.status, dict(resp.getheaders()), resp.read().decode()
    finally:
        conn.close()


def completion(srv, body: dict, key: str | None = None) -> tuple[int, dict]:
    """What the API answers ``body`` without streaming: what the page must show for it."""
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    status, _, text = request(srv, "POST", "/v1/completions", {**body, "stream": False}, headers)
    return status, json.loads(text)


def counters(srv) -> dict:
    return json.loads(request(srv, "GET", "/health")[2])["counters"]


# -- without a browser ----------------------------------------------------------------------------
def test_the_page_is_public_escaped_and_left_out_of_the_schema(server, keyed_server):
    status, headers, page = request(keyed_server, "GET", "/")  # no key: the page is public
    assert status == 200 and headers["content-type"].startswith("text/html")
    assert "script-src 'sha256-" in headers["content-security-policy"]  # the page's own script, nothing else
    assert "connect-src 'self'" in headers["content-security-policy"]
    assert '"api_key_required": true' in page and "http://" not in page and "https://" not in page
    assert request(keyed_server, "GET", "/v1/models")[0] == 401  # the API still needs the key
    assert '"api_key_required": false' in request(server, "GET", "/")[2]

    _, _, page = request(server, "GET", "/")
    assert NAME not in page and "<title>tiny&lt;/script&gt;&lt;b&gt; · cpm-infer</title>" in page
    assert '"model": "tiny\\u003c/script>\\u003cb>"' in page  # no value closes the JSON's <script> block
    _, _, schema = request(server, "GET", "/openapi.json")
    assert "/" not in json.loads(schema)["paths"]  # a page for people, not an API operation
    assert request(server, "POST", "/")[0] == 405


# -- the browser ----------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def browser():
    """Headless Chromium (Debian's chromium + chromium-driver), as root in a container, or skip."""
    webdriver = pytest.importorskip("selenium.webdriver", reason="selenium is not installed (pip install selenium)")
    from selenium.webdriver.chrome.service import Service

    chromium = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
    driver_path = shutil.which("chromedriver")
    if not chromium or not driver_path:
        pytest.skip("no chromium/chromedriver (apt-get install chromium chromium-driver)")
    options = webdriver.ChromeOptions()
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1100,900"):
        options.add_argument(arg)
    options.binary_location = chromium
    driver = webdriver.Chrome(options=options, service=Service(driver_path))  # both given: nothing downloaded
    driver.set_script_timeout(WAIT_S)
    yield driver
    driver.quit()


class Page:
    """The page in the browser, driven as a person would: typing in fields, clicking buttons."""

    def __init__(self, driver, srv) -> None:
        from selenium.webdriver.common.by import By

        self.driver, self.by = driver, By
        driver.get(srv.url + "/")
        # What the page sends, kept for the test (the page's own fetch is called unchanged).
        driver.execute_script(
            "window.sent = []; const fetch0 = window.fetch;"
            "window.fetch = (url, init) => { window.sent.push(JSON.parse(init.body)); return fetch0(url, init); };"
        )

    def el(self, id_: str):
        return self.driver.find_element(self.by.ID, id_)

    def fill(self, **fields) -> None:
        for id_, value in fields.items():
            self.el(id_).clear()
            self.el(id_).send_keys(str(value))
            # Chromium without any font keeps only the last key typed into a field.
            typed = self.prop(id_, "value")
            assert typed == str(value), f"typed {value!r} into #{id_}, got {typed!r} (no fonts? fonts-liberation)"

    def prop(self, id_: str, name: str = "textContent"):
        return self.el(id_).get_property(name)

    @property
    def output(self) -> str:
        return self.prop("output")

    @property
    def running(self) -> bool:
        return not self.prop("stop", "disabled")

    @property
    def sent(self) -> list[dict]:
        return self.driver.execute_script("return window.sent")

    def wait(self, predicate, what: str, timeout: float = WAIT_S):
        from selenium.webdriver.support.ui import WebDriverWait

        return WebDriverWait(self.driver, timeout, poll_frequency=0.02).until(lambda _: predicate(), what)

    def generate(self) -> str:
        """Click Generate and wait for the request to end; the status line then."""
        self.el("generate").click()
        self.wait(lambda: self.sent and not self.running, "the request to end")
        return self.prop("status")


def wait_until(predicate, what: str, timeout: float = WAIT_S):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.02)
    raise AssertionError(f"timed out waiting for {what}")


def test_the_text_grows_while_it_streams(browser, server):
    page = Page(browser, server)
    assert browser.title == f"{NAME} · cpm-infer" and not page.el("key-row").is_displayed()
    # Each change of the output while the request runs, recorded in the page as it happens.
    browser.execute_script(
        "window.lengths = []; new MutationObserver(() => { if (!document.getElementById('stop').disabled)"
        "  window.lengths.push(document.getElementById('output').textContent.length); })"
        ".observe(document.getElementById('output'), {childList: true, characterData: true, subtree: true});"
    )
    page.fill(prompt="话说天下", max_tokens=48, seed=11)
    status = page.generate()
    assert status.startswith("done: 48 tokens") and status.endswith("(max_tokens reached)"), status
    growing = sorted({n for n in browser.execute_script("return window.lengths") if n > 0})
    assert len(growing) >= 2, f"the output changed only at lengths {growing} while streaming"
    sent = page.sent[-1]
    assert sent["prompt"] == "话说天下" and sent["stream"] is True and sent["seed"] == 11 and "title" not in sent
    assert {"temperature", "top_p", "top_k", "repetition_penalty"} <= set(sent)
    status, answer = completion(server, sent)  # the same request in one piece: the same text
    assert status == 200 and page.output == answer["choices"][0]["text"] != ""
    assert not page.el("error").is_displayed()


def test_stop_ends_the_request_and_the_server_cancels_it(browser, server):
    page = Page(browser, server)
    before = counters(server)
    page.fill(prompt="滚滚长江", max_tokens=1000)
    page.el("generate").click()
    page.wait(lambda: len(page.output) > 0, "the first text")
    assert page.running
    page.el("stop").click()
    page.wait(lambda: page.prop("status") == "stopped", "the page to say it stopped")
    assert not page.running and page.prop("generate", "disabled") is False
    # The server sees the client leave and cancels the row, well before its 1000 tokens.
    wait_until(
        lambda: counters(server).get("cancelled_disconnected", 0) == before.get("cancelled_disconnected", 0) + 1,
        "the server to cancel the request",
    )
    stopped = page.output
    time.sleep(0.5)
    assert page.output == stopped != "" and page.prop("status") == "stopped"
    generated = counters(server).get("generated_tokens", 0) - before.get("generated_tokens", 0)
    assert generated < 1000
    assert not page.el("error").is_displayed()


def test_a_setting_the_server_refuses_shows_its_message(browser, server):
    page = Page(browser, server)
    page.fill(temperature=5)
    assert page.generate() == "failed: HTTP 400"
    status, refused = completion(server, page.sent[-1])
    assert status == 400 and "temperature" in refused["error"]["message"]
    assert page.el("error").is_displayed() and page.prop("error") == refused["error"]["message"]
    assert page.output == ""


def test_with_an_api_key_the_page_asks_for_it(browser, keyed_server):
    page = Page(browser, keyed_server)
    assert page.el("key-row").is_displayed()
    page.fill(max_tokens=8)
    for key in ("", "wrong"):
        page.fill(**{"api-key": key})
        assert page.generate() == "failed: HTTP 401"
        status, refused = completion(keyed_server, page.sent[-1], key)
        assert status == 401 and page.prop("error") == refused["error"]["message"]
    page.fill(**{"api-key": KEY})
    assert page.generate().startswith("done: 8 tokens")
    assert page.output != "" and not page.el("error").is_displayed()


def test_the_essay_mode_sends_title_and_context(browser, server):
    page = Page(browser, server)
    browser.find_element(page.by.CSS_SELECTOR, "input[name=mode][value=essay]").click()
    assert page.el("title").is_displayed() and not page.el("prompt").is_displayed()
    page.fill(title="三国", context="话说", max_tokens=20, seed=5)
    assert page.generate().startswith("done: 20 tokens")
    sent = page.sent[-1]
    assert sent["title"] == "三国" and sent["context"] == "话说" and "prompt" not in sent
    status, answer = completion(server, sent)
    assert status == 200 and page.output == answer["choices"][0]["text"] != ""
