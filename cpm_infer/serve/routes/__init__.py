"""The app's routes by group; ``cpm_infer.serve.app.create_app`` registers them in this order.

- ``ops``          ``/health`` (never behind the API key), ``/info`` and Prometheus ``/metrics``.
- ``models``       OpenAI's ``/v1/models`` and ``/v1/models/{model}``.
- ``completions``  OpenAI's ``/v1/completions`` (streamed or not).
- ``essay``        the seed service's ``/zuowen`` essay route (GET and POST).
- ``tokens``       ``/tokenize`` and ``/detokenize``, as vLLM's server has them.

Handlers never run the model: they tokenize in a thread pool, submit a job and await its events, so the event loop
stays free for other clients. ``Served`` is what they share: one per app, no global state.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field
from typing import Any

from fastapi import Request

from cpm_infer.backends.base import Backend
from cpm_infer.serve.completions import collect
from cpm_infer.serve.docs import ErrorResponses
from cpm_infer.serve.errors import ClientGoneError, ModelNotFoundError, RequestTimeoutError
from cpm_infer.serve.jobs import DISCONNECTED, TIMEOUT, Job
from cpm_infer.serve.metrics import ServeMetrics
from cpm_infer.serve.scheduler import Scheduler
from cpm_infer.serve.settings import ServeSettings
from cpm_infer.tokenizer import CpmTokenizer


@dataclass(frozen=True)
class Served:
    """What an app serves and the parts its handlers share."""

    backend: Backend
    tokenizer: CpmTokenizer
    settings: ServeSettings
    scheduler: Scheduler
    metrics: ServeMetrics
    errors: ErrorResponses  # the error statuses each route documents (401 only behind an API key)
    model_name: str
    model_info: dict[str, Any]
    max_prompt: int  # the longest prompt: less than the context on a TensorRT engine (--max-input)
    created: int = field(default_factory=lambda: int(time.time()))

    @property
    def n_positions(self) -> int:
        return self.backend.spec.n_positions

    def check_model(self, requested: str | None) -> None:
        """A request naming another model than this one gets 404 (no name: this one)."""
        if requested is not None and requested != self.model_name:
            raise ModelNotFoundError(
                f"the model '{requested}' does not exist on this server; it serves '{self.model_name}' "
                "(GET /v1/models)",
                param="model",
            )

    async def results(self, job: Job, request: Request) -> list[Any]:
        """A non-streaming job's results. A client that disconnects, or a request past its deadline, is
        cancelled so that it stops taking a place in the queue or a row of the running batch."""
        result = asyncio.ensure_future(collect(job))
        gone = asyncio.ensure_future(_disconnected(request))
        try:
            await asyncio.wait({result, gone}, return_when=asyncio.FIRST_COMPLETED)
            if not result.done():
                self.scheduler.cancel(job, DISCONNECTED)
                raise ClientGoneError("the client disconnected")  # nobody reads this answer
            return result.result()
        except RequestTimeoutError:
            self.scheduler.cancel(job, TIMEOUT)
            raise
        except asyncio.CancelledError:  # the server gave up on this handler (forced shutdown)
            self.scheduler.cancel(job, DISCONNECTED)
            raise
        finally:
            gone.cancel()
            result.cancel()


async def _disconnected(request: Request) -> None:
    """Return when the client closes the connection (the body was read already)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass
