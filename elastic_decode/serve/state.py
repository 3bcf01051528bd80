"""What every route of one server shares: the engine loop, the settings, the tokenizer, the runs in flight
and the shutdown state. One `ServerState` per app, passed to the routers that need it (no globals)."""
from __future__ import annotations

import dataclasses
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import TYPE_CHECKING

from ..engine.loop import EngineLoop
from ..errors import InvalidRequestError
from ..sampling_params import SamplingParams

if TYPE_CHECKING:
    from .runs import Run


@dataclass(frozen=True)
class ServerConfig:
    model_name: str  # what /v1/models lists and requests may name
    api_key: str | None = None  # when set, every route but /health needs "Authorization: Bearer <key>"
    max_body_bytes: int = 16 * 2**20  # request bodies (JSON); /update_weights has its own bound
    # a safetensors body posted to /update_weights; None: what the model's weights could take in float64
    # (8 bytes per parameter) plus 64 MiB of header, the largest body that can be valid
    max_weights_bytes: int | None = None
    max_n: int = 64  # completions per prompt
    max_prompts: int = 1024  # prompts in one /v1/completions or /generate request
    max_tokens: int | None = None  # cap on max_tokens; None = the context window
    # seconds in-flight requests may take to finish after SIGTERM / Ctrl-C before they are aborted
    shutdown_timeout_s: float = 5.0
    # the budgets of a request that names no thinking budget (None: none); a request that names one keeps its own
    thinking_budget: int | None = None
    solution_budget: int | None = None


class ServerState:
    def __init__(self, loop: EngineLoop, config: ServerConfig):
        self.loop, self.config = loop, config
        self.tokenizer = loop.engine.tokenizer
        self.started = int(time.time())
        self.runs: set[Run] = set()  # HTTP calls whose requests are on the engine loop
        self.shutting_down = False  # set on SIGTERM / SIGINT: new requests get a 503
        # Blocking work a route must not do on the event loop (reading a checkpoint, parsing weights): its own
        # threads, so it can never starve the routes that wait on the engine loop.
        self.blocking = ThreadPoolExecutor(max_workers=2, thread_name_prefix="elastic-decode-io")
        self.max_weights_bytes = config.max_weights_bytes or 8 * loop.engine.num_parameters + 64 * 2**20

    def close(self) -> None:
        self.blocking.shutdown(wait=False, cancel_futures=True)

    # -- checks a request passes before it reaches the engine ---------------------------------------

    def bounded(self, params: SamplingParams, prompts: int, budgets: bool = True) -> SamplingParams:
        """The request within the server's bounds (--max-n, --max-prompts, --max-tokens), with the server's
        max_tokens cap and default budgets (--thinking-budget, --solution-budget) applied when it gives none."""
        config = self.config
        if params.n > config.max_n:
            raise InvalidRequestError(f"n must be at most {config.max_n} on this server (--max-n)", param="n")
        if prompts > config.max_prompts:
            raise InvalidRequestError(f"at most {config.max_prompts} prompts per request (--max-prompts)",
                                      param="prompt")
        if config.max_tokens is not None and params.max_tokens is not None and params.max_tokens > config.max_tokens:
            raise InvalidRequestError(f"max_tokens must be at most {config.max_tokens} on this server (--max-tokens)",
                                      param="max_tokens")
        if params.max_tokens is None and config.max_tokens is not None:
            params = dataclasses.replace(params, max_tokens=config.max_tokens)
        if budgets and params.think_budget is None and config.thinking_budget is not None:
            params = dataclasses.replace(params, think_budget=config.thinking_budget,
                                         solution_budget=params.solution_budget if params.solution_budget is not None
                                         else config.solution_budget)
        return params

    def decoder(self, skip_special_tokens: bool = True):
        """The detokenizer of a request: special tokens dropped (the default) or kept."""
        decode = self.tokenizer.decode
        return decode if skip_special_tokens else (lambda ids: decode(ids, skip_special_tokens=False))

    def unknown_model(self, name: str | None) -> bool:
        return name is not None and name != self.config.model_name

    def encode_messages(self, messages: list[dict], continue_final_message: bool = False,
                        chat_template_kwargs: dict | None = None) -> list[int]:
        if not any(m["content"].strip() for m in messages):
            raise InvalidRequestError("every message is empty", param="messages")
        if continue_final_message and messages[-1]["role"] != "assistant":
            raise InvalidRequestError("continue_final_message needs the last message to be the assistant's",
                                      param="continue_final_message")
        try:
            return self.tokenizer.encode_chat(messages, continue_final_message, chat_template_kwargs)
        except InvalidRequestError as e:
            raise InvalidRequestError(str(e), param="messages") from None
        except Exception as e:  # noqa: BLE001 - a chat template may reject a conversation in its own way
            raise InvalidRequestError(f"the chat template rejected these messages: {e}", param="messages") from None

    def encode_prompt(self, text: str) -> list[int]:
        if not text:
            raise InvalidRequestError("a prompt is empty", param="prompt")
        return self.tokenizer.encode(text)
