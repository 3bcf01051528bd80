"""Request bodies of the server's routes (pydantic), and their translation into SamplingParams.

The OpenAI routes take OpenAI's field names plus the budget fields (`thinking_budget`, also under
vLLM's `thinking_token_budget`; `solution_budget`, `end_think`, `min_think`). Unknown fields are
refused with a 400 that names them, so a misspelt budget never silently does nothing (the
failure users report of the peers: vLLM #39573, SGLang #25536). OpenAI fields that would change
sampling in ways this engine does not implement (penalties, logit_bias) are accepted only at
their neutral values.

Types are strict: a JSON `true` is not a budget, `1.0` not a count, `"7"` not a seed, `"yes"` not a
boolean (pydantic's lax mode took them all, and `thinking_budget: true` ran as a budget of 1). Text
must be valid Unicode: a lone surrogate (`"\ud800"`, which JSON can spell) is refused with a 400
naming its field, where it used to reach the tokenizer and fail as a 500.
"""
from __future__ import annotations

import dataclasses
import types
import typing
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, create_model, model_validator

from ..engine.loop import PAUSE_MODES
from ..errors import InvalidRequestError
from ..sampling_params import MAX_TOP_LOGPROBS, SamplingParams


class _Body(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    @model_validator(mode="before")
    @classmethod
    def _valid_unicode(cls, data):
        if isinstance(data, dict):
            for name, value in data.items():
                if _has_lone_surrogate(value):
                    raise NotUnicode(str(name))
        return data


class NotUnicode(Exception):
    """A request field holds a lone surrogate. Not a ValueError on purpose: pydantic would report it
    against the whole body; this reaches the server's handler, which names the field."""

    def __init__(self, field: str):
        super().__init__(f"{field}: not valid Unicode text (a lone surrogate)")
        self.field = field


def _has_lone_surrogate(value) -> bool:
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            return True
        return False
    if isinstance(value, dict):
        return any(_has_lone_surrogate(k) or _has_lone_surrogate(v) for k, v in value.items())
    if isinstance(value, list):
        return any(_has_lone_surrogate(v) for v in value)
    return False


class StreamOptions(_Body):
    include_usage: bool = False
    continuous_usage_stats: bool = False


class _Budgets(_Body):
    """Budget and sampling fields shared by both OpenAI routes."""

    model: str | None = None
    n: int = 1
    temperature: float | None = None  # OpenAI's default: 1
    top_p: float | None = None
    top_k: int | None = None
    min_p: float | None = None
    seed: int | None = None
    max_tokens: int | None = None
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = None
    ignore_eos: bool = False
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = None
    # Budgets (Elastic Reasoning): thinking tokens before the end-of-thinking marker is forced,
    # solution tokens after it, the marker itself and a minimum thinking length.
    thinking_budget: int | None = None
    thinking_token_budget: int | None = None  # vLLM's name for thinking_budget
    solution_budget: int | None = None
    end_think: str | list[int] | None = None
    min_think: int = 0
    # OpenAI fields this engine does not implement: accepted at their neutral values only.
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: dict[str, float] | None = None

    def stop_strings(self) -> list[str]:
        stop = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        if len(stop) > 16:
            raise InvalidRequestError("stop takes at most 16 strings", param="stop")
        return stop

    def sampling_params(self, max_tokens: int | None, default_max_tokens: int | None = None,
                        top: int = 0) -> SamplingParams:
        for name in ("presence_penalty", "frequency_penalty"):
            if getattr(self, name) != 0:
                raise InvalidRequestError(f"{name} is not supported by this server (leave it at 0)", param=name)
        if self.logit_bias:
            raise InvalidRequestError("logit_bias is not supported by this server", param="logit_bias")
        if self.thinking_budget is not None and self.thinking_token_budget is not None \
                and self.thinking_budget != self.thinking_token_budget:
            raise InvalidRequestError("thinking_budget and thinking_token_budget disagree (give one)",
                                      param="thinking_budget")
        think = self.thinking_budget if self.thinking_budget is not None else self.thinking_token_budget
        try:
            return SamplingParams(
                n=self.n,
                temperature=1.0 if self.temperature is None else self.temperature,
                top_p=1.0 if self.top_p is None else self.top_p,
                top_k=0 if self.top_k is None else self.top_k,
                min_p=0.0 if self.min_p is None else self.min_p,
                seed=self.seed,
                max_tokens=max_tokens if max_tokens is not None else default_max_tokens,
                ignore_eos=self.ignore_eos,
                stop_token_ids=tuple(self.stop_token_ids or ()),
                think_budget=think,
                solution_budget=self.solution_budget,
                end_think=tuple(self.end_think) if isinstance(self.end_think, list) else self.end_think,
                min_think=self.min_think,
                logprobs=top,
            )
        except InvalidRequestError as e:
            raise InvalidRequestError(str(e), param=_OPENAI_NAMES.get(e.param, e.param)) from None


# SamplingParams' field names as the OpenAI routes call them.
_OPENAI_NAMES = {"think_budget": "thinking_budget"}


class TextPart(_Body):
    type: Literal["text"]
    text: str


class ChatMessage(_Body):
    role: Literal["system", "user", "assistant", "developer"]
    content: str | list[TextPart]
    name: str | None = None

    def text(self) -> str:
        return self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)


class ChatCompletionRequest(_Budgets):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = None
    logprobs: bool = False
    top_logprobs: int | None = None

    def params(self, default_max_tokens: int | None) -> SamplingParams:
        if self.max_tokens is not None and self.max_completion_tokens is not None \
                and self.max_tokens != self.max_completion_tokens:
            raise InvalidRequestError("max_tokens and max_completion_tokens disagree (give one)",
                                      param="max_completion_tokens")
        top = self.top_logprobs or 0
        if not 0 <= top <= MAX_TOP_LOGPROBS:
            raise InvalidRequestError(f"top_logprobs must be in [0, {MAX_TOP_LOGPROBS}]", param="top_logprobs")
        if top and not self.logprobs:
            raise InvalidRequestError("top_logprobs needs logprobs: true", param="top_logprobs")
        cap = self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens
        return self.sampling_params(cap, default_max_tokens, top)


class CompletionRequest(_Budgets):
    prompt: str | list[str] | list[int] | list[list[int]]
    max_tokens: int | None = 16  # OpenAI's (and vLLM's) default for this route
    logprobs: int | None = None  # 0: each token's logprob; k: also the k most likely alternatives
    echo: bool = False
    best_of: int | None = None
    suffix: str | None = None

    def params(self, default_max_tokens: int | None) -> SamplingParams:
        if self.echo:
            raise InvalidRequestError("echo is not supported", param="echo")
        if self.suffix:
            raise InvalidRequestError("suffix is not supported", param="suffix")
        if self.best_of is not None and self.best_of != self.n:
            raise InvalidRequestError("best_of is not supported (use n)", param="best_of")
        return self.sampling_params(self.max_tokens, default_max_tokens, self.logprobs or 0)

    def prompts(self) -> list[str | list[int]]:
        p = self.prompt
        if isinstance(p, str):
            return [p]
        if not p:
            raise InvalidRequestError("prompt is empty", param="prompt")
        if all(isinstance(x, int) for x in p):
            return [list(p)]
        return list(p)


class _GenerateBase(_Body):
    prompt_token_ids: list[list[int]] | list[int] = Field(min_length=1)
    return_text: bool = True  # decode each completion's thinking and solution text too

    def prompts(self) -> list[list[int]]:
        p = self.prompt_token_ids
        return [list(p)] if all(isinstance(x, int) for x in p) else [list(x) for x in p]

    def params(self) -> SamplingParams:
        return SamplingParams(**self.model_dump(exclude={"prompt_token_ids", "return_text"}))


def _json_type(hint):
    """A type as JSON spells it: a tuple of ids is a JSON array, which strict validation takes only as a list."""
    args = typing.get_args(hint)
    if typing.get_origin(hint) is tuple:
        return list[args[0]]
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        return typing.Union[tuple(_json_type(a) for a in args)]
    return hint


def _sampling_fields() -> dict:
    """SamplingParams' fields (types and defaults) as pydantic field definitions."""
    hints = typing.get_type_hints(SamplingParams)
    fields = {}
    for f in dataclasses.fields(SamplingParams):
        default = f.default_factory() if f.default is dataclasses.MISSING else f.default
        fields[f.name] = (_json_type(hints[f.name]), list(default) if isinstance(default, tuple) else default)
    return fields


# POST /generate: token ids in, per-token results out; the sampling fields are SamplingParams' own
# (names, types, defaults), so the route and the Python API cannot drift apart.
GenerateRequest = create_model("GenerateRequest", __base__=_GenerateBase, **_sampling_fields())


class TokenizeRequest(_Body):
    """POST /tokenize: a raw prompt (with the model's special tokens) or a conversation (through the
    chat template), as `LLM.encode` / `LLM.encode_chat` encode them."""

    model: str | None = None
    prompt: str | None = None
    messages: list[ChatMessage] | None = None


class PauseRequest(_Body):
    mode: Literal[PAUSE_MODES] = "keep"


class UpdateWeightsRequest(_Body):
    path: str  # a checkpoint directory (its *.safetensors files) on the server's machine
