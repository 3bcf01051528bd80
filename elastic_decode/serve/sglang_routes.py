"""SGLang's native API, as RL frameworks drive their rollout servers with it (slime's external engines,
AReaL's remote engine): /generate with `input_ids` or `text`, pause / continue / abort, weight updates from
disk or over a torch.distributed group the trainer opens, memory release, and the info routes routers and
clients probe. Shapes follow SGLang's (python/sglang/srt/entrypoints/http_server.py, managers/io_struct.py)
as its clients read them; the budgets travel in `sampling_params.custom_params` (serve/budgets.py) and our
extras (`forced_mask`, `think_tokens`, `solution_tokens`, `forced_end`, `weight_versions`) sit in
`meta_info` beside SGLang's own fields.

What the clients rely on (read in their code): slime and AReaL take output tokens and logprobs from
`meta_info.output_token_logprobs` ([logprob, token id, text or null]) and the finish from
`meta_info.finish_reason.type` (stop / length / abort), on aborted requests too; AReaL scores sequences with
`return_logprob` + `logprob_start_len` (`meta_info.input_token_logprobs`); slime aborts with
`/abort_request {"abort_all": true}` and polls `/v1/loads` until nothing runs; both pause with
`/pause_generation` (abort by default) around weight updates and `/continue_generation` after; every POST
control route answers JSON (slime parses it); weight-update routes answer {"success", "message"}.
"""
from __future__ import annotations

import asyncio
import json
import time
import uuid
from pathlib import Path

from fastapi import APIRouter, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse
from pydantic import Field, ValidationError

from ..errors import ElasticDecodeError, InvalidRequestError
from ..sampling_params import SamplingParams
from .openai_routes import budget
from .protocol import PENALTIES, BudgetFields, _Body, refuse_unsupported, stop_list
from .runs import Run
from .state import ServerState
from .weights import read_checkpoint

VERSION = "0.5.0-elastic_decode"  # what /server_info says to SGLang clients that read a version
# custom_params keys of other clients that change nothing here (slime's patched SGLang asks for top-p ids).
FOREIGN_CUSTOM_PARAMS = {"return_top_p_token_ids"}


class SglSamplingParams(BudgetFields):
    """SGLang's sampling_params (python/sglang/srt/sampling/sampling_params.py): honoured, or accepted at their
    neutral value only (penalties, constraints), never silently ignored. The budgets go in `custom_params`
    (where SGLang users put custom fields) or beside the others."""

    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1
    min_p: float = 0.0
    max_new_tokens: int | None = 128  # SGLang's default; 0 scores the prompt without generating
    min_new_tokens: int = 0
    n: int = 1
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = None
    stop_regex: str | list[str] | None = None
    ignore_eos: bool = False
    skip_special_tokens: bool = True
    spaces_between_special_tokens: bool = True
    no_stop_trim: bool = False
    sampling_seed: int | None = None
    frequency_penalty: float = 0.0
    presence_penalty: float = 0.0
    repetition_penalty: float = 1.0
    logit_bias: dict | None = None
    json_schema: str | None = None
    regex: str | None = None
    ebnf: str | None = None
    structural_tag: str | None = None
    custom_params: dict | None = None
    stream_interval: int | None = None

    def to_params(self, logprobs: int, prompt_logprobs: int | None) -> SamplingParams:
        refuse_unsupported(self, PENALTIES, ("logit_bias", "json_schema", "regex", "ebnf", "structural_tag",
                                             "stop_regex"), "sampling_params.")
        if self.max_new_tokens is not None and self.max_new_tokens < 0:
            raise InvalidRequestError("sampling_params.max_new_tokens must be >= 0", param="max_new_tokens")
        budgets = self.budgets(self.custom_params, "custom_params", FOREIGN_CUSTOM_PARAMS)
        if self.scores_only:  # one token is made and dropped: no budget to keep
            budgets = {}
        return SamplingParams(
            n=self.n, temperature=self.temperature, top_p=self.top_p, top_k=max(self.top_k, 0), min_p=self.min_p,
            seed=self.sampling_seed, max_tokens=max(self.max_new_tokens, 1) if self.max_new_tokens is not None else None,
            ignore_eos=self.ignore_eos, stop_token_ids=tuple(self.stop_token_ids or ()),
            min_tokens=0 if self.scores_only else self.min_new_tokens, logprobs=logprobs,
            prompt_logprobs=prompt_logprobs, **budgets)

    @property
    def scores_only(self) -> bool:
        """max_new_tokens 0: the prompt is scored (input_token_logprobs), nothing generated."""
        return self.max_new_tokens == 0

    def stop_strings(self) -> list[str]:
        return stop_list(self.stop)


class SglGenerateRequest(_Body):
    """SGLang's GenerateReqInput, the fields its RL clients send (and the rest of its fields, accepted at their
    neutral value or ignored where they only steer scheduling)."""

    text: str | list[str] | None = None
    input_ids: list[int] | list[list[int]] | None = None
    input_embeds: list | None = None
    sampling_params: SglSamplingParams | list[SglSamplingParams] | None = None
    rid: str | list[str] | None = None
    return_logprob: bool = False
    logprob_start_len: int = -1
    top_logprobs_num: int = 0
    token_ids_logprob: list[int] | None = None
    return_text_in_logprobs: bool = False
    stream: bool = False
    lora_path: str | list | None = None
    image_data: object = None
    audio_data: object = None
    video_data: object = None
    modalities: list | None = None
    return_routed_experts: bool = False
    routed_experts_start_len: int | None = None
    return_hidden_states: bool = False
    session_params: dict | None = None
    bootstrap_host: str | list[str] | None = None
    bootstrap_port: int | list[int] | None = None
    bootstrap_room: int | list[int] | None = None
    data_parallel_rank: int | None = None
    routed_dp_rank: int | None = None
    priority: int | None = None
    custom_logit_processor: str | list | None = None
    extra_key: str | None = None
    log_metrics: bool = True
    # what sglang-router 0.3.2 adds to every /generate it forwards (all at their neutral values)
    model: str | None = None
    background: bool = False
    no_logs: bool = False
    return_bytes: bool = False
    return_entropy: bool = False

    def prompts(self, state: ServerState) -> list[list[int]]:
        if (self.text is None) == (self.input_ids is None) or self.input_embeds is not None:
            raise InvalidRequestError('give "input_ids" or "text" (one of them)', param="input_ids")
        refuse_unsupported(self, dict.fromkeys(("return_routed_experts", "return_hidden_states", "background",
                                                "return_bytes", "return_entropy"), False),
                           ("lora_path", "image_data", "audio_data", "video_data", "custom_logit_processor",
                            "token_ids_logprob"))
        if state.unknown_model(self.model):
            raise InvalidRequestError(f"the model {self.model!r} does not exist", param="model")
        if self.input_ids is not None:
            ids = self.input_ids
            return [list(ids)] if all(isinstance(t, int) for t in ids) else [list(p) for p in ids]
        texts = [self.text] if isinstance(self.text, str) else list(self.text)
        return [state.encode_prompt(t) for t in texts]

    def params_for(self, k: int, count: int) -> SglSamplingParams:
        params = self.sampling_params
        if isinstance(params, list):
            if len(params) != count:
                raise InvalidRequestError(f"{len(params)} sampling_params for {count} prompts", param="sampling_params")
            return params[k]
        return params or SglSamplingParams()


class PauseGenerationRequest(_Body):
    mode: str = "abort"  # abort | retract | in_place (SGLang's; retract and in_place keep the requests here)


class AbortRequest(_Body):
    rid: str | list[str] = ""
    abort_all: bool = False


class UpdateFromDiskRequest(_Body):
    model_path: str
    load_format: str | None = None
    abort_all_requests: bool = False
    weight_version: str | None = None
    flush_cache: bool = True
    is_async: bool = False
    torch_empty_cache: bool = False
    keep_pause: bool = False
    recapture_cuda_graph: bool = False
    token_step: int | None = None


class InitGroupRequest(_Body):
    master_address: str
    master_port: int = Field(strict=False)  # AReaL sends it as a string
    rank_offset: int
    world_size: int
    group_name: str = "weight_update_group"
    backend: str = "nccl"


class UpdateFromDistributedRequest(_Body):
    names: list[str]
    dtypes: list[str]
    shapes: list[list[int]]
    group_name: str = "weight_update_group"
    flush_cache: bool = True
    abort_all_requests: bool = False
    weight_version: str | None = None
    load_format: str | None = None


class GroupNameRequest(_Body):
    group_name: str = "weight_update_group"


class MemoryRequest(_Body):
    tags: list[str] | None = None


def router(state: ServerState) -> APIRouter:
    api = APIRouter()
    loop = state.loop

    @api.post("/pause_generation")
    async def pause_generation(request: Request):
        body = await parse(request, PauseGenerationRequest, empty_ok=True)
        if body.mode not in ("abort", "retract", "in_place"):
            raise InvalidRequestError(f"mode must be abort, retract or in_place, got {body.mode!r}", param="mode")
        await asyncio.wrap_future(loop.pause_async("abort" if body.mode == "abort" else "keep"))
        return {"message": "Generation paused successfully.", "status": "ok"}

    @api.post("/continue_generation")
    async def continue_generation():
        await asyncio.wrap_future(loop.resume_async())
        return {"message": "Generation continued successfully.", "status": "ok"}

    @api.post("/abort_request")
    async def abort_request(request: Request):
        body = await parse(request, AbortRequest, empty_ok=True)
        rids = [body.rid] if isinstance(body.rid, str) else body.rid
        runs = [r for r in list(state.runs) if body.abort_all or (r.rid and any(r.rid.startswith(x) for x in rids if x))]
        for run in runs:
            run.abort("request")
        return {"aborted": len(runs)}

    @api.api_route("/flush_cache", methods=["GET", "POST"])
    async def flush_cache():
        running = in_flight(loop.stats())
        if running:
            return PlainTextResponse(f"Cache not flushed: {running} request(s) in flight.", status_code=400)
        await asyncio.wrap_future(loop.call_async(lambda engine: engine.reset_prefix_cache()))
        return PlainTextResponse("Cache flushed.\n")

    @api.post("/update_weights_from_disk")
    async def update_weights_from_disk(request: Request):
        body = await parse(request, UpdateFromDiskRequest)
        if body.abort_all_requests:
            await asyncio.wrap_future(loop.abort_all("request"))
        aloop = asyncio.get_running_loop()
        return await weight_update(lambda: aloop.run_in_executor(state.blocking, read_checkpoint,
                                                                 Path(body.model_path)),
                                   lambda tensors: loop.update_weights_async(tensors, body.weight_version),
                                   "Succeeded to update model weights.")

    @api.post("/init_weights_update_group")
    async def init_weights_update_group(request: Request):
        body = await parse(request, InitGroupRequest)
        return await weight_update(None, lambda _: loop.call_async(lambda engine: engine.join_weight_group(
            body.master_address, body.master_port, body.rank_offset, body.world_size, body.group_name, body.backend)),
            f"Joined the weight update group {body.group_name!r}.")

    @api.post("/update_weights_from_distributed")
    async def update_weights_from_distributed(request: Request):
        body = await parse(request, UpdateFromDistributedRequest)
        if body.load_format is not None:  # e.g. "flattened_bucket": a layout this side cannot read
            return JSONResponse({"success": False, "message": f"load_format {body.load_format!r} is not supported: "
                                 "broadcast each tensor in names order (load_format null)"}, status_code=400)
        if body.abort_all_requests:
            await asyncio.wrap_future(loop.abort_all("request"))
        return await weight_update(None, lambda _: loop.call_async(lambda engine: engine.load_weights_from_group(
            body.group_name, body.names, body.dtypes, body.shapes, body.weight_version)),
            "Succeeded to update model weights.")

    @api.post("/destroy_weights_update_group")
    async def destroy_weights_update_group(request: Request):
        body = await parse(request, GroupNameRequest, empty_ok=True)
        return await weight_update(None, lambda _: loop.call_async(
            lambda engine: engine.destroy_weight_group(body.group_name)), "Destroyed the weight update group.")

    @api.api_route("/release_memory_occupation", methods=["GET", "POST"])
    async def release_memory_occupation(request: Request):
        await parse(request, MemoryRequest, empty_ok=True)  # any tags: the KV cache goes; the weights stay
        await asyncio.wrap_future(loop.sleep_async())  # a 400 while requests run: pause generation first
        return JSONResponse(None)

    @api.api_route("/resume_memory_occupation", methods=["GET", "POST"])
    async def resume_memory_occupation(request: Request):
        await parse(request, MemoryRequest, empty_ok=True)
        await asyncio.wrap_future(loop.wake_up_async())
        return JSONResponse(None)

    @api.get("/health_generate")
    async def health_generate(request: Request):
        """One token generated, or, paused or asleep on purpose (a trainer's weight update), an answer at once:
        the request would wait for /continue_generation and a router would take the server for dead."""
        if loop.paused or loop.engine.sleeping:
            return {"status": "ok", "paused": loop.paused, "sleeping": loop.engine.sleeping}
        run = Run(state, state.tokenizer.decode, [[state.tokenizer.eos_ids[0]]],
                  SamplingParams(max_tokens=1, temperature=0.0), [], stream=False)
        await run.finish(request)
        return {"status": "ok"}

    for path in ("/server_info", "/get_server_info"):
        api.add_api_route(path, lambda: server_info(state), methods=["GET"])
    for path in ("/model_info", "/get_model_info"):
        api.add_api_route(path, lambda: model_info(state), methods=["GET"])

    @api.get("/get_weight_version")
    async def get_weight_version():
        return {"weight_version": loop.engine.weight_version}

    @api.get("/v1/loads")
    async def loads():
        s = loop.stats()
        return {"timestamp": time.time(), "version": VERSION, "accelerator": loop.engine.device.type,
                "num_accelerators": loop.engine.config.tensor_parallel_size,
                "loads": [{"dp_rank": 0, "num_running_reqs": in_flight(s), "num_waiting_reqs": s["requests_waiting"],
                           "num_total_reqs": in_flight(s) + s["requests_waiting"],
                           "num_used_tokens": s["kv_blocks_used"] * loop.engine.config.block_size}]}

    @api.get("/get_load")
    async def get_load():
        s = loop.stats()
        return [{"dp_rank": 0, "num_reqs": in_flight(s),
                 "num_waiting_reqs": s["requests_waiting"],
                 "num_tokens": s["kv_blocks_used"] * loop.engine.config.block_size}]

    return api


def in_flight(stats: dict) -> int:
    """Requests the engine has started and not ended (running, or held by a pause in place)."""
    return stats["requests_running"] + stats["requests_paused"]


async def parse(body: Request | bytes, model, empty_ok: bool = False):
    """A body of `model` (an empty body is its defaults where `empty_ok`), strict as every route's."""
    raw = await body.body() if isinstance(body, Request) else body
    if not raw.strip() and empty_ok:
        return model()
    try:
        return model.model_validate_json(raw)
    except ValidationError as e:
        raise RequestValidationError(e.errors()) from None


async def weight_update(read, apply, message: str):
    """SGLang's answer to a weight-update call: {"success", "message"}, 200 or 400 (a refused request, or a
    trainer's group that failed: torch.distributed's errors are RuntimeErrors, its timeouts too)."""
    try:
        tensors = await read() if read is not None else None
        await asyncio.wrap_future(apply(tensors))
    except (ElasticDecodeError, RuntimeError) as e:
        return JSONResponse({"success": False, "message": f"{type(e).__name__}: {e}" if not isinstance(
            e, ElasticDecodeError) else str(e)}, status_code=400)
    return {"success": True, "message": message, "num_paused_requests": 0}


def server_info(state: ServerState) -> dict:
    """What slime checks an external engine against and what routers read: the parallel layout, the model,
    the limits. (Not both `model` and `model_id`: sglang-router's parser refuses that.)"""
    engine = state.loop.engine
    tp = engine.config.tensor_parallel_size
    return {"model_path": str(engine.config.model or state.config.model_name),
            "served_model_name": state.config.model_name, "tokenizer_path": str(engine.config.model or ""),
            "tp_size": tp, "tensor_parallel_size": tp, "dp_size": 1, "pp_size": 1, "ep_size": 1, "moe_dp_size": 1,
            "num_gpus": tp if engine.device.type == "cuda" else 0, "disaggregation_mode": "null",
            "disaggregation_bootstrap_port": None, "encoder_only": False, "load_balance_method": "round_robin",
            "max_running_requests": engine.config.max_num_seqs, "max_total_num_tokens": engine.kv_capacity_tokens,
            "context_length": engine.window, "version": VERSION, "weight_version": engine.weight_version,
            "engine": "elastic_decode", "internal_states": [{"weight_version": engine.weight_version}]}


def model_info(state: ServerState) -> dict:
    engine = state.loop.engine
    return {"model_path": str(engine.config.model or state.config.model_name),
            "tokenizer_path": str(engine.config.model or ""), "is_generation": True,
            "preferred_sampling_params": None, "weight_version": engine.weight_version,
            "model_type": engine.spec.model_type, "architectures": [type(engine.model).__name__],
            "has_image_understanding": False, "has_audio_understanding": False}


# -- /generate in SGLang's shape ----------------------------------------------------------------------


async def generate(state: ServerState, body: SglGenerateRequest, request: Request):
    prompts = body.prompts(state)
    runs, rid = [], body.rid if isinstance(body.rid, str) else None
    rids = body.rid if isinstance(body.rid, list) else None
    if rids is not None and len(rids) != len(prompts):
        raise InvalidRequestError(f"{len(rids)} rid for {len(prompts)} prompts", param="rid")
    logprobs = body.top_logprobs_num if body.return_logprob else 0
    prompt_logprobs = body.top_logprobs_num if body.return_logprob and body.logprob_start_len >= 0 else None
    asked = []  # every prompt's parameters checked before any is queued
    for k, prompt in enumerate(prompts):
        sp = body.params_for(k, len(prompts))
        params = state.bounded(sp.to_params(logprobs, prompt_logprobs), len(prompts), budgets=not sp.scores_only)
        try:
            state.loop.engine.check_request(prompt, params)
        except InvalidRequestError as e:
            raise InvalidRequestError((f"prompt {k}: " if len(prompts) > 1 else "") + str(e), param=e.param) from None
        asked.append((prompt, sp, params))
    try:
        for k, (prompt, sp, params) in enumerate(asked):
            this = rids[k] if rids else (rid if len(prompts) == 1 else None) or f"{uuid.uuid4().hex}"
            runs.append((Run(state, state.decoder(sp.skip_special_tokens), [prompt], params, sp.stop_strings(),
                             body.stream, sp.no_stop_trim, this), sp))
    except BaseException:
        for run, _ in runs:
            run.close()
        raise
    if body.stream:
        if len(runs) != 1 or runs[0][0].n != 1:
            for run, _ in runs:
                run.close()
            raise InvalidRequestError("stream takes one prompt with n 1 on this server", param="stream")
        return StreamingResponse(stream(runs[0][0], runs[0][1], body), media_type="text/event-stream")
    await asyncio.gather(*(run.finish(request) for run, _ in runs))
    out = [result(run, j, sp, body, run.texts[0][j]) for run, sp in runs for j in range(run.n)]
    return out[0] if len(out) == 1 and not isinstance(body.text, list) and not (
        body.input_ids and isinstance(body.input_ids[0], list)) else out


def result(run: Run, j: int, sp: SglSamplingParams, body: SglGenerateRequest, text) -> dict:
    decode = text.decode
    ids = [] if sp.scores_only else text.token_ids
    meta = {"id": run.rid if run.n == 1 else f"{run.rid}_{j}", "finish_reason": finish_reason(text, ids),
            "prompt_tokens": len(run.prompts[0]), "completion_tokens": len(ids),
            "cached_tokens": text.cached_tokens,
            "weight_version": text.weight_version or run.loop.engine.weight_version,
            "e2e_latency": time.perf_counter() - run.started,
            # ours, beside SGLang's
            **budget(text), "forced_mask": text.forced_mask[:len(ids)],
            "weight_versions": text.weight_versions}
    if body.return_logprob:
        named = (lambda t: decode([t])) if body.return_text_in_logprobs else (lambda t: None)
        meta["output_token_logprobs"] = [[lp, t, named(t)] for t, lp in zip(ids, text.logprobs)]
        if body.top_logprobs_num:
            meta["output_top_logprobs"] = [[[v, i, named(i)] for i, v in row] for row in text.top_logprobs[:len(ids)]]
        if body.logprob_start_len >= 0 and text.prompt_logprobs is not None:
            start = body.logprob_start_len
            prompt = run.prompts[0]
            meta["input_token_logprobs"] = [[lp, t, named(t)] for t, lp in zip(prompt[start:], text.prompt_logprobs[start:])]
            if body.top_logprobs_num:
                tops = text.prompt_top_logprobs or [[]] * len(prompt)
                meta["input_top_logprobs"] = [[[v, i, named(i)] for i, v in row] if row else None for row in tops[start:]]
    return {"text": text_of(text, ids), "output_ids": ids, "meta_info": meta}


def text_of(text, ids: list[int]) -> str:
    if not ids:
        return ""
    reasoning, marker, content = text.full_text()
    return (reasoning or "") + marker + content


def finish_reason(text, ids: list[int]) -> dict | None:
    reason = text.finish_reason
    if reason is None:
        return None
    if reason == "abort":
        return {"type": "abort", "message": "Aborted (a pause, an abort call, or the client went away)."}
    if reason == "length" or not ids:
        return {"type": "length", "length": len(ids)}
    return {"type": "stop", "matched": text.matched if text.matched is not None else ids[-1]}


async def stream(run: Run, sp: SglSamplingParams, body: SglGenerateRequest):
    """SGLang's stream: `data: {...}` chunks, each with everything so far (not increments), then `[DONE]`."""
    try:
        async for _ in run.events():
            yield f"data: {json.dumps(result(run, 0, sp, body, run.texts[0][0]))}\n\n"
        yield "data: [DONE]\n\n"
    except Exception as e:  # noqa: BLE001 - the stream has started: report in it
        yield f"data: {json.dumps({'error': {'message': str(e)}})}\n\n"
    finally:
        run.close()


def is_sglang(body: dict) -> bool:
    """Our /generate takes `prompt_token_ids`; SGLang's takes `input_ids` or `text` (same path, two shapes)."""
    return "prompt_token_ids" not in body and ("input_ids" in body or "text" in body or "sampling_params" in body)

