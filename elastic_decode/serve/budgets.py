"""One budget vocabulary on every route.

Each ecosystem puts custom fields where it puts them: the OpenAI routes take them at the top level,
SGLang clients inside `sampling_params.custom_params`, vLLM clients inside `sampling_params`, our own
/generate under SamplingParams' names. Whatever the route, every name below is accepted for its budget
(two names given with different values are a 400), and a name no route knows is a 400 where it appears.
"""
from __future__ import annotations

from ..errors import InvalidRequestError

# SamplingParams field -> every name a route accepts for it (the first is what the docs and errors use).
BUDGET_NAMES = {
    "think_budget": ("thinking_budget", "thinking_token_budget", "think_budget"),  # vLLM: thinking_token_budget
    "solution_budget": ("solution_budget",),
    "end_think": ("end_think",),
    "min_think": ("min_think",),
    "think_spent": ("thinking_spent", "think_spent"),  # a resubmitted rollout's thinking so far
    "solution_spent": ("solution_spent",),
}
# Early exit on confidence (SamplingParams, docs/confidence.md): same name everywhere, and the JSON types taken.
EARLY_STOP_TYPES = {
    "confidence": (bool,), "early_stop": (str,), "confidence_window": (int,), "deepconf_warmup": (int,), "deepconf_keep": (int, float),
    "deepconf_threshold": (int, float), "deepconf_action": (str,), "deepconf_consensus": (int, float),
    "deer_threshold": (int, float), "deer_transitions": (list,), "deer_answer_prefix": (str,), "deer_max_probes": (int,),
    "deer_probe_tokens": (int,),
}
NAMES = {name for names in BUDGET_NAMES.values() for name in names} | set(EARLY_STOP_TYPES)


def budget_params(fields: dict) -> dict:
    """The SamplingParams budget arguments of a request's fields (any route's names); None values are left out.
    Types are strict (a JSON `true` is not a budget); vLLM's thinking_token_budget -1 means no budget."""
    out = {}
    for param, names in BUDGET_NAMES.items():
        given = [(name, fields[name]) for name in names if fields.get(name) is not None]
        if param == "think_budget":
            given = [(n, v) for n, v in given if not (n == "thinking_token_budget" and v == -1)]
        if len({repr(v) for _, v in given}) > 1:
            raise InvalidRequestError(f"{' and '.join(n for n, _ in given)} disagree (give one)", param=given[0][0])
        if not given:
            continue
        name, value = given[0]
        if param == "end_think":
            if not (isinstance(value, str) or (isinstance(value, list) and all(type(t) is int for t in value))):
                raise InvalidRequestError(f"{name} must be a string or a list of token ids", param=name)
            value = tuple(value) if isinstance(value, list) else value
        elif type(value) is not int:  # bool is an int subclass: refused here
            raise InvalidRequestError(f"{name} must be an integer, got {value!r}", param=name)
        out[param] = value
    for name, types in EARLY_STOP_TYPES.items():
        value = fields.get(name)
        if value is None:
            continue
        if type(value) not in types:  # a bool is no number here
            raise InvalidRequestError(f"{name} must be a {' or '.join(t.__name__ for t in types)}, got {value!r}",
                                      param=name)
        out[name] = tuple(value) if name == "deer_transitions" else value
    return out


def refuse_unknown(fields: dict, known: set[str], where: str) -> None:
    """A dict of custom fields (SGLang's custom_params) may hold only budget names and `known` others."""
    unknown = sorted(set(fields) - NAMES - known)
    if unknown:
        raise InvalidRequestError(f"{where}: unknown field(s) {', '.join(unknown)}; the budget fields are "
                                  f"{', '.join(names[0] for names in BUDGET_NAMES.values())}", param=where)
