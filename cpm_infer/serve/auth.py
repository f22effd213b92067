"""Optional API key: ``Authorization: Bearer KEY`` on every route but ``/health``, compared in constant time."""

from __future__ import annotations

import hmac
import os
from collections.abc import Awaitable, Callable

from fastapi import Security
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from cpm_infer.serve.errors import AuthenticationError

API_KEY_ENV = "CPM_API_KEY"


def api_key_from_env() -> str | None:
    return os.environ.get(API_KEY_ENV) or None


def require_api_key(api_key: str) -> Callable[..., Awaitable[None]]:
    """A dependency refusing requests without ``Authorization: Bearer <api_key>`` (401 in OpenAI's shape)."""
    expected = api_key.encode("utf-8")
    bearer = HTTPBearer(auto_error=False, description="The server's API key (`--api-key` or $CPM_API_KEY).")

    async def check(credentials: HTTPAuthorizationCredentials | None = Security(bearer)) -> None:  # noqa: B008
        if credentials is None:
            raise AuthenticationError("no API key given: send the header 'Authorization: Bearer YOUR_KEY'")
        # Latin-1 as the header arrived (Starlette decodes headers so), then compared in constant time.
        if not hmac.compare_digest(credentials.credentials.encode("latin-1", "replace"), expected):
            raise AuthenticationError("incorrect API key")

    return check
