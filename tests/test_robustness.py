"""The engine never poisons itself: bad values, threads, interrupted calls, non-finite weights.

After any failure the engine must be empty (no queued request, no block in use) and behave as a
fresh one: a fixed seeded request returns its fixed tokens.
"""
from __future__ import annotations

import dataclasses
import logging
import math
import threading

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from elastic_decode import (
    LLM,
    ElasticDecodeError,
    InvalidRequestError,
    ModelLoadError,
    NonFiniteLogitsError,
    SamplingParams,
)
from test_budget_contract import check_invariants

FIXED = SamplingParams(temperature=1.0, seed=1234, max_tokens=10, ignore_eos=True)


@pytest.fixture(scope="module")
def llm(tiny_llama):
    return LLM(str(tiny_llama), dtype="float32", device="cpu", block_size=4, seed=0)


@pytest.fixture(scope="module")
def fixed_tokens(tiny_llama):
    fresh = LLM(str(tiny_llama), dtype="float32", device="cpu", block_size=4, seed=0)
    return fresh.generate("The quick brown fox", FIXED, use_tqdm=False)[0].outputs[0].token_ids


def assert_clean(llm, fixed_tokens):
    engine = llm.engine
    assert not engine.has_unfinished() and not engine.requests
    assert engine.block_manager.num_free == engine.block_manager.allocator.num_blocks
    assert llm.generate("The quick brown fox", FIXED, use_tqdm=False)[0].outputs[0].token_ids == fixed_tokens


@pytest.mark.parametrize("call, message", [
    (lambda llm: llm.generate("Hi", SamplingParams(max_tokens=4, seed=2**63)), "seed must be"),
    (lambda llm: llm.generate("Hi", SamplingParams(stop_token_ids=[2**70])), "stop_token_ids[i] must be"),
    (lambda llm: llm.generate("Hi", SamplingParams(stop_token_ids=[10**6])), "stop_token_ids must be below"),
    (lambda llm: llm.generate(None), "prompts must be a string, a list of token ids"),
    (lambda llm: llm.generate(5), "prompts must be a string"),
    (lambda llm: llm.generate(["Hi", 3.5]), "prompt 1 must be a string or a list of token ids"),
    (lambda llm: llm.generate("Hi", {"max_tokens": 2}), "params must be a SamplingParams or a list of them"),
    (lambda llm: llm.generate(["Hi", "Yo"], [SamplingParams(), {"n": 2}]), "params must be a SamplingParams, got dict"),
    (lambda llm: llm.generate([[1, 2, 10**9]]), "prompt token ids must be integers"),
    (lambda llm: llm.chat(None), "conversations must be a list"),
    (lambda llm: llm.chat([[{"role": "user"}]]), 'a conversation must be a non-empty list of {"role", "content"}'),
    (lambda llm: llm.generate("Hi", SamplingParams(max_tokens=10**6)), "exceed the context window of 512 tokens"),
])
def test_a_bad_request_is_one_clear_error_and_leaves_the_engine_clean(llm, fixed_tokens, call, message):
    with pytest.raises(InvalidRequestError) as err:
        call(llm)
    assert message in str(err.value)
    assert_clean(llm, fixed_tokens)


def test_an_interrupted_call_leaves_nothing_behind(llm, fixed_tokens):
    """A callback raising mid-run (as Ctrl-C would): the other requests are dropped with their
    blocks, and the next call does only its own work."""
    prompts = ["Hello there, how are", "The quick brown fox", "In 1905, Albert Einstein published", "1 2 3"]
    slow = [SamplingParams(temperature=0.0, max_tokens=4 + 30 * i, ignore_eos=True) for i in range(4)]

    def stop(index, out):
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        llm.generate(prompts, slow, use_tqdm=False, on_finished=stop)
    steps = []
    run = llm.engine.runner.run
    llm.engine.runner.run = lambda batch: steps.append(batch) or run(batch)
    try:
        assert_clean(llm, fixed_tokens)
    finally:
        llm.engine.runner.run = run
    assert len(steps) == FIXED.max_tokens  # a prefill and 9 decode steps: none of the abandoned work


def test_threads_get_the_tokens_of_a_single_thread_run(llm):
    prompts = ["Hello there, how are", "The quick brown fox", "In 1905, Albert Einstein published", "1 2 3"]
    params = [SamplingParams(temperature=0.9, top_k=20, seed=40 + i, max_tokens=24, ignore_eos=True) for i in range(4)]
    alone = [llm.generate(p, s, use_tqdm=False)[0].outputs[0].token_ids for p, s in zip(prompts, params)]
    results: dict[int, list[int]] = {}
    errors = []

    def work(i):
        try:
            results[i] = llm.generate(prompts[i], params[i], use_tqdm=False)[0].outputs[0].token_ids
        except Exception as e:  # noqa: BLE001 (reported below)
            errors.append(e)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert [results[i] for i in range(4)] == alone
    assert all(len(r) == 24 for r in alone)


def test_load_weights_is_all_or_nothing(llm, fixed_tokens):
    model = llm.engine.model
    name = "model.norm.weight"
    before = dict(model.named_parameters())[name].clone()
    with pytest.raises(ModelLoadError, match="unexpected weight 'no.such.weight'"):
        llm.load_weights([(name, before + 1), ("no.such.weight", torch.zeros(3))])
    with pytest.raises(ModelLoadError, match="has shape"):
        llm.load_weights([(name, before + 1), ("model.layers.0.mlp.up_proj.weight", torch.zeros(3))])
    bad = before.clone()
    bad[0] = float("nan")
    with pytest.raises(ModelLoadError, match=f"weight '{name}' has non-finite values .* nothing was loaded"):
        llm.load_weights([(name, bad)])
    assert torch.equal(dict(model.named_parameters())[name], before)
    assert_clean(llm, fixed_tokens)


def test_non_finite_weights_raise_one_clear_error(tiny_llama, fixed_tokens, caplog):
    fresh = LLM(str(tiny_llama), dtype="float32", device="cpu", block_size=4, seed=0)
    weight = dict(fresh.engine.model.named_parameters())["model.norm.weight"]
    saved = weight.detach().clone()
    with torch.no_grad():
        weight[0] = float("nan")  # as a buggy trainer's update would leave it (load_weights refuses it)
    with pytest.raises(NonFiniteLogitsError, match="non-finite logits .* weights are likely non-finite"):
        fresh.generate(["The quick brown fox", "1 2 3"], SamplingParams(temperature=0.7, seed=3, max_tokens=6),
                       use_tqdm=False)
    with torch.no_grad():
        weight.copy_(saved)
    assert_clean(fresh, fixed_tokens)


def test_a_kv_cache_smaller_than_the_window_is_said_at_start_up(tiny_llama, caplog):
    with caplog.at_level(logging.WARNING, logger="elastic_decode"):
        small = LLM(str(tiny_llama), dtype="float32", device="cpu", block_size=4, kv_cache_memory_gb=1e-9)
    assert any("the KV cache holds 4 tokens, fewer than the 512-token context window" in r.getMessage()
               for r in caplog.records)
    with pytest.raises(InvalidRequestError, match="context window is 4 tokens"):
        small.generate([[1, 2, 3, 4, 5, 6, 7, 8]], SamplingParams(max_tokens=32), use_tqdm=False)
    with pytest.raises(InvalidRequestError, match=r"prompt \(3 tokens\) \+ max_tokens \(32\) exceed the context "
                                                   r"window of 4 tokens; lower max_tokens to 1"):
        small.generate([[1, 2, 3]], SamplingParams(max_tokens=32), use_tqdm=False)


# -- any request: the library's own error before any work, or outputs that keep the contract ----

INT_EDGES = [0, 1, -1, 2**31 - 1, 2**31, 2**63 - 1, 2**63, -(2**63), 10**30]
FLOAT_EDGES = [0.0, 1.0, 0.5, -0.1, 1e-30, 1e30, math.inf, -math.inf, math.nan]


def maybe(strategy):
    return st.one_of(st.none(), strategy)


ints = st.one_of(st.sampled_from(INT_EDGES), st.integers(-3, 40))
floats = st.one_of(st.sampled_from(FLOAT_EDGES), st.floats(0, 2, allow_nan=False))
odd = st.sampled_from(["7", 2.5, True, [1], None])
fields = st.fixed_dictionaries({}, optional={
    "n": st.one_of(st.integers(-1, 3), st.sampled_from(INT_EDGES), odd),
    "temperature": st.one_of(floats, odd), "top_p": st.one_of(floats, odd), "top_k": st.one_of(ints, odd),
    "min_p": st.one_of(floats, odd), "seed": st.one_of(maybe(ints), odd), "max_tokens": st.one_of(maybe(ints), odd),
    "think_budget": st.one_of(maybe(ints), odd), "solution_budget": st.one_of(maybe(ints), odd),
    "min_think": st.one_of(ints, odd), "ignore_eos": st.one_of(st.booleans(), odd),
    "stop_token_ids": st.one_of(st.lists(ints, max_size=3), odd),
    "end_think": st.one_of(st.none(), st.sampled_from(["</think>", ""]), st.lists(ints, max_size=3), odd),
})
prompts = st.one_of(st.sampled_from(["Hi", "The quick brown fox", ""]),
                    st.lists(st.one_of(st.integers(0, 60), st.sampled_from([-1, 10**6, 2**63])), max_size=5))


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(kwargs=fields, prompt=prompts)
def test_any_request_errors_cleanly_or_keeps_the_contract(llm, fixed_tokens, kwargs, prompt):
    try:
        params = SamplingParams(**kwargs)
        if params.n > 2 or params.max_tokens is None or params.max_tokens > 16:  # keep each case quick on CPU
            params = dataclasses.replace(params, n=min(params.n, 2), max_tokens=min(params.max_tokens or 16, 16))
        outputs = llm.generate(prompt, params, use_tqdm=False)
    except ElasticDecodeError:
        pass
    else:
        for c in outputs[0].outputs:
            row = dict(t=params.think_budget, s=params.solution_budget, m=params.min_think,
                       marker=list(llm.engine.tokenizer.marker(params.end_think)),
                       max_new=params.max_tokens or llm.engine.window)
            check_invariants(row, dict(tokens=c.token_ids, forced=c.forced_mask, think_tokens=c.think_tokens,
                                       solution_tokens=c.solution_tokens, forced_end=c.forced_end,
                                       finish=1 if c.finish_reason == "stop" else 2))
    engine = llm.engine
    assert not engine.has_unfinished() and not engine.requests
    assert engine.block_manager.num_free == engine.block_manager.allocator.num_blocks


def test_after_the_property_run_a_fixed_request_is_unchanged(llm, fixed_tokens):
    assert_clean(llm, fixed_tokens)
