"""The HTTP server: OpenAI-compatible routes with budgets, a token-level /generate for RL trainers,
pause / resume / update_weights, Prometheus /metrics. `build_app(loop, config)` makes the FastAPI
app over a running EngineLoop; `python -m elastic_decode.serve` starts one with uvicorn.

Response shapes follow OpenAI's, with vLLM's reasoning fields: `message.reasoning` (and
`reasoning_content` for older clients) holds the thinking, `message.content` the solution. Each
choice also carries `budget`: {think_tokens, solution_tokens, forced_tokens, forced_end}. With
`logprobs`, every token (thinking, marker and solution) is listed with its true logprob and a
`forced` flag (the record vLLM RFC #54864 asks for).
"""
from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import secrets
import time
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..engine_loop import EngineLoop, RequestUpdate
from ..errors import ElasticDecodeError, InvalidRequestError
from ..sampling_params import SamplingParams
from .metrics import render_metrics
from .protocol import (
    ChatCompletionRequest,
    CompletionRequest,
    GenerateRequest,
    PauseRequest,
    TokenizeRequest,
    UpdateWeightsRequest,
)
from .text import CompletionText, TextDelta

log = logging.getLogger("elastic_decode.serve")


@dataclass(frozen=True)
class ServerConfig:
    model_name: str  # what /v1/models lists and requests may name
    api_key: str | None = None  # when set, every route but /health needs "Authorization: Bearer <key>"
    max_body_bytes: int = 16 * 2**20  # request bodies (JSON); /update_weights has its own bound
    max_weights_bytes: int = 64 * 2**30  # a safetensors body posted to /update_weights
    max_n: int = 64  # completions per prompt
    max_prompts: int = 1024  # prompts in one /v1/completions or /generate request
    max_tokens: int | None = None  # cap on max_tokens; None = the context window


# -- errors ---------------------------------------------------------------------------------


def error_response(status: int, message: str, kind: str = "invalid_request_error", param: str | None = None,
                   code: str | None = None) -> JSONResponse:
    """OpenAI's error shape: {"error": {"message", "type", "param", "code"}}."""
    return JSONResponse({"error": {"message": message, "type": kind, "param": param, "code": code}}, status_code=status)


DRAIN_BYTES = 64 * 2**20  # an oversized body up to this much past the bound is read before the 413


class BodyTooLarge(Exception):
    pass


class _Guard:
    """ASGI middleware before any route: the API key, then the body-size bound (Content-Length
    checked up front, a chunked body counted as it arrives)."""

    def __init__(self, app, config: ServerConfig):
        self.app, self.config = app, config

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        path, headers = scope["path"], dict(scope["headers"])
        key = self.config.api_key
        if key is not None and path != "/health":
            given = headers.get(b"authorization", b"")
            if not secrets.compare_digest(given, f"Bearer {key}".encode()):
                return await error_response(401, "a valid API key is needed (Authorization: Bearer <key>)",
                                            "authentication_error", code="invalid_api_key")(scope, receive, send)
        limit = self.config.max_weights_bytes if path == "/update_weights" else self.config.max_body_bytes
        length = headers.get(b"content-length")
        if length is not None and (not length.isdigit() or int(length) > limit):
            if length.isdigit() and int(length) <= limit + DRAIN_BYTES:
                # Read (and drop) a moderately oversized body first: a client still sending it when the
                # answer comes and the connection closes would see a broken pipe instead of the 413.
                while (message := await receive())["type"] == "http.request" and message.get("more_body"):
                    pass
            return await _too_large(limit)(scope, receive, send)
        seen = 0

        async def counted():
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > limit:
                    raise BodyTooLarge
            return message

        await self.app(scope, counted, send)


def _too_large(limit: int) -> JSONResponse:
    return error_response(413, f"request body larger than {limit} bytes (the server's bound; see --help)",
                          code="request_too_large")


def _validation_error(exc: RequestValidationError) -> JSONResponse:
    first = exc.errors()[0] if exc.errors() else {"loc": (), "msg": "invalid request"}
    loc = [str(x) for x in first.get("loc", ()) if x != "body"]
    if first.get("type") == "json_invalid":
        return error_response(400, f"the body is not valid JSON: {first.get('msg')}")
    # The first named field (a union's alternatives add their type names after it).
    param = next((x for x in loc if not x.isdigit() and "[" not in x), None)
    where = ".".join(loc) or "body"
    return error_response(400, f"{where}: {first.get('msg')}", param=param)


# -- one request's completions as they arrive -------------------------------------------------


class Disconnected(Exception):
    pass


class StepFailed(Exception):
    """The engine step running this request failed (the loop goes on for the others)."""


class _Run:
    """The requests of one HTTP call (one per prompt, n completions each) on the engine loop."""

    def __init__(self, loop: EngineLoop, decode: Callable, prompts: list[list[int]], params: SamplingParams,
                 stop: list[str], stream: bool):
        self.loop = loop
        self.n = params.n
        self.prompts = prompts
        self.texts = [[CompletionText(decode, params.think_budget is not None, stop, stream) for _ in range(params.n)]
                      for _ in prompts]
        for k, ids in enumerate(prompts):  # every prompt checked before any is queued
            try:
                loop.engine.check_request(ids, params)
            except InvalidRequestError as e:
                where = f"prompt {k}: " if len(prompts) > 1 else ""
                raise InvalidRequestError(where + str(e), param=e.param) from None
        self.queue: asyncio.Queue[tuple[int, RequestUpdate]] = asyncio.Queue()
        self.pending = len(prompts)
        aloop = asyncio.get_running_loop()
        self.handles: list[int] = []
        try:
            for k, ids in enumerate(prompts):
                self.handles.append(loop.submit(ids, params, partial(self._post, aloop, k)))
        except BaseException:
            self.abort()
            raise

    def _post(self, aloop: asyncio.AbstractEventLoop, k: int, update: RequestUpdate) -> None:
        aloop.call_soon_threadsafe(self.queue.put_nowait, (k, update))  # called on the loop thread

    def abort(self) -> None:
        for handle in self.handles:
            self.loop.abort(handle)

    async def events(self, request: Request | None = None) -> AsyncIterator[tuple[int, int, TextDelta, int]]:
        """(prompt, completion, new text, tokens before this update) as updates arrive. With
        `request`, a client that disconnects raises Disconnected."""
        while self.pending:
            if request is None:
                k, update = await self.queue.get()
            else:
                try:
                    k, update = await asyncio.wait_for(self.queue.get(), timeout=0.5)
                except asyncio.TimeoutError:
                    if await request.is_disconnected():
                        raise Disconnected from None
                    continue
            if update.error is not None:
                raise StepFailed(f"{type(update.error).__name__}: {update.error}")
            for delta in update.completions:
                text = self.texts[k][delta.index]
                before, was_stopped = len(text.token_ids), text.stopped
                piece = text.feed(delta)
                if text.stopped and not was_stopped and delta.finish_reason is None:
                    self.loop.stop_completion(self.handles[k], delta.index)
                yield k, delta.index, piece, before
            if update.finished:
                self.pending -= 1

    async def finish(self, request: Request) -> None:
        """Wait for every completion (aborting them all if the client leaves)."""
        try:
            async for _ in self.events(request):
                pass
        finally:
            if self.pending:
                self.abort()

    def all_texts(self) -> list[CompletionText]:
        return [t for row in self.texts for t in row]


def _budget(text: CompletionText) -> dict:
    last = text.last
    start = text.content_start if text.content_start is not None else len(text.token_ids)
    return {
        "think_tokens": text.think_tokens,
        "solution_tokens": max(0, len(text.token_ids) - start),
        "forced_tokens": sum(text.forced_mask),
        "forced_end": bool(last.forced_end) if last is not None else False,
    }


def _usage(run: _Run) -> dict:
    prompt = sum(len(p) for p in run.prompts) * run.n
    texts = run.all_texts()
    completion = sum(len(t.token_ids) for t in texts)
    reasoning = sum(_budget(t)["think_tokens"] for t in texts)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion,
            "completion_tokens_details": {"reasoning_tokens": reasoning}}


def _token_entries(decode, ids: list[int], logprobs: list[float], forced: list[int],
                   top: list[list[tuple[int, float]]] | None = None) -> list[dict]:
    """OpenAI's chat logprobs entries (`top_logprobs`: the raw distribution's alternatives)."""
    out = []
    for k, (t, lp, f) in enumerate(zip(ids, logprobs, forced)):
        s = decode([t])
        alternatives = [{"token": (a := decode([i])), "logprob": v, "bytes": list(a.encode())}
                        for i, v in top[k]] if top else []
        out.append({"token": s, "logprob": lp, "bytes": list(s.encode()), "top_logprobs": alternatives,
                    "forced": bool(f)})
    return out


def _sse(payload: dict | str) -> str:
    return f"data: {payload if isinstance(payload, str) else json.dumps(payload)}\n\n"


# -- the app ----------------------------------------------------------------------------------


def build_app(loop: EngineLoop, config: ServerConfig) -> FastAPI:
    app = FastAPI(title="elastic_decode", docs_url=None, redoc_url=None, openapi_url=None)
    tokenizer = loop.engine.tokenizer
    decode = tokenizer.decode
    started = int(time.time())

    @app.exception_handler(RequestValidationError)
    async def _bad_body(request: Request, exc: RequestValidationError):
        return _validation_error(exc)

    @app.exception_handler(InvalidRequestError)
    async def _bad_request(request: Request, exc: InvalidRequestError):
        return error_response(400, str(exc), param=exc.param)

    @app.exception_handler(ElasticDecodeError)
    async def _engine_error(request: Request, exc: ElasticDecodeError):
        return error_response(400, str(exc))

    @app.exception_handler(BodyTooLarge)
    async def _too_big(request: Request, exc: BodyTooLarge):
        path = request.url.path
        return _too_large(config.max_weights_bytes if path == "/update_weights" else config.max_body_bytes)

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

    @app.exception_handler(Exception)
    async def _internal(request: Request, exc: Exception):
        log.exception("unhandled error in %s", request.url.path)
        return error_response(500, f"internal error ({type(exc).__name__}); the server log has the details",
                              "server_error")

    def check_model(name: str | None) -> JSONResponse | None:
        if name is not None and name != config.model_name:
            return error_response(404, f"the model {name!r} does not exist (this server serves "
                                       f"{config.model_name!r})", "not_found_error", param="model",
                                  code="model_not_found")
        return None

    def bounded(params: SamplingParams, prompts: int) -> None:
        if params.n > config.max_n:
            raise InvalidRequestError(f"n must be at most {config.max_n} on this server (--max-n)", param="n")
        if prompts > config.max_prompts:
            raise InvalidRequestError(f"at most {config.max_prompts} prompts per request (--max-prompts)",
                                      param="prompt")
        if config.max_tokens is not None and params.max_tokens is not None and params.max_tokens > config.max_tokens:
            raise InvalidRequestError(f"max_tokens must be at most {config.max_tokens} on this server (--max-tokens)",
                                      param="max_tokens")

    def capped(params: SamplingParams) -> SamplingParams:
        """Without a max_tokens, the server's cap (if any) applies."""
        if params.max_tokens is None and config.max_tokens is not None:
            return dataclasses.replace(params, max_tokens=config.max_tokens)
        return params

    def encode_messages(messages: list[dict]) -> list[int]:
        if not any(m["content"].strip() for m in messages):
            raise InvalidRequestError("every message is empty", param="messages")
        try:
            return tokenizer.encode_chat(messages)
        except InvalidRequestError as e:
            raise InvalidRequestError(str(e), param="messages") from None
        except Exception as e:  # noqa: BLE001 - a chat template may reject a conversation in its own way
            raise InvalidRequestError(f"the chat template rejected these messages: {e}", param="messages") from None

    # -- plain routes ------------------------------------------------------------------

    @app.get("/health")
    async def health():
        return {"status": "ok", "paused": loop.paused}

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": config.model_name, "object": "model", "created": started,
                                            "owned_by": "elastic_decode", "max_model_len": loop.engine.window}]}

    @app.get("/metrics")
    async def metrics():
        return PlainTextResponse(render_metrics(loop), media_type="text/plain; version=0.0.4")

    # -- OpenAI routes -----------------------------------------------------------------

    @app.post("/v1/chat/completions")
    async def chat(body: ChatCompletionRequest, request: Request):
        if (missing := check_model(body.model)) is not None:
            return missing
        params = capped(body.params(None))
        bounded(params, 1)
        prompt = encode_messages([{"role": m.role, "content": m.text()} for m in body.messages])
        run = _Run(loop, decode, [prompt], params, body.stop_strings(), body.stream)
        rid, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
        if body.stream:
            usage = body.stream_options is not None and body.stream_options.include_usage
            return StreamingResponse(_chat_stream(run, rid, created, body.logprobs, usage),
                                     media_type="text/event-stream")
        await run.finish(request)
        choices = []
        for j, text in enumerate(run.texts[0]):
            reasoning, _, content = text.full_text()
            message = {"role": "assistant", "content": content}
            if reasoning is not None:
                message["reasoning"] = message["reasoning_content"] = reasoning
            choices.append({
                "index": j, "message": message, "finish_reason": text.finish_reason, "budget": _budget(text),
                "logprobs": {"content": _token_entries(decode, text.token_ids, text.logprobs, text.forced_mask,
                                                       text.top_logprobs)}
                if body.logprobs else None,
            })
        return {"id": rid, "object": "chat.completion", "created": created, "model": config.model_name,
                "choices": choices, "usage": _usage(run)}

    async def _chat_stream(run: _Run, rid: str, created: int, logprobs: bool, usage: bool):
        def chunk(j: int, delta: dict, finish: str | None = None, extra: dict | None = None) -> dict:
            choice = {"index": j, "delta": delta, "logprobs": extra, "finish_reason": finish}
            return {"id": rid, "object": "chat.completion.chunk", "created": created, "model": config.model_name,
                    "choices": [choice]}

        announced: set[int] = set()
        try:
            for j in range(run.n):
                yield _sse(chunk(j, {"role": "assistant", "content": ""}))
            async for _, j, piece, before in run.events():
                text = run.texts[0][j]
                delta = {}
                if piece.reasoning:
                    delta["reasoning"] = delta["reasoning_content"] = piece.reasoning
                if piece.content:
                    delta["content"] = piece.content
                new = slice(before, len(text.token_ids))
                lp = ({"content": _token_entries(decode, text.token_ids[new], text.logprobs[new], text.forced_mask[new],
                                                 text.top_logprobs[new])}
                      if logprobs and new.start < new.stop else None)
                if delta or lp:
                    yield _sse(chunk(j, delta, extra=lp))
                if text.finished and j not in announced:
                    announced.add(j)
                    final = chunk(j, {}, text.finish_reason)
                    final["choices"][0]["budget"] = _budget(text)
                    yield _sse(final)
            if usage:
                yield _sse({"id": rid, "object": "chat.completion.chunk", "created": created,
                            "model": config.model_name, "choices": [], "usage": _usage(run)})
            yield _sse("[DONE]")
        except Exception as e:  # noqa: BLE001 - the stream has started: report in it, as OpenAI does
            log.error("stream failed: %s: %s", type(e).__name__, e)
            yield _sse({"error": {"message": str(e), "type": "server_error", "param": None, "code": None}})
        finally:
            if run.pending:  # the client went away (or the stream failed): free the engine's work
                run.abort()

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, request: Request):
        if (missing := check_model(body.model)) is not None:
            return missing
        params = capped(body.params(None))
        prompts = []
        for p in body.prompts():
            if isinstance(p, str):
                if not p:
                    raise InvalidRequestError("a prompt is empty", param="prompt")
                prompts.append(tokenizer.encode(p))
            else:
                prompts.append(list(p))
        bounded(params, len(prompts))
        run = _Run(loop, decode, prompts, params, body.stop_strings(), body.stream)
        rid, created = f"cmpl-{uuid.uuid4().hex}", int(time.time())
        want_logprobs = body.logprobs is not None
        if body.stream:
            usage = body.stream_options is not None and body.stream_options.include_usage
            return StreamingResponse(_completion_stream(run, rid, created, want_logprobs, usage),
                                     media_type="text/event-stream")
        await run.finish(request)
        choices = []
        for k, row in enumerate(run.texts):
            for j, text in enumerate(row):
                reasoning, marker, content = text.full_text()
                choices.append({
                    "index": k * run.n + j, "text": (reasoning or "") + marker + content,
                    "finish_reason": text.finish_reason, "budget": _budget(text),
                    "logprobs": _completion_logprobs(decode, text.token_ids, text.logprobs, text.forced_mask,
                                                     text.top_logprobs) if want_logprobs else None,
                })
        return {"id": rid, "object": "text_completion", "created": created, "model": config.model_name,
                "choices": choices, "usage": _usage(run)}

    async def _completion_stream(run: _Run, rid: str, created: int, logprobs: bool, usage: bool):
        def chunk(index: int, text: str, finish: str | None = None, extra: dict | None = None) -> dict:
            return {"id": rid, "object": "text_completion", "created": created, "model": config.model_name,
                    "choices": [{"index": index, "text": text, "logprobs": extra, "finish_reason": finish}]}

        announced: set[tuple[int, int]] = set()
        try:
            async for k, j, piece, before in run.events():
                text = run.texts[k][j]
                new = slice(before, len(text.token_ids))
                piece_text = piece.reasoning + piece.marker + piece.content
                lp = (_completion_logprobs(decode, text.token_ids[new], text.logprobs[new], text.forced_mask[new],
                                           text.top_logprobs[new]) if logprobs and new.start < new.stop else None)
                if piece_text or lp:
                    yield _sse(chunk(k * run.n + j, piece_text, extra=lp))
                if text.finished and (k, j) not in announced:
                    announced.add((k, j))
                    final = chunk(k * run.n + j, "", text.finish_reason)
                    final["choices"][0]["budget"] = _budget(text)
                    yield _sse(final)
            if usage:
                yield _sse({"id": rid, "object": "text_completion", "created": created, "model": config.model_name,
                            "choices": [], "usage": _usage(run)})
            yield _sse("[DONE]")
        except Exception as e:  # noqa: BLE001
            log.error("stream failed: %s: %s", type(e).__name__, e)
            yield _sse({"error": {"message": str(e), "type": "server_error", "param": None, "code": None}})
        finally:
            if run.pending:
                run.abort()

    # -- for RL trainers ---------------------------------------------------------------

    @app.post("/generate")
    async def generate(body: GenerateRequest, request: Request):
        params = capped(body.params())
        prompts = body.prompts()
        bounded(params, len(prompts))
        run = _Run(loop, decode, prompts, params, [], stream=False)
        await run.finish(request)
        outputs = []
        for ids, row in zip(prompts, run.texts):
            completions = []
            for j, text in enumerate(row):
                item = {"index": j, "token_ids": text.token_ids, "logprobs": text.logprobs,
                        "forced_mask": text.forced_mask, "finish_reason": text.finish_reason, **_budget(text),
                        "top_logprobs": text.top_logprobs if params.logprobs else None}
                if body.return_text:
                    reasoning, _, content = text.full_text()
                    item.update(text=decode(text.token_ids), thinking_text=reasoning or "", solution_text=content)
                completions.append(item)
            outputs.append({"prompt_token_ids": ids, "completions": completions})
        return {"pad_token_id": tokenizer.pad_id, "outputs": outputs, "usage": _usage(run)}

    @app.post("/tokenize")
    async def tokenize(body: TokenizeRequest):
        if (missing := check_model(body.model)) is not None:
            return missing
        if (body.prompt is None) == (body.messages is None):
            raise InvalidRequestError('give "prompt" or "messages" (one of them)', param="prompt")
        if body.prompt is not None:
            if not body.prompt:
                raise InvalidRequestError("prompt is empty", param="prompt")
            tokens = tokenizer.encode(body.prompt)
        else:
            tokens = encode_messages([{"role": m.role, "content": m.text()} for m in body.messages])
        return {"tokens": tokens, "count": len(tokens), "max_model_len": loop.engine.window}

    @app.post("/pause")
    async def pause(body: PauseRequest | None = None):
        mode = (body or PauseRequest()).mode
        await asyncio.to_thread(loop.pause, mode)
        return {"paused": True, "mode": mode}

    @app.post("/resume")
    async def resume():
        await asyncio.to_thread(loop.resume)
        return {"paused": False}

    @app.post("/update_weights")
    async def update_weights(request: Request):
        start = time.perf_counter()
        kind = request.headers.get("content-type", "").split(";")[0].strip()
        if kind == "application/json":
            try:
                body = UpdateWeightsRequest.model_validate_json(await request.body())
            except ValueError as e:
                raise InvalidRequestError(f"expected {{\"path\": \"<checkpoint directory>\"}}: {e}",
                                          param="path") from None
            tensors = _checkpoint_tensors(Path(body.path))
        elif kind in ("application/octet-stream", ""):
            tensors = _safetensors_bytes(await request.body())
        else:
            raise InvalidRequestError(f"content-type {kind!r}: send application/json ({{\"path\": ...}}) or "
                                      "application/octet-stream (safetensors bytes)")
        count = await asyncio.to_thread(loop.update_weights, tensors)
        return {"updated": count, "seconds": round(time.perf_counter() - start, 3)}

    app.add_middleware(_Guard, config=config)
    return app


def _completion_logprobs(decode, ids: list[int], logprobs: list[float], forced: list[int],
                         top: list[list[tuple[int, float]]] | None = None) -> dict:
    tokens = [decode([t]) for t in ids]
    offsets, at = [], 0
    for s in tokens:
        offsets.append(at)
        at += len(s)
    alternatives = [{decode([i]): v for i, v in row} for row in top] if top else None
    return {"tokens": tokens, "token_logprobs": logprobs, "top_logprobs": alternatives, "text_offset": offsets,
            "forced": [bool(f) for f in forced]}


def _checkpoint_tensors(folder: Path) -> list:
    from safetensors import safe_open

    if not folder.is_dir():
        raise InvalidRequestError(f"{folder} is not a directory on the server", param="path")
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise InvalidRequestError(f"{folder} holds no .safetensors files", param="path")
    tensors = []
    for file in files:
        try:
            with safe_open(str(file), framework="pt") as f:
                tensors += [(name, f.get_tensor(name)) for name in f.keys()]
        except Exception as e:  # noqa: BLE001 - a corrupt file raises the library's own error types
            raise InvalidRequestError(f"cannot read {file}: {e}", param="path") from None
    return tensors


def _safetensors_bytes(data: bytes) -> list:
    from safetensors.torch import load

    if not data:
        raise InvalidRequestError("the body is empty: send the weights as safetensors bytes")
    try:
        return list(load(data).items())
    except Exception as e:  # noqa: BLE001 - safetensors raises its own error type for bad bytes
        raise InvalidRequestError(f"the body is not a safetensors file: {e}") from None
