"""uvicorn with a graceful stop, in the foreground (``cpm serve``) or in a background thread (tests,
benchmarks).

On SIGTERM / Ctrl-C: the listening socket closes, new requests on open connections get 503, requests
in flight get ``shutdown_grace_s`` to finish, then the rest are cancelled with a 503 (or an SSE error
event) instead of a dropped connection; the worker thread stops and the process exits 0. A second
Ctrl-C forces the exit.
"""

from __future__ import annotations

import logging
import signal
import socket
import threading
import time
from types import FrameType

import uvicorn
from fastapi import FastAPI

from cpm_infer.errors import CpmError
from cpm_infer.serve.scheduler import Scheduler

log = logging.getLogger(__name__)


class ServerStartError(CpmError):
    """The server could not bind its address or did not come up."""


class CpmServer(uvicorn.Server):
    def __init__(self, config: uvicorn.Config, scheduler: Scheduler, grace_s: float) -> None:
        super().__init__(config)
        self.scheduler = scheduler
        self.grace_s = grace_s

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        # As uvicorn's, minus re-raising the signal after the shutdown: a graceful stop exits 0.
        self.scheduler.begin_shutdown(self.grace_s)
        if self.should_exit and sig == signal.SIGINT:
            self.force_exit = True
        else:
            self.should_exit = True

    def request_exit(self) -> None:
        """Begin the graceful stop from any thread (what a signal does in the foreground)."""
        self.scheduler.begin_shutdown(self.grace_s)
        self.should_exit = True


def bind(host: str, port: int) -> socket.socket:
    """A listening socket (port 0 picks a free one), or a one-line error naming the address."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        raise ServerStartError(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from exc
    sock.listen(2048)
    sock.set_inheritable(True)
    return sock


def url_host(host: str) -> str:
    """``host`` as a URL names it (an IPv6 address in brackets)."""
    return f"[{host}]" if ":" in host else host


def make_server(app: FastAPI, *, log_level: str = "warning", access_log: bool = False) -> CpmServer:
    grace = app.state.settings.shutdown_grace_s
    config = uvicorn.Config(
        app,
        log_level=log_level,
        access_log=access_log,
        lifespan="on",
        server_header=False,
        # A backstop only: the scheduler cancels what is left after the grace, so handlers answer first.
        timeout_graceful_shutdown=int(grace) + 5,
    )
    return CpmServer(config, app.state.scheduler, grace)


def serve_forever(app: FastAPI, sock: socket.socket, *, log_level: str = "warning", access_log: bool = False) -> None:
    """Serve on ``sock`` until SIGINT/SIGTERM, then stop gracefully (blocking)."""
    server = make_server(app, log_level=log_level, access_log=access_log)
    server.run(sockets=[sock])
    if not server.started:
        raise ServerStartError("the server did not start (see the log above)")


class BackgroundServer:
    """The real server on a loopback port, in a thread: ``with BackgroundServer(app) as srv: srv.url``."""

    def __init__(self, app: FastAPI, host: str = "127.0.0.1", port: int = 0, *, log_level: str = "warning") -> None:
        self.sock = bind(host, port)
        self.host, self.port = self.sock.getsockname()[:2]
        self.url = f"http://{self.host}:{self.port}"
        self.server = make_server(app, log_level=log_level)
        self.thread = threading.Thread(
            target=self.server.run, kwargs={"sockets": [self.sock]}, name="cpm-serve", daemon=True
        )

    def start(self, timeout: float = 60.0) -> BackgroundServer:
        self.thread.start()
        deadline = time.monotonic() + timeout
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise ServerStartError(f"the server did not start within {timeout:g} s")
            time.sleep(0.02)
        return self

    def stop(self, timeout: float = 60.0) -> None:
        """Graceful stop; returns once the server thread has exited."""
        self.server.request_exit()
        self.thread.join(timeout)
        self.sock.close()
        if self.thread.is_alive():
            raise ServerStartError(f"the server did not stop within {timeout:g} s")

    def __enter__(self) -> BackgroundServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
