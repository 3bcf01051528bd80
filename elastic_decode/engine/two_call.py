"""The two-call budget recipe, on this same engine, so in-kernel forcing can be measured against it.

This is how the Elastic Reasoning reference code (verl + vLLM) and most budget-forcing scripts
enforce a thinking budget: call 1 generates the thinking with max_tokens = t, stopping early
if the model closes its thought; the host appends the end-of-thinking marker when it did
not; call 2 prefills prompt + thinking + marker again and generates the solution with
max_tokens = s. Appended marker tokens were never sampled, so they have no logprob: they are
reported with logprob 0 and `forced_mask = 1`.

Call 1 runs the engine's budget machine with solution budget 0 only to detect the model's own
marker (a multi-token marker needs token-by-token matching, which plain stop ids cannot do)
and is capped at t tokens, so nothing is forced on the device. Greedy completions are the
in-kernel ones token for token (tested); sampled ones differ because call 2 starts a new random
stream. With t = 0 call 1 is skipped (the marker goes straight after the prompt); the outputs'
request ids are call 1's (-1 for t = 0).
"""
from __future__ import annotations

import dataclasses
from collections.abc import Callable

from ..outputs import CompletionOutput, RequestOutput
from ..errors import InvalidRequestError
from ..sampling_params import SamplingParams

# Call 2's seed: a fixed function of the request's seed and the sample's index.
_SEED_STRIDE = 1_000_003


def _solution_params(params: SamplingParams, sample: int, used: int) -> SamplingParams | None:
    """Call 2's settings for one sample that spent `used` tokens on thinking + marker; None if
    nothing is left to generate."""
    max_tokens = None if params.max_tokens is None else params.max_tokens - used
    if params.solution_budget == 0 or (max_tokens is not None and max_tokens < 1):
        return None
    seed = None if params.seed is None else (params.seed * _SEED_STRIDE + sample + 1) % 2**63
    return dataclasses.replace(params, n=1, seed=seed, think_budget=None, min_think=0, end_think=None,
                               think_spent=None, max_tokens=max_tokens)


def _nothing_yet(prompt: str | None, prompt_ids: list[int], n: int) -> RequestOutput:
    """The call-1 result of a request with t = 0: n empty thoughts (call 1 is skipped)."""
    empty = [CompletionOutput(index=j, text="", thinking_text="", solution_text="", token_ids=[], logprobs=[],
                              forced_mask=[], think_tokens=0, solution_tokens=0, forced_end=False,
                              finish_reason="length") for j in range(n)]
    return RequestOutput(request_id=-1, prompt=prompt, prompt_token_ids=list(prompt_ids), outputs=empty)


def run_two_call(engine, generate: Callable[..., list[RequestOutput]], encoded: list[tuple[str | None, list[int]]],
                 params: list[SamplingParams], use_tqdm: bool) -> list[RequestOutput]:
    """`LLM.generate(..., budget_mode="two-call")`: the same outputs' shape as in-kernel forcing. `generate(encoded,
    params, use_tqdm)` runs requests on `engine` to completion (the LLM's loop)."""
    # Call 1: thinking only (requests without a thinking budget are plain decoding, done here;
    # with t = 0 there is no thinking to generate).
    for p in params:
        if p.wants_confidence:
            raise InvalidRequestError("confidence and early_stop need the in-kernel budget mode (the two-call recipe "
                                      "is a baseline: it runs thinking and solution as separate requests)",
                                      param="early_stop")
    first = [i for i, p in enumerate(params) if p.think_budget != 0]

    def fit(max_tokens: int | None, prompt_len: int) -> int | None:
        """A cap the recipe derives from the budgets, within the context window (the window
        caps it anyway; as max_tokens it would be refused)."""
        return None if max_tokens is None else min(max_tokens, engine.window - prompt_len)

    first_params = [
        p if p.think_budget is None else dataclasses.replace(
            p, solution_budget=0,
            max_tokens=fit(p.think_budget if p.max_tokens is None else min(p.think_budget, p.max_tokens),
                           len(encoded[i][1])))
        for i, p in ((i, params[i]) for i in first)
    ]
    ran = generate([encoded[i] for i in first], first_params, use_tqdm) if first else []
    thought = [_nothing_yet(text, ids, p.n) for (text, ids), p in zip(encoded, params)]
    for i, out in zip(first, ran):
        thought[i] = out
    # (request, sample, thinking, marker, own marker, has a call-2 solution)
    pending: list[tuple[int, int, list[int], tuple[int, ...], bool, bool]] = []
    second_inputs: list[tuple[None, list[int]]] = []
    second_params: list[SamplingParams] = []
    for r, (out, p) in enumerate(zip(thought, params)):
        if p.think_budget is None:
            continue
        marker = engine.tokenizer.marker(p.end_think)
        for c in out.outputs:
            thinking = c.token_ids[: c.think_tokens]
            own = not c.forced_end and c.token_ids[c.think_tokens:] == list(marker)
            solve = _solution_params(p, c.index, len(thinking) + len(marker))
            pending.append((r, c.index, thinking, marker, own, solve is not None))
            if solve is not None:
                prompt = out.prompt_token_ids + thinking + list(marker)
                if engine.window - len(prompt) < 1:  # no room left for a solution
                    pending[-1] = pending[-1][:5] + (False,)
                    continue
                second_inputs.append((None, prompt))
                second_params.append(dataclasses.replace(solve, max_tokens=fit(solve.max_tokens, len(prompt))))
    # Call 2: every sample's prompt + thinking + marker, prefilled again.
    solved = iter(generate(second_inputs, second_params, use_tqdm) if second_inputs else [])
    merged = [list(o.outputs) for o in thought]
    for r, sample, thinking, marker, own, has_solution in pending:
        c = merged[r][sample]
        p = params[r]
        solution = next(solved).outputs[0] if has_solution else None
        marker_logprobs = c.logprobs[len(thinking):] if own else [0.0] * len(marker)
        ids = thinking + list(marker) + (solution.token_ids if solution else [])
        if p.max_tokens is not None:
            ids = ids[: p.max_tokens]
        decode = engine.tokenizer.decode
        merged[r][sample] = CompletionOutput(
            index=sample,
            text=decode(ids),
            thinking_text=decode(thinking),
            solution_text=decode(solution.token_ids) if solution else "",
            token_ids=ids,
            logprobs=(c.logprobs[: len(thinking)] + marker_logprobs + (solution.logprobs if solution else []))[: len(ids)],
            forced_mask=([0] * len(thinking) + [0 if own else 1] * len(marker)
                         + (solution.forced_mask if solution else []))[: len(ids)],
            think_tokens=len(thinking),
            solution_tokens=solution.solution_tokens if solution else 0,
            forced_end=not own and len(ids) > len(thinking),
            finish_reason=solution.finish_reason if solution else "length",
        )
    return [dataclasses.replace(o, outputs=merged[r]) for r, o in enumerate(thought)]
