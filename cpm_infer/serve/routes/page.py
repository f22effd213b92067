"""``/``: a page to try the model in a browser (``cpm_infer/serve/static/index.html``: HTML, CSS and vanilla JS,
nothing fetched from elsewhere). It streams ``POST /v1/completions`` and shows the text as it arrives.

The page is public, outside the API-key router: it holds nothing but the model's name, whether the server needs a
key and the settings' defaults (a JSON block in the page, rendered once per app); its requests carry the key the
user types. Left out of the OpenAPI schema on purpose: it is a page for people, not an API operation.
"""

from __future__ import annotations

import base64
import hashlib
import html
import json
import re
from importlib.resources import files

from fastapi import FastAPI
from fastapi.responses import HTMLResponse

from cpm_infer.serve.routes import Served
from cpm_infer.settings import for_door

# The settings the page offers, under their request names.
FIELDS = ("max_tokens", "temperature", "top_p", "top_k", "repetition_penalty", "seed")


def add_page(app: FastAPI, served: Served, *, key_required: bool) -> None:
    """On the app itself, as ``/health``: the page needs no key (its API calls do)."""
    page, headers = render(served, key_required)

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    async def index() -> HTMLResponse:
        return HTMLResponse(page, headers=headers)


def render(served: Served, key_required: bool) -> tuple[str, dict[str, str]]:
    """The page for this app and its headers: a Content-Security-Policy that runs only the page's own script
    (by its hash) and lets it talk to this server only."""
    settings = served.settings
    defaults = {s.api_name: s.request_default for s in for_door("serve") if s.api_name in FIELDS}
    defaults["max_tokens"] = min(settings.default_max_new_tokens, settings.max_new_tokens_cap)
    config = {
        "model": served.model_name,
        "api_key_required": key_required,
        "max_tokens_cap": settings.max_new_tokens_cap,
        "defaults": defaults,
    }
    template = files("cpm_infer.serve").joinpath("static/index.html").read_text(encoding="utf-8")
    # The JSON's "<" escaped, so that no value can close the <script> block it sits in.
    values = {
        "model": html.escape(served.model_name),
        "config": json.dumps(config, ensure_ascii=False).replace("<", "\\u003c"),
    }
    page = re.sub(r"\{\{(model|config)\}\}", lambda m: values[m.group(1)], template)
    scripts = " ".join(_sha256(s) for s in re.findall(r"<script>(.*?)</script>", page, re.DOTALL))
    policy = (
        f"default-src 'none'; script-src {scripts}; style-src 'unsafe-inline'; connect-src 'self'; img-src data:; "
        "base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
    )
    return page, {"Content-Security-Policy": policy, "X-Content-Type-Options": "nosniff", "Cache-Control": "no-cache"}


def _sha256(source: str) -> str:
    return "'sha256-" + base64.b64encode(hashlib.sha256(source.encode("utf-8")).digest()).decode("ascii") + "'"
