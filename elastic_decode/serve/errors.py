"""The server's errors: OpenAI's JSON shape for every failure, one handler per kind.

Every error a client can cause or meet is an `{"error": {"message", "type", "param", "code"}}` body
with the status that says what happened; nothing reaches the client as a traceback or a plain-text
500, and a handled error never drops the keep-alive connection.
"""
from __future__ import annotations

import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..engine.loop import PauseConflict
from ..errors import ElasticDecodeError, InvalidRequestError
from .protocol import NotUnicode

log = logging.getLogger("elastic_decode.serve")


def error_response(status: int, message: str, kind: str = "invalid_request_error", param: str | None = None,
                   code: str | None = None) -> JSONResponse:
    """OpenAI's error shape: {"error": {"message", "type", "param", "code"}}."""
    return JSONResponse({"error": {"message": message, "type": kind, "param": param, "code": code}}, status_code=status)


class BodyTooLarge(Exception):
    def __init__(self, limit: int):
        super().__init__(limit)
        self.limit = limit


class Disconnected(Exception):
    """The client went away; its requests were aborted."""


class StepFailed(Exception):
    """The engine step running this request failed (the loop goes on for the others)."""


class ShuttingDown(Exception):
    """The server is shutting down: the request was refused, or aborted after the drain timeout."""


def too_large(limit: int) -> JSONResponse:
    return error_response(413, f"request body larger than {limit} bytes (the server's bound; see --help)",
                          code="request_too_large")


def shutting_down(message: str = "the server is shutting down") -> JSONResponse:
    return error_response(503, message, "server_error", code="shutting_down")


def validation_error(exc: RequestValidationError) -> JSONResponse:
    first = exc.errors()[0] if exc.errors() else {"loc": (), "msg": "invalid request"}
    loc = [str(x) for x in first.get("loc", ()) if x != "body"]
    if first.get("type") == "json_invalid":
        return error_response(400, f"the body is not valid JSON: {first.get('msg')}")
    # The first named field (a union's alternatives add their type names after it).
    param = next((x for x in loc if not x.isdigit() and "[" not in x), None)
    where = ".".join(loc) or "body"
    return error_response(400, f"{where}: {first.get('msg')}", param=param)


def install_handlers(app: FastAPI) -> None:
    """One handler per error kind (registered on `app`)."""

    @app.exception_handler(RequestValidationError)
    async def _bad_body(request: Request, exc: RequestValidationError):
        return validation_error(exc)

    @app.exception_handler(InvalidRequestError)
    async def _bad_request(request: Request, exc: InvalidRequestError):
        return error_response(400, str(exc), param=exc.param)

    @app.exception_handler(NotUnicode)
    async def _not_unicode(request: Request, exc: NotUnicode):
        return error_response(400, str(exc), param=exc.field)

    @app.exception_handler(PauseConflict)
    async def _conflict(request: Request, exc: PauseConflict):
        return error_response(409, str(exc), code="paused")

    @app.exception_handler(ElasticDecodeError)
    async def _engine_error(request: Request, exc: ElasticDecodeError):
        return error_response(400, str(exc))

    @app.exception_handler(BodyTooLarge)
    async def _too_big(request: Request, exc: BodyTooLarge):
        return too_large(exc.limit)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException):
        kind = "not_found_error" if exc.status_code == 404 else "invalid_request_error"
        return error_response(exc.status_code, str(exc.detail), kind)

    @app.exception_handler(Disconnected)
    async def _gone(request: Request, exc: Disconnected):
        return error_response(499, "the client closed the connection; its requests were aborted")

    @app.exception_handler(StepFailed)
    async def _step_failed(request: Request, exc: StepFailed):
        return error_response(500, f"the engine step failed: {exc}", "server_error")

    @app.exception_handler(ShuttingDown)
    async def _shutdown(request: Request, exc: ShuttingDown):
        return shutting_down(str(exc) or "the server is shutting down")

    @app.exception_handler(Exception)
    async def _internal(request: Request, exc: Exception):
        log.exception("unhandled error in %s", request.url.path)
        return error_response(500, f"internal error ({type(exc).__name__}); the server log has the details",
                              "server_error")
