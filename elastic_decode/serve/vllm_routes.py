"""vLLM's routes for RL trainers (SkyRL's remote inference client, TRL's AsyncGRPO, prime-rl): token-in
token-out generation at /inference/v1/generate, and the control routes of vLLM's dev-mode RLHF, sleep and
cache routers: /pause (query parameters; the pause itself is rollout_routes.py's), /resume, /is_paused,
/abort_requests, /sleep, /wake_up, /is_sleeping, /reset_prefix_cache, /get_world_size.

Shapes follow vLLM's (vllm/entrypoints/serve/disagg/protocol.py, serve/dev/rlhf/api_router.py) as SkyRL's
client reads them: `choices[0].token_ids`, `.finish_reason` ("stop", "length", "abort"), `.logprobs.content
[*].logprob`; control routes answer JSON (SkyRL reads a body only when one is sent). The budgets are vLLM's
`sampling_params.thinking_token_budget` and every name of serve/budgets.py, beside the other sampling fields
or in `sampling_params.extra_args`; our extras (`forced_mask`, `think_tokens`, `solution_tokens`,
`forced_end`, `weight_version`) sit in each choice beside vLLM's fields.

Not here: vLLM's own weight-transfer protocol (/init_weight_transfer_engine and /update_weights with
`update_info`: a StatelessProcessGroup and PyNccl, packed uint8 buffers), which is vLLM's internals rather
than an API; trainers send weights to this server by /update_weights (a checkpoint path or safetensors
bytes) or through a torch.distributed group (sglang_routes.py).
"""
from __future__ import annotations

import asyncio
import uuid

from fastapi import APIRouter, Query, Request

from ..errors import InvalidRequestError
from ..sampling_params import MAX_TOP_LOGPROBS, SamplingParams
from .openai_routes import budget, prompt_logprob_entries, token_entries
from .protocol import PENALTIES, BudgetFields, _Body, refuse_unsupported, stop_list
from .runs import Run
from .sglang_routes import parse
from .state import ServerState


class VllmSamplingParams(BudgetFields):
    """vLLM's SamplingParams as a client sends it (vllm/sampling_params.py): honoured, or accepted at its
    neutral value only; output_kind and detokenize change nothing on a route that answers once with ids."""

    n: int = 1
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0 or -1: off
    min_p: float = 0.0
    seed: int | None = None
    max_tokens: int | None = 16  # vLLM's default
    min_tokens: int = 0
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = None
    ignore_eos: bool = False
    logprobs: int | None = None  # 0: each token's logprob; k: and its k most likely alternatives
    prompt_logprobs: int | None = None
    skip_special_tokens: bool = True
    spaces_between_special_tokens: bool = True
    include_stop_str_in_output: bool = False
    detokenize: bool = True
    output_kind: int | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    logit_bias: dict | None = None
    allowed_token_ids: list[int] | None = None
    bad_words: list[str] | None = None
    truncate_prompt_tokens: int | None = None
    structured_outputs: dict | None = None
    extra_args: dict | None = None  # vLLM's place for custom fields: the budget names

    def to_params(self) -> SamplingParams:
        refuse_unsupported(self, PENALTIES, ("logit_bias", "allowed_token_ids", "bad_words", "truncate_prompt_tokens",
                                             "structured_outputs"), "sampling_params.")
        top = self.logprobs or 0
        if not 0 <= top <= MAX_TOP_LOGPROBS:
            raise InvalidRequestError(f"logprobs must be in [0, {MAX_TOP_LOGPROBS}]", param="logprobs")
        return SamplingParams(
            n=self.n, temperature=self.temperature, top_p=self.top_p, top_k=max(self.top_k, 0), min_p=self.min_p,
            seed=self.seed, max_tokens=self.max_tokens, min_tokens=self.min_tokens, ignore_eos=self.ignore_eos,
            stop_token_ids=tuple(self.stop_token_ids or ()), logprobs=top, prompt_logprobs=self.prompt_logprobs,
            **self.budgets(self.extra_args, "extra_args"))

    def stop_strings(self) -> list[str]:
        return stop_list(self.stop)


class TokensGenerateRequest(_Body):
    """vLLM's GenerateRequest (/inference/v1/generate): token ids in; `features` (multimodal) and KV transfer
    are refused, routing and cache hints accepted."""

    token_ids: list[int]
    sampling_params: VllmSamplingParams = VllmSamplingParams()
    request_id: str | None = None
    model: str | None = None
    stream: bool = False
    stream_options: dict | None = None
    features: dict | list | None = None
    cache_salt: str | None = None
    priority: int = 0
    kv_transfer_params: dict | None = None


class AbortRequestsRequest(_Body):
    request_ids: list[str] | None = None  # none or empty: every request


class ResetPrefixCacheRequest(_Body):
    reset_running_requests: bool = False  # SkyRL sends it as a body (vLLM reads it from the query)
    reset_external: bool = False


def router(state: ServerState) -> APIRouter:
    api = APIRouter()
    loop = state.loop

    @api.post("/inference/v1/generate")
    async def generate(request: Request):
        body = await parse(request, TokensGenerateRequest)
        if state.unknown_model(body.model):
            raise InvalidRequestError(f"the model {body.model!r} does not exist", param="model")
        if body.stream:
            raise InvalidRequestError("stream is not supported on /inference/v1/generate (use /v1/completions)",
                                      param="stream")
        if body.features or body.kv_transfer_params:
            raise InvalidRequestError("features and kv_transfer_params are not supported by this server",
                                      param="features" if body.features else "kv_transfer_params")
        if not body.token_ids:
            raise InvalidRequestError("token_ids is empty", param="token_ids")
        sp = body.sampling_params
        params = state.bounded(sp.to_params(), 1)
        rid = body.request_id or f"gen-{uuid.uuid4().hex}"
        run = Run(state, state.decoder(sp.skip_special_tokens), [body.token_ids], params, sp.stop_strings(),
                  stream=False, keep_stop=sp.include_stop_str_in_output, rid=rid)
        await run.finish(request)
        decode = state.tokenizer.decode
        choices = []
        for j, text in enumerate(run.texts[0]):
            logprobs = None
            if sp.logprobs is not None:
                logprobs = {"content": token_entries(decode, text.token_ids, text.logprobs, text.forced_mask,
                                                     text.top_logprobs if sp.logprobs else None)}
            choices.append({"index": j, "token_ids": text.token_ids, "finish_reason": text.finish_reason,
                            "logprobs": logprobs, "forced_mask": text.forced_mask,
                            "weight_version": text.weight_version or loop.engine.weight_version,
                            "weight_versions": text.weight_versions, **budget(text)})
        scored = prompt_logprob_entries(body.token_ids, run.texts[0][0], decode) if sp.prompt_logprobs is not None \
            else None
        return {"request_id": rid, "choices": choices, "prompt_logprobs": scored,
                "kv_transfer_params": None}

    @api.get("/is_paused")
    async def is_paused():
        return {"is_paused": loop.paused}

    @api.post("/abort_requests")
    async def abort_requests(request: Request):
        body = await parse(request, AbortRequestsRequest, empty_ok=True)
        wanted = set(body.request_ids or ())
        runs = [r for r in list(state.runs) if not wanted or r.rid in wanted]
        for run in runs:
            run.abort("request")
        return {"status": "aborted", "aborted": len(runs)}

    @api.post("/sleep")
    async def sleep(level: int = Query(1, ge=1, le=2), mode: str = "abort", tags: list[str] | None = Query(None)):
        """Free the KV cache, at either level (the weights stay where they are: a trainer's update overwrites
        them in place). Requests in flight are aborted (mode abort, vLLM's default) or finished first (wait);
        requests that arrive while asleep wait for /wake_up."""
        if mode not in ("abort", "wait"):
            raise InvalidRequestError("mode must be abort or wait (keep would hold requests whose KV cache is freed)",
                                      param="mode")
        if mode == "wait":
            paused = loop.paused  # a pause the client made stays; the one made here to drain is undone
            await asyncio.wrap_future(loop.pause_async("wait"))
            try:
                await asyncio.wrap_future(loop.sleep_async())
            finally:
                if not paused:
                    await asyncio.wrap_future(loop.resume_async())
        else:
            await asyncio.wrap_future(loop.sleep_async(abort=True))
        return {"status": "sleeping", "level": level}

    @api.post("/wake_up")
    async def wake_up(tags: list[str] | None = Query(None)):
        """Allocate the KV cache again (tags none or with kv_cache; tags=weights alone changes nothing: the
        weights never left)."""
        if tags is None or "kv_cache" in tags:
            await asyncio.wrap_future(loop.wake_up_async())
        return {"status": "awake", "is_sleeping": loop.engine.sleeping}

    @api.get("/is_sleeping")
    async def is_sleeping():
        return {"is_sleeping": loop.engine.sleeping}

    @api.post("/reset_prefix_cache")
    async def reset_prefix_cache(request: Request):
        await parse(request, ResetPrefixCacheRequest, empty_ok=True)
        await asyncio.wrap_future(loop.call_async(lambda engine: engine.reset_prefix_cache()))
        return {"status": "ok"}

    @api.get("/get_world_size")
    async def get_world_size(include_dp: bool = True):
        return {"world_size": loop.engine.config.tensor_parallel_size}

    return api

