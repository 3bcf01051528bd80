"""The ASGI middleware in front of every route: the API key, the shutdown gate, and the body bound.

JSON bodies are read here, whole and bounded, before any route sees them: a body over the bound gets
the documented 413 whether it came with a Content-Length or chunked (a bound counted inside the route's
own read would surface as FastAPI's "error parsing the body" 400). The route then reads the buffered
body, and every later `receive()` goes to the connection itself, so a route can still hear the client
leave. `/update_weights` streams its body to a file under its own bound (serve/weights.py).
"""
from __future__ import annotations

import secrets

from .errors import error_response, shutting_down, too_large
from .state import ServerState

DRAIN_BYTES = 64 * 2**20  # an oversized body up to this much past the bound is read before the 413
STREAMED = {"/update_weights"}  # routes that read (and bound) their body themselves
OPEN = {"/health"}  # no API key needed


class Guard:
    def __init__(self, app, state: ServerState):
        self.app, self.state = app, state

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        path, headers = scope["path"], dict(scope["headers"])
        key = self.state.config.api_key
        if key is not None and path not in OPEN:
            given = headers.get(b"authorization", b"")
            if not secrets.compare_digest(given, f"Bearer {key}".encode()):
                return await error_response(401, "a valid API key is needed (Authorization: Bearer <key>)",
                                            "authentication_error", code="invalid_api_key")(scope, receive, send)
        if self.state.shutting_down and path != "/metrics":
            return await shutting_down()(scope, receive, send)
        if path in STREAMED:
            return await self.app(scope, receive, send)
        limit = self.state.config.max_body_bytes
        length = headers.get(b"content-length")
        if length is not None and (not length.isdigit() or int(length) > limit):
            if length.isdigit() and int(length) <= limit + DRAIN_BYTES:
                await _drain(receive, DRAIN_BYTES + limit)
            return await too_large(limit)(scope, receive, send)
        body, complete = await _read(receive, limit)
        if not complete:
            await _drain(receive, DRAIN_BYTES)
            return await too_large(limit)(scope, receive, send)
        await self.app(scope, _replay(body, receive), send)


async def _read(receive, limit: int) -> tuple[bytes, bool]:
    """The whole body, or (what was read, False) once it passes `limit`."""
    parts, size = [], 0
    while True:
        message = await receive()
        if message["type"] != "http.request":  # the client left mid-body: the route hears it
            return b"".join(parts), True
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > limit:
            return b"", False
        parts.append(chunk)
        if not message.get("more_body"):
            return b"".join(parts), True


async def _drain(receive, most: int) -> None:
    """Read and drop up to `most` more bytes of a refused body: a client still sending it when the answer
    comes and the connection closes would see a broken pipe instead of the 413."""
    seen = 0
    while seen <= most:
        message = await receive()
        if message["type"] != "http.request" or not message.get("more_body"):
            return
        seen += len(message.get("body", b""))


def _replay(body: bytes, receive):
    """A receive that gives the buffered body once, then the connection's own messages (a disconnect)."""
    sent = False

    async def replayed():
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return replayed
