"""``cpm serve``: an HTTP generation service (FastAPI + uvicorn) over one model instance.

- ``settings``     server limits (batch rows, batching mode, queue size, caps, timeouts), declared once
                   (``fields``: default, range, help and flag of each field; the CLI options come from them).
- ``replicas``     what a replica serves and how many run (``Scaling``, declared the same way).
- ``scheduler``    one thread driving the engine: a bounded FIFO queue, continuous (or static) batching.
- ``jobs``         a request as the scheduler sees it, and the events it sends back to the handler.
- ``schemas``      request models (OpenAI's Completions fields + CPM's extras, the essay route) with their limits.
- ``completions``  request -> prompts and GenerationConfig; events -> OpenAI answers and stream chunks.
- ``errors``       the errors the server answers, in OpenAI's shape; ``web`` the HTTP plumbing around them.
- ``docs``         response shapes and statuses for the OpenAPI schema; ``metrics`` Prometheus; ``auth`` API key.
- ``app``          the FastAPI app factory; ``routes`` its route groups; ``server`` uvicorn with graceful shutdown
                   (foreground or a thread); ``ray_app`` the same app on Ray Serve.

FastAPI, uvicorn and prometheus-client are an optional extra (``pip install 'cpm-infer[serve]'``); import this
package's modules only where they are needed (``settings``, ``fields`` and ``replicas`` are light: the CLI imports
them at start).
"""
