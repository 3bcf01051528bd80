"""The OpenAI routes: /v1/models, /v1/chat/completions, /v1/completions, with budgets.

Response shapes follow OpenAI's, with vLLM's reasoning fields: `message.reasoning` (and
`reasoning_content` for older clients) holds the thinking, `message.content` the solution. Each
choice also carries `budget`: {think_tokens, solution_tokens, forced_tokens, forced_end}. With
`logprobs`, every token (thinking, marker and solution) is listed with its true logprob and a
`forced` flag (the record vLLM RFC #54864 asks for).
"""
from __future__ import annotations

import json
import logging
import time
import uuid

from fastapi import APIRouter, Request
from fastapi.responses import StreamingResponse

from ..errors import InvalidRequestError

from .errors import error_response
from .protocol import ChatCompletionRequest, CompletionRequest
from .runs import Run
from .state import ServerState
from .text import CompletionText

log = logging.getLogger("elastic_decode.serve")


def router(state: ServerState) -> APIRouter:
    api = APIRouter()

    @api.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": state.config.model_name, "object": "model", "created": state.started,
                                            "owned_by": "elastic_decode", "max_model_len": state.loop.engine.window}]}

    @api.post("/v1/chat/completions")
    async def chat(body: ChatCompletionRequest, request: Request):
        return await chat_completion(state, body, request)

    @api.post("/v1/completions")
    async def completions(body: CompletionRequest, request: Request):
        return await text_completion(state, body, request)

    return api


def unknown_model(state: ServerState, name: str | None):
    return error_response(404, f"the model {name!r} does not exist (this server serves {state.config.model_name!r})",
                          "not_found_error", param="model", code="model_not_found")


# -- chat ---------------------------------------------------------------------------------------


async def chat_completion(state: ServerState, body: ChatCompletionRequest, request: Request):
    if state.unknown_model(body.model):
        return unknown_model(state, body.model)
    params = state.bounded(body.params(None), 1)
    if not body.add_generation_prompt and not body.continue_final_message:
        raise InvalidRequestError("add_generation_prompt false needs continue_final_message (the assistant's turn "
                                  "must be open)", param="add_generation_prompt")
    prompt = state.encode_messages([{"role": m.role, "content": m.text()} for m in body.messages],
                                   body.continue_final_message, body.chat_template_kwargs)
    decode = state.decoder(body.skip_special_tokens)
    rid, created = request_id(body, "chatcmpl"), int(time.time())
    run = Run(state, decode, [prompt], params, body.stop_strings(), body.stream, body.keep_stop, rid)
    if body.stream:
        usage = body.stream_options is not None and body.stream_options.include_usage
        return StreamingResponse(chat_stream(state, run, rid, created, body, usage), media_type="text/event-stream")
    await run.finish(request)
    choices = []
    for j, text in enumerate(run.texts[0]):
        reasoning, marker, content = text.full_text()
        message = {"role": "assistant", "content": content}
        if reasoning is not None and not body.separate_reasoning:  # one text, as the model wrote it
            message["content"] = reasoning + marker + content
        elif reasoning is not None and body.include_reasoning:
            message["reasoning"] = message["reasoning_content"] = reasoning
        choices.append({
            "index": j, "message": message, "finish_reason": text.finish_reason, "budget": budget(text),
            "logprobs": {"content": token_entries(decode, text.token_ids, text.logprobs, text.forced_mask,
                                                  text.top_logprobs, text.confidences)} if body.logprobs else None,
            **token_fields(body, prompt, text, decode),
        })
    return {"id": rid, "object": "chat.completion", "created": created, "model": state.config.model_name,
            "choices": choices, "usage": usage_of(run)}


async def chat_stream(state: ServerState, run: Run, rid: str, created: int, body, usage: bool):
    model, decode, logprobs = state.config.model_name, run.texts[0][0].decode, body.logprobs

    def chunk(j: int, delta: dict, finish: str | None = None, extra: dict | None = None) -> dict:
        choice = {"index": j, "delta": delta, "logprobs": extra, "finish_reason": finish}
        return {"id": rid, "object": "chat.completion.chunk", "created": created, "model": model, "choices": [choice]}

    announced: set[int] = set()
    try:
        for j in range(run.n):
            yield sse(chunk(j, {"role": "assistant", "content": ""}))
        async for _, j, piece, before in run.events():
            text = run.texts[0][j]
            delta = {}
            if not body.separate_reasoning:  # one text, as the model wrote it
                if piece.reasoning + piece.marker + piece.content:
                    delta["content"] = piece.reasoning + piece.marker + piece.content
            else:
                if piece.reasoning and body.include_reasoning:
                    delta["reasoning"] = delta["reasoning_content"] = piece.reasoning
                if piece.content:
                    delta["content"] = piece.content
            new = slice(before, len(text.token_ids))
            lp = ({"content": token_entries(decode, text.token_ids[new], text.logprobs[new], text.forced_mask[new],
                                            text.top_logprobs[new], text.confidences[new])}
                  if logprobs and new.start < new.stop else None)
            if delta or lp:
                yield sse(chunk(j, delta, extra=lp))
            if text.finished and j not in announced:
                announced.add(j)
                final = chunk(j, {}, text.finish_reason)
                final["choices"][0].update(budget=budget(text), **token_fields(body, run.prompts[0], text, decode))
                yield sse(final)
        if usage:
            yield sse({"id": rid, "object": "chat.completion.chunk", "created": created, "model": model,
                       "choices": [], "usage": usage_of(run)})
        yield sse("[DONE]")
    except Exception as e:  # noqa: BLE001 - the stream has started: report in it, as OpenAI does
        log.error("stream failed: %s: %s", type(e).__name__, e)
        yield sse({"error": {"message": str(e), "type": "server_error", "param": None, "code": None}})
    finally:
        run.close()  # a client gone mid-stream (the generator cancelled): its requests are aborted


# -- completions ---------------------------------------------------------------------------------


async def text_completion(state: ServerState, body: CompletionRequest, request: Request):
    if state.unknown_model(body.model):
        return unknown_model(state, body.model)
    params = body.params(None)
    prompts = [state.encode_prompt(p) if isinstance(p, str) else list(p) for p in body.prompts()]
    params = state.bounded(params, len(prompts))
    decode = state.decoder(body.skip_special_tokens)
    rid, created = request_id(body, "cmpl"), int(time.time())
    run = Run(state, decode, prompts, params, body.stop_strings(), body.stream, body.keep_stop, rid)
    want_logprobs = body.logprobs is not None
    if body.stream:
        usage = body.stream_options is not None and body.stream_options.include_usage
        return StreamingResponse(completion_stream(state, run, rid, created, body, usage),
                                 media_type="text/event-stream")
    await run.finish(request)
    choices = []
    for k, row in enumerate(run.texts):
        for j, text in enumerate(row):
            reasoning, marker, content = text.full_text()
            choices.append({
                "index": k * run.n + j, "text": (reasoning or "") + marker + content,
                "finish_reason": text.finish_reason, "budget": budget(text),
                "logprobs": completion_logprobs(decode, text.token_ids, text.logprobs, text.forced_mask,
                                                text.top_logprobs, text.confidences) if want_logprobs else None,
                **token_fields(body, run.prompts[k], text, decode),
            })
    return {"id": rid, "object": "text_completion", "created": created, "model": state.config.model_name,
            "choices": choices, "usage": usage_of(run)}


async def completion_stream(state: ServerState, run: Run, rid: str, created: int, body, usage: bool):
    model, decode, logprobs = state.config.model_name, run.texts[0][0].decode, body.logprobs is not None

    def chunk(index: int, text: str, finish: str | None = None, extra: dict | None = None) -> dict:
        return {"id": rid, "object": "text_completion", "created": created, "model": model,
                "choices": [{"index": index, "text": text, "logprobs": extra, "finish_reason": finish}]}

    announced: set[tuple[int, int]] = set()
    try:
        async for k, j, piece, before in run.events():
            text = run.texts[k][j]
            new = slice(before, len(text.token_ids))
            piece_text = piece.reasoning + piece.marker + piece.content
            lp = (completion_logprobs(decode, text.token_ids[new], text.logprobs[new], text.forced_mask[new],
                                      text.top_logprobs[new], text.confidences[new]) if logprobs and new.start < new.stop else None)
            if piece_text or lp:
                yield sse(chunk(k * run.n + j, piece_text, extra=lp))
            if text.finished and (k, j) not in announced:
                announced.add((k, j))
                final = chunk(k * run.n + j, "", text.finish_reason)
                final["choices"][0].update(budget=budget(text), **token_fields(body, run.prompts[k], text, decode))
                yield sse(final)
        if usage:
            yield sse({"id": rid, "object": "text_completion", "created": created, "model": model, "choices": [],
                       "usage": usage_of(run)})
        yield sse("[DONE]")
    except Exception as e:  # noqa: BLE001
        log.error("stream failed: %s: %s", type(e).__name__, e)
        yield sse({"error": {"message": str(e), "type": "server_error", "param": None, "code": None}})
    finally:
        run.close()


# -- shared pieces -------------------------------------------------------------------------------


def request_id(body, kind: str) -> str:
    """The response's id: the client's (vLLM's request_id, SGLang's rid), else a fresh one."""
    given = body.request_id or (body.rid if isinstance(body.rid, str) else None)
    return given or f"{kind}-{uuid.uuid4().hex}"


def token_fields(body, prompt: list[int], text: CompletionText, decode) -> dict:
    """What a choice adds when asked: token ids (vLLM's return_token_ids), prompt logprobs (vLLM's shape: per
    prompt token {token id: {logprob, rank, decoded_token}}, None for the first), the weights' version."""
    out = {"weight_version": text.weight_version}
    if body.return_token_ids:
        out.update(token_ids=text.token_ids, prompt_token_ids=prompt)
    if body.prompt_logprobs is not None:
        out["prompt_logprobs"] = prompt_logprob_entries(prompt, text, decode)
    return out


def prompt_logprob_entries(prompt: list[int], text: CompletionText, decode) -> list | None:
    """vLLM's prompt_logprobs: None for the first prompt token, then {token id: {logprob, rank, decoded_token}}
    with the asked-for alternatives (None until the engine has sent them)."""
    if text.prompt_logprobs is None:
        return None
    alternatives = text.prompt_top_logprobs or [[]] * len(prompt)
    entries: list = [None]
    for tok, lp, alts in zip(prompt[1:], text.prompt_logprobs[1:], alternatives[1:]):
        entry = {str(tok): {"logprob": lp, "decoded_token": decode([tok])}}
        for rank, (i, v) in enumerate(alts, 1):
            entry.setdefault(str(i), {"logprob": v, "rank": rank, "decoded_token": decode([i])})
        entries.append(entry)
    return entries


def budget(text: CompletionText) -> dict:
    """The rollout's counts (a resubmitted rollout's prompt holds some of them: core/resume.py)."""
    last = text.last
    return {
        "think_tokens": text.think_tokens,
        "solution_tokens": text.solution_tokens,
        "forced_tokens": sum(text.forced_mask),
        "forced_end": bool(last.forced_end) if last is not None else False,
        **confidence_summary(text),
    }


def confidence_summary(text: CompletionText) -> dict:
    """The trace's confidence and early exit (docs/confidence.md): lowest group and tail confidence (once it
    finished), why and where it exited early, DEER probes forked from it."""
    last = text.last
    lowest, tail = last.group_confidence if last is not None else (None, None)
    why, where, probes = last.early_exit if last is not None else (None, None, 0)
    return {"lowest_group_confidence": lowest, "tail_confidence": tail, "early_exit": why, "exit_index": where,
            "probes": probes}


def usage_of(run: Run) -> dict:
    prompt = sum(len(p) for p in run.prompts) * run.n
    texts = run.all_texts()
    completion = sum(len(t.token_ids) for t in texts)
    reasoning = sum(t.output_think for t in texts)  # generated by this request
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion,
            "completion_tokens_details": {"reasoning_tokens": reasoning}}


def token_entries(decode, ids: list[int], logprobs: list[float], forced: list[int],
                  top: list[list[tuple[int, float]]] | None = None, confidence: list[float] | None = None) -> list[dict]:
    """OpenAI's chat logprobs entries (`top_logprobs`: the raw distribution's alternatives; our extensions:
    `forced`, and `confidence`, the token's DeepConf confidence)."""
    out = []
    for k, (t, lp, f) in enumerate(zip(ids, logprobs, forced)):
        s = decode([t])
        alternatives = [{"token": (a := decode([i])), "logprob": v, "bytes": list(a.encode())}
                        for i, v in top[k]] if top else []
        out.append({"token": s, "logprob": lp, "bytes": list(s.encode()), "top_logprobs": alternatives,
                    "forced": bool(f), **({"confidence": confidence[k]} if confidence else {})})
    return out


def completion_logprobs(decode, ids: list[int], logprobs: list[float], forced: list[int],
                        top: list[list[tuple[int, float]]] | None = None, confidence: list[float] | None = None) -> dict:
    tokens = [decode([t]) for t in ids]
    offsets, at = [], 0
    for s in tokens:
        offsets.append(at)
        at += len(s)
    alternatives = [{decode([i]): v for i, v in row} for row in top] if top else None
    return {"tokens": tokens, "token_logprobs": logprobs, "top_logprobs": alternatives, "text_offset": offsets,
            "forced": [bool(f) for f in forced], "token_confidences": list(confidence or [])}


def sse(payload: dict | str) -> str:
    return f"data: {payload if isinstance(payload, str) else json.dumps(payload)}\n\n"
