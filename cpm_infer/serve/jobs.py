"""A request as the generation side sees it (prompts, settings, deadline) and the events it sends back.

A job has ``len(prompts) x n`` rows, one per choice: choice ``c`` is sample ``c % n`` of prompt ``c // n``
(OpenAI's numbering). The generation thread posts events; the request's handler awaits them on its event
loop (``Job.post`` crosses the thread boundary with ``call_soon_threadsafe``).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from cpm_infer.config import GenerationConfig
from cpm_infer.engine.generate import GenerationResult
from cpm_infer.serve.errors import ClientGoneError, RequestTimeoutError, ServeError, ShuttingDownError

# Why a request was cancelled (also its rows' finish reason inside the engine).
DISCONNECTED, TIMEOUT, SHUTDOWN = "disconnected", "timeout", "shutdown"


@dataclass
class TokenEvent:
    """Newly final text of one choice (streaming jobs), with the token's log-probabilities when asked."""

    choice: int
    text: str
    logprob: Any = None  # the engine's TokenLogprob, or None


@dataclass
class ChoiceDone:
    choice: int
    result: GenerationResult


@dataclass
class ErrorEvent:
    error: ServeError


Event = TokenEvent | ChoiceDone | ErrorEvent


class Job:
    """One request. Created on the event loop; the generation thread changes ``state`` (under its own lock),
    sets the timestamps and posts events. ``stop_reason`` set = cancelled (a plain attribute: atomic)."""

    def __init__(
        self,
        prompts: Sequence[Sequence[int]],
        config: GenerationConfig,
        *,
        stream: bool,
        timeout_s: float,
        speculate: bool = True,
    ) -> None:
        self.prompts = [list(p) for p in prompts]
        self.config = config
        self.speculate = speculate  # False: its rows never decode speculatively (the request opted out)
        self.n = config.num_samples
        self.rows = len(self.prompts) * self.n
        self.stream = stream
        self.created = time.monotonic()
        self.deadline = self.created + timeout_s
        self.started: float | None = None  # admitted to the running batch
        self.first_token: float | None = None
        self.finished: float | None = None
        self.batch_rows = 0  # the largest batch its rows ran in
        self.row_ids: list[int] = []  # its rows in the engine
        self.rows_done = 0
        self.state = "pending"  # -> "running" -> "done"
        self.stop_reason: str | None = None
        self._loop = asyncio.get_running_loop()
        self._events: asyncio.Queue[Event] = asyncio.Queue()

    @property
    def prompt_tokens(self) -> int:
        return sum(len(p) for p in self.prompts)

    def post(self, event: Event) -> None:
        """Hand an event to the request's event loop (from any thread)."""
        try:
            self._loop.call_soon_threadsafe(self._events.put_nowait, event)
        except RuntimeError:  # the loop is closed: nobody waits for this request any more
            pass

    async def next_event(self, idle_s: float | None = None) -> Event | None:
        """The next event; None after ``idle_s`` without one; RequestTimeoutError at the deadline."""
        remaining = self.deadline - time.monotonic()
        wait = remaining if idle_s is None else min(idle_s, remaining)
        try:
            return await asyncio.wait_for(self._events.get(), max(wait, 0.0))
        except asyncio.TimeoutError as exc:
            if wait < remaining:
                return None
            limit = self.deadline - self.created
            raise RequestTimeoutError(f"the request did not finish within the server's {limit:g} s timeout") from exc


def error_for(reason: str) -> ServeError:
    """What a cancelled request's handler gets."""
    if reason == SHUTDOWN:
        return ShuttingDownError("the server shut down before the request finished; retry on another replica")
    if reason == TIMEOUT:
        return RequestTimeoutError("the request did not finish within the server's timeout")
    return ClientGoneError("the client disconnected")
