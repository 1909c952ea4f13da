"""The API key, checked first: an ASGI middleware outside everything else.

With ``--api-key``, every route needs ``Authorization: Bearer KEY``: the OpenAI API,
``/tokenize`` and ``/detokenize`` (they compute), ``/docs`` and ``/openapi.json``,
and unknown paths (a client without the key learns nothing about the routes). Open:
``/health`` (probes), and ``/metrics`` unless ``--protect-metrics`` (scrapers).

It runs before the body limit and before FastAPI reads the body, so a client without
the key gets 401 from its headers alone, whatever its body holds (malformed JSON, 16
MiB of text): it cannot make the server read, parse or tokenize anything.
"""

from __future__ import annotations

import hmac

from fastapi.responses import JSONResponse
from starlette.types import ASGIApp, Receive, Scope, Send

from .errors import error_body

MESSAGE = "a valid API key is required: Authorization: Bearer KEY"


def open_paths(protect_metrics: bool) -> frozenset[str]:
    """Routes that answer without the key."""
    return frozenset({"/health"} if protect_metrics else {"/health", "/metrics"})


class APIKeyAuth:
    def __init__(self, app: ASGIApp, api_key: str, open_paths: frozenset[str]) -> None:
        self.app, self.open = app, open_paths
        self._key = api_key.encode()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] in self.open or self._valid(scope):
            await self.app(scope, receive, send)
            return
        response = JSONResponse(
            error_body(401, MESSAGE), status_code=401, headers={"WWW-Authenticate": "Bearer"}
        )
        await response(scope, receive, send)

    def _valid(self, scope: Scope) -> bool:
        header = b""
        for name, value in scope["headers"]:
            if name == b"authorization":
                header = value
                break
        scheme, _, token = header.partition(b" ")
        # Constant-time comparison: the key must not leak through response timing.
        return scheme.lower() == b"bearer" and hmac.compare_digest(token, self._key)
