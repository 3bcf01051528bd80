"""The routes for RL trainers and operators: token-level /generate, /tokenize, /pause, /resume,
/update_weights, /health and Prometheus /metrics.

No route runs engine work on the event loop or holds a thread of the default executor while it waits:
commands go to the engine loop's thread and are awaited as futures (a `pause(wait)` that takes minutes
blocks nothing else), and blocking reads of weights run on the server's own threads.
"""
from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path

from fastapi import APIRouter, Request
from fastapi.responses import PlainTextResponse

from ..errors import InvalidRequestError
from .errors import BodyTooLarge, error_response
from .metrics import render_metrics
from .openai_routes import budget, usage_of
from .protocol import GenerateRequest, PauseRequest, TokenizeRequest, UpdateWeightsRequest
from . import sglang_routes
from .runs import Run
from .sglang_routes import parse
from .state import ServerState
from .weights import read_checkpoint, read_file, receive_safetensors


def router(state: ServerState) -> APIRouter:
    api = APIRouter()
    loop = state.loop

    @api.get("/health")
    async def health():
        return {"status": "ok", "paused": loop.paused}

    @api.get("/metrics")
    async def metrics():
        return PlainTextResponse(render_metrics(loop), media_type="text/plain; version=0.0.4")

    @api.post("/generate")
    async def generate(request: Request):
        """One path, two shapes: ours (`prompt_token_ids`, the RolloutClient's) and SGLang's (`input_ids` or
        `text` with `sampling_params`, slime's and AReaL's)."""
        raw = await request.body()
        try:
            shape = json.loads(raw)
        except ValueError:
            shape = None
        if isinstance(shape, dict) and sglang_routes.is_sglang(shape):
            return await sglang_routes.generate(state, await parse(raw, sglang_routes.SglGenerateRequest), request)
        return await generate_tokens(state, await parse(raw, GenerateRequest), request)

    @api.post("/tokenize")
    async def tokenize(body: TokenizeRequest):
        if state.unknown_model(body.model):
            return error_response(404, f"the model {body.model!r} does not exist", "not_found_error", param="model")
        if (body.prompt is None) == (body.messages is None):
            raise InvalidRequestError('give "prompt" or "messages" (one of them)', param="prompt")
        if body.prompt is not None:
            tokens = state.encode_prompt(body.prompt)
        else:
            tokens = state.encode_messages([{"role": m.role, "content": m.text()} for m in body.messages])
        return {"tokens": tokens, "count": len(tokens), "max_model_len": loop.engine.window}

    @api.post("/pause")
    async def pause(request: Request, mode: str | None = None, clear_cache: bool = False,
                    wait_for_inflight_requests: bool | None = None):
        """The mode in the body ({"mode": ...}) or, as vLLM's route takes it, the query (?mode=...); keep when
        neither says (vLLM's default is abort: its clients name the mode). clear_cache also forgets the cached
        prefixes; vLLM's older wait_for_inflight_requests is mode wait (true) or abort (false)."""
        body = await parse(request, PauseRequest, empty_ok=True)
        older = None if wait_for_inflight_requests is None else "wait" if wait_for_inflight_requests else "abort"
        asked = {m for m in (mode, older,
                             body.mode if "mode" in body.model_fields_set else None) if m is not None}
        if len(asked) > 1:
            raise InvalidRequestError(f"the pause modes asked for disagree: {', '.join(sorted(asked))}", param="mode")
        mode = asked.pop() if asked else body.mode
        await asyncio.wrap_future(loop.pause_async(mode))
        if clear_cache:
            await asyncio.wrap_future(loop.call_async(lambda engine: engine.reset_prefix_cache()))
        return {"status": "paused", "paused": True, "mode": mode}

    @api.post("/resume")
    async def resume():
        await asyncio.wrap_future(loop.resume_async())
        return {"status": "resumed", "paused": False}

    @api.post("/update_weights")
    async def update_weights(request: Request):
        start = time.perf_counter()
        count = await asyncio.wrap_future(loop.update_weights_async(await received_weights(state, request)))
        return {"updated": count, "seconds": round(time.perf_counter() - start, 3)}

    return api


async def generate_tokens(state: ServerState, body: GenerateRequest, request: Request) -> dict:
    """Token ids in, per-token ids, logprobs and forced flags out (the RolloutClient's route)."""
    prompts = body.prompts()
    params = state.bounded(body.params(), len(prompts))
    decode = state.tokenizer.decode
    run = Run(state, decode, prompts, params, [], stream=False)
    await run.finish(request)
    outputs = []
    for ids, row in zip(prompts, run.texts):
        completions = []
        for j, text in enumerate(row):
            item = {"index": j, "token_ids": text.token_ids, "logprobs": text.logprobs,
                    "forced_mask": text.forced_mask, "finish_reason": text.finish_reason, **budget(text),
                    "top_logprobs": text.top_logprobs if params.logprobs else None,
                    "confidences": text.confidences if params.wants_confidence else None,
                    "weight_version": text.weight_version or state.loop.engine.weight_version,
                    "weight_versions": text.weight_versions}
            if body.return_text:
                reasoning, _, content = text.full_text()
                item.update(text=decode(text.token_ids), thinking_text=reasoning or "", solution_text=content)
            completions.append(item)
        outputs.append({"prompt_token_ids": ids, "completions": completions})
    return {"pad_token_id": state.tokenizer.pad_id, "outputs": outputs, "usage": usage_of(run)}


async def received_weights(state: ServerState, request: Request) -> list:
    """The (name, tensor) pairs of an /update_weights body: a checkpoint directory on this machine
    ({"path": ...}) or safetensors bytes, read off the event loop."""
    kind = request.headers.get("content-type", "").split(";")[0].strip()
    aloop = asyncio.get_running_loop()
    if kind == "application/json":
        raw = await _bounded_body(request, state.config.max_body_bytes)
        try:
            body = UpdateWeightsRequest.model_validate_json(raw)
        except ValueError as e:
            raise InvalidRequestError(f"expected {{\"path\": \"<checkpoint directory>\"}}: {e}", param="path") from None
        return await aloop.run_in_executor(state.blocking, read_checkpoint, Path(body.path))
    if kind not in ("application/octet-stream", ""):
        raise InvalidRequestError(f"content-type {kind!r}: send application/json ({{\"path\": ...}}) or "
                                  "application/octet-stream (safetensors bytes)")
    path = await receive_safetensors(request, state.max_weights_bytes, state.loop.engine.weight_shape)
    try:
        return await aloop.run_in_executor(state.blocking, read_file, path)
    finally:
        path.unlink(missing_ok=True)


async def _bounded_body(request: Request, limit: int) -> bytes:
    parts, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise BodyTooLarge(limit)
        parts.append(chunk)
    return b"".join(parts)
