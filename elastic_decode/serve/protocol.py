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
from .budgets import NAMES, budget_params, refuse_unknown
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


PENALTIES = {"presence_penalty": 0.0, "frequency_penalty": 0.0, "repetition_penalty": 1.0}


def refuse_unsupported(body: BaseModel, neutral: dict, unsupported: tuple[str, ...], prefix: str = "") -> None:
    """A 400 for a field this engine does not implement: left off its neutral value (`neutral`), or given at all
    (`unsupported`). Accepted at neutral, so clients that send every field still work; never ignored."""
    for name, value in neutral.items():
        if getattr(body, name) != value:
            raise InvalidRequestError(f"{prefix}{name} is not supported by this server (leave it at {value})",
                                      param=name)
    for name in unsupported:
        if getattr(body, name):
            raise InvalidRequestError(f"{prefix}{name} is not supported by this server", param=name)


def stop_list(stop: str | list[str] | None) -> list[str]:
    """A request's stop strings (one or a list), at most 16."""
    out = [stop] if isinstance(stop, str) else list(stop or [])
    if len(out) > 16:
        raise InvalidRequestError("stop takes at most 16 strings", param="stop")
    return out


class BudgetFields(_Body):
    """The budgets (Elastic Reasoning) by every name a route takes (serve/budgets.py): thinking tokens before the
    end-of-thinking marker is forced, solution tokens after it, the marker itself, a minimum thinking length,
    and what a resubmitted rollout has spent. Every route's body has them where its ecosystem puts sampling
    fields; `custom` is the dict of custom fields beside them (SGLang's custom_params, vLLM's extra_args)."""

    thinking_budget: int | None = None
    thinking_token_budget: int | None = None  # vLLM's name (-1: no budget)
    think_budget: int | None = None  # SamplingParams' name
    solution_budget: int | None = None
    end_think: str | list[int] | None = None
    min_think: int | None = None
    thinking_spent: int | None = None
    think_spent: int | None = None
    solution_spent: int | None = None
    # Early exit on confidence (docs/confidence.md), SamplingParams' names.
    confidence: bool | None = None
    early_stop: str | None = None
    confidence_window: int | None = None
    deepconf_warmup: int | None = None
    deepconf_keep: float | None = None
    deepconf_threshold: float | None = None
    deepconf_action: str | None = None
    deepconf_consensus: float | None = None
    deer_threshold: float | None = None
    deer_transitions: list[str] | None = None
    deer_answer_prefix: str | None = None
    deer_max_probes: int | None = None
    deer_probe_tokens: int | None = None

    def budgets(self, custom: dict | None, where: str, known: set[str] = frozenset()) -> dict:
        """SamplingParams' budget arguments from these fields and the custom ones (which may hold only budget
        names and `known` others)."""
        custom = dict(custom or {})
        refuse_unknown(custom, set(known), where)
        fields = {k: v for k, v in self.model_dump(include=NAMES).items() if v is not None}
        for name, value in fields.items():
            if custom.get(name) is not None and repr(custom[name]) != repr(value):
                raise InvalidRequestError(f"{name} and {where}.{name} disagree (give one)", param=name)
        return budget_params({**{k: v for k, v in custom.items() if k in NAMES}, **fields})


class _Budgets(BudgetFields):
    """Budget and sampling fields shared by both OpenAI routes, and the extension fields other engines'
    clients and routers send (sglang-router re-serialises every request with SGLang's defaults)."""

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
    custom_params: dict | None = None  # SGLang's place for custom fields: the budget names
    # OpenAI fields this engine does not implement: accepted at their neutral values only.
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: dict[str, float] | None = None
    # SGLang's and vLLM's extension fields. Honoured: the stop string kept in the text (no_stop_trim,
    # include_stop_str_in_output), special tokens kept (skip_special_tokens false), the reasoning split
    # (separate_reasoning / include_reasoning false: all in content / no reasoning), token ids returned
    # (return_token_ids), prompt logprobs, the request's id (rid, request_id), the chat template's options
    # (chat route). Accepted at their neutral value only: the rest that would change what is generated.
    # Accepted and ignored: scheduling and routing hints (priority, bootstrap_*, session and cache keys).
    no_stop_trim: bool = False
    include_stop_str_in_output: bool = False
    skip_special_tokens: bool = True
    spaces_between_special_tokens: bool = True
    separate_reasoning: bool = True
    stream_reasoning: bool = True
    include_reasoning: bool = True
    return_token_ids: bool = False
    prompt_logprobs: int | None = None
    rid: str | list[str] | None = None
    request_id: str | None = None
    min_tokens: int = 0  # vLLM's name; SGLang's min_new_tokens is the same
    min_new_tokens: int = 0
    repetition_penalty: float = 1.0
    lora_path: str | None = None
    return_hidden_states: bool = False
    regex: str | None = None
    ebnf: str | None = None
    json_schema: str | None = None
    stop_regex: str | list[str] | None = None
    response_format: dict | None = None
    structured_outputs: dict | None = None
    allowed_token_ids: list[int] | None = None
    bad_words: list[str] | None = None
    truncate_prompt_tokens: int | None = None
    priority: int | None = None
    bootstrap_host: str | list[str] | None = None
    bootstrap_port: int | list[int] | None = None
    bootstrap_room: int | list[int] | None = None
    session_params: dict | None = None
    extra_key: str | None = None
    cache_salt: str | None = None
    kv_transfer_params: dict | None = None
    vllm_xargs: dict | None = None  # vLLM's place for custom fields: the budget names
    reasoning_effort: str | None = None
    stream_interval: int | None = None

    def custom_fields(self) -> tuple[dict, str]:
        """The dict of custom fields the budgets may be in, and its name."""
        if self.custom_params and self.vllm_xargs:
            raise InvalidRequestError("give budgets in custom_params or vllm_xargs, not both", param="vllm_xargs")
        return (self.custom_params or self.vllm_xargs or {}), "vllm_xargs" if self.vllm_xargs else "custom_params"

    def stop_strings(self) -> list[str]:
        return stop_list(self.stop)

    @property
    def keep_stop(self) -> bool:
        """The text keeps the stop string that ended it (SGLang's no_stop_trim, vLLM's include_stop_str_in_output)."""
        return self.no_stop_trim or self.include_stop_str_in_output

    def _refuse_what_would_change_generation(self) -> None:
        refuse_unsupported(self, {**PENALTIES, "return_hidden_states": False},
                           ("logit_bias", "lora_path", "regex", "ebnf", "json_schema", "stop_regex", "structured_outputs",
                            "allowed_token_ids", "bad_words", "truncate_prompt_tokens"))
        if self.response_format not in (None, {"type": "text"}):
            raise InvalidRequestError("response_format other than text is not supported", param="response_format")

    def sampling_params(self, max_tokens: int | None, default_max_tokens: int | None = None,
                        top: int = 0) -> SamplingParams:
        self._refuse_what_would_change_generation()
        budgets = self.budgets(*self.custom_fields())
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
                min_tokens=self.min_tokens or self.min_new_tokens,
                logprobs=top,
                prompt_logprobs=self.prompt_logprobs,
                **budgets,
            )
        except InvalidRequestError as e:
            raise InvalidRequestError(str(e), param=_OPENAI_NAMES.get(e.param, e.param)) from None


# SamplingParams' field names as the OpenAI routes call them.
_OPENAI_NAMES = {"think_budget": "thinking_budget", "think_spent": "thinking_spent"}


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
    # The chat template's options (vLLM's and SGLang's names): continue the last (assistant) message instead
    # of opening a new turn, and keyword arguments for the template (e.g. enable_thinking).
    continue_final_message: bool = False
    add_generation_prompt: bool = True
    chat_template_kwargs: dict | None = None
    documents: list | None = None
    mm_processor_kwargs: dict | None = None

    def custom_fields(self) -> tuple[dict, str]:
        """Also the budget names in chat_template_kwargs: where Seed-OSS's template takes its thinking_budget, and
        the one dict sglang-router 0.3.2 forwards on chat requests (it drops unknown fields)."""
        custom, where = super().custom_fields()
        template = {k: v for k, v in (self.chat_template_kwargs or {}).items() if k in NAMES}
        for name in set(custom) & set(template):
            if custom[name] != template[name]:
                raise InvalidRequestError(f"{name} differs in {where} and chat_template_kwargs (give one)", param=name)
        return {**custom, **template}, where

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
    # The budget names the other routes use (serve/budgets.py), beside SamplingParams' own.
    thinking_budget: int | None = None
    thinking_token_budget: int | None = None
    thinking_spent: int | None = None

    def prompts(self) -> list[list[int]]:
        p = self.prompt_token_ids
        return [list(p)] if all(isinstance(x, int) for x in p) else [list(x) for x in p]

    def params(self) -> SamplingParams:
        fields = self.model_dump(exclude={"prompt_token_ids", "return_text"})
        budgets = budget_params({k: v for k, v in fields.items() if v is not None})
        return SamplingParams(**{k: v for k, v in fields.items() if k not in NAMES}, **budgets)


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
