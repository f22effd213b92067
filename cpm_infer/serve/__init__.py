"""``cpm serve``: an HTTP generation service (FastAPI + uvicorn) over one model instance.

- ``settings``  server limits (batch size, batch wait, queue size, caps, timeouts).
- ``batcher``   the dynamic batcher: a bounded queue drained by one worker thread into ``generate`` batches.
- ``schemas``   request/response models; sampling values are validated by ``GenerationConfig``.
- ``app``       the FastAPI app factory (completions, the seed's ``/zuowen`` route, health, model info).
- ``server``    uvicorn with graceful shutdown, in the foreground (CLI) or a background thread (tests).

FastAPI and uvicorn are an optional extra (``pip install 'cpm-infer[serve]'``); import this package's
modules only where they are needed.
"""
