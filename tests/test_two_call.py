"""The two-call recipe (think, append the marker, prefill again, solve) on this engine: greedy
completions equal in-kernel forcing token for token; appended markers are flagged."""
from __future__ import annotations

import pytest

from elastic_decode import LLM, ElasticDecodeError, SamplingParams

PROMPTS = ["Hello there, how are", "The quick brown fox", "In 1905, Albert Einstein published", "1 2 3"]


@pytest.fixture(scope="module")
def engines(tiny_llama):
    make = lambda mode: LLM(str(tiny_llama), dtype="float32", device="cpu", block_size=4, seed=0,  # noqa: E731
                            budget_mode=mode)
    return make("in-kernel"), make("two-call")


@pytest.fixture(scope="module")
def own_marker(engines):
    """A one-token marker the greedy model writes itself within a few tokens of PROMPTS[0]."""
    out = engines[0].generate(PROMPTS[0], SamplingParams(temperature=0, max_tokens=6), use_tqdm=False)
    return (out[0].outputs[0].token_ids[2],)


def workload(marker):
    return [
        SamplingParams(temperature=0, think_budget=8, solution_budget=5, end_think=marker),  # closes it itself
        SamplingParams(temperature=0, think_budget=0, solution_budget=6),  # marker first
        SamplingParams(temperature=0, think_budget=4, solution_budget=7, n=2),  # forced, 3-token marker
        SamplingParams(temperature=0, think_budget=5, solution_budget=0),  # nothing after the marker
        SamplingParams(temperature=0, think_budget=6, solution_budget=9, max_tokens=12),  # cap inside the solution
    ]


def test_greedy_two_call_equals_in_kernel_forcing(engines, own_marker):
    in_kernel, two_call = (llm.generate(PROMPTS + PROMPTS[:1], workload(own_marker), use_tqdm=False)
                           for llm in engines)
    closed_by_model = 0
    for a, b in zip(in_kernel, two_call, strict=True):
        for x, y in zip(a.outputs, b.outputs, strict=True):
            assert y.token_ids == x.token_ids
            assert (y.think_tokens, y.solution_tokens, y.forced_end, y.finish_reason) == (
                x.think_tokens, x.solution_tokens, x.forced_end, x.finish_reason)
            assert (y.thinking_text, y.solution_text, y.text) == (x.thinking_text, x.solution_text, x.text)
            assert y.forced_mask == x.forced_mask
            # Sampled tokens carry the same logprobs; an appended marker has none (0 here).
            for lx, ly, forced in zip(x.logprobs, y.logprobs, y.forced_mask):
                assert ly == (0.0 if forced else pytest.approx(lx, abs=1e-4))
            closed_by_model += not x.forced_end
    assert closed_by_model >= 1  # the own-marker path was exercised


def test_two_call_prefills_twice(engines, own_marker):
    _, two_call = engines
    calls = []
    original = two_call._generate_once

    def spy(encoded, params, use_tqdm):
        calls.append([len(ids) for _, ids in encoded])
        return original(encoded, params, use_tqdm)

    two_call._generate_once = spy
    try:
        out = two_call.generate(PROMPTS[1], SamplingParams(temperature=1.0, seed=3, think_budget=5,
                                                           solution_budget=4, n=3), use_tqdm=False)[0]
    finally:
        two_call._generate_once = original
    prompt = len(out.prompt_token_ids)
    marker = len(two_call.engine.tokenizer.marker(None))
    # Call 2 prefills each sample's prompt + thinking + marker as a new prompt.
    assert calls[0] == [prompt] and calls[1] == [prompt + c.think_tokens + marker for c in out.outputs]
    for c in out.outputs:
        assert c.think_tokens <= 5 and c.solution_tokens <= 4
        assert c.forced_mask[c.think_tokens: c.think_tokens + marker] == [1] * marker or not c.forced_end


def test_unknown_budget_mode_is_refused(tiny_llama):
    with pytest.raises(ElasticDecodeError, match="budget_mode must be one of in-kernel, two-call"):
        LLM(str(tiny_llama), budget_mode="twice")
