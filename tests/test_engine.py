"""The engine end to end on a tiny random model (CPU, reference backend)."""
from __future__ import annotations

import re

import pytest
import torch
from transformers import AutoModelForCausalLM

from elastic_decode import LLM, ElasticDecodeError, InvalidRequestError, SamplingParams

PROMPTS = ["Hello there, how are", "The quick brown fox", "In 1905, Albert Einstein published", "a b c d e f g"]


@pytest.fixture(scope="module")
def llm(tiny_llama):
    return LLM(str(tiny_llama), dtype="float32", device="cpu", block_size=4, seed=0)


def tokens(outputs):
    return [[c.token_ids for c in o.outputs] for o in outputs]


def test_continuous_batching_gives_the_same_tokens(tiny_llama, llm):
    params = [SamplingParams(temperature=0.8, top_p=0.9, seed=i, max_tokens=12 + 3 * i) for i in range(len(PROMPTS))]
    wide = llm.generate(PROMPTS, params, use_tqdm=False)
    # Two at a time: later requests join as earlier ones finish.
    narrow = LLM(str(tiny_llama), dtype="float32", device="cpu", block_size=4, max_num_seqs=2)
    assert tokens(narrow.generate(PROMPTS, params, use_tqdm=False)) == tokens(wide)


def test_seeded_request_samples_the_same_tokens_in_any_batch(llm):
    p = SamplingParams(temperature=1.0, seed=77, max_tokens=16, ignore_eos=True)
    alone = llm.generate(PROMPTS[1], p, use_tqdm=False)[0].outputs[0].token_ids
    others = [SamplingParams(temperature=1.0, seed=s, max_tokens=9) for s in (1, 2, 3)]
    mixed = llm.generate([PROMPTS[0], PROMPTS[1], PROMPTS[2], PROMPTS[3]], [others[0], p, others[1], others[2]],
                         use_tqdm=False)
    assert mixed[1].outputs[0].token_ids == alone


def test_n_samples_share_the_prompt_blocks(llm):
    engine = llm.engine
    prompt = engine.tokenizer.encode("one two three four five six seven eight nine ten eleven")
    engine.add_request(prompt, SamplingParams(n=4, temperature=1.0, seed=3, max_tokens=4))
    engine.step()  # the prefill of all four samples
    seqs = engine.scheduler.running
    assert len(seqs) == 4
    full = (len(prompt) - 1) // engine.block_manager.block_size
    assert full >= 2
    for j in range(full):
        blocks = {s.block_table[j] for s in seqs}
        assert len(blocks) == 1 and engine.block_manager.allocator.refcount(blocks.pop()) == 4
    # Only sample 0 computed the shared blocks; the others prefilled just their tail.
    assert [s.num_cached_tokens for s in seqs] == [0] + [full * engine.block_manager.block_size] * 3
    while engine.has_unfinished():
        engine.step()
    assert engine.block_manager.num_free == engine.block_manager.allocator.num_blocks
    out_n = llm.generate([prompt], SamplingParams(n=3, temperature=1.0, seed=5, max_tokens=8), use_tqdm=False)[0]
    assert len(out_n.outputs) == 3 and [c.index for c in out_n.outputs] == [0, 1, 2]
    assert len({tuple(c.token_ids) for c in out_n.outputs}) > 1  # different seeds per sample


def test_budgeted_completion_splits_into_thinking_marker_solution(llm):
    marker = (300, 301)
    p = SamplingParams(temperature=0.7, seed=1, think_budget=5, solution_budget=6, end_think=marker, ignore_eos=True)
    c = llm.generate(PROMPTS[0], p, use_tqdm=False)[0].outputs[0]
    assert c.think_tokens == 5 and c.forced_end
    assert tuple(c.token_ids[5:7]) == marker and c.forced_mask == [0] * 5 + [1, 1] + [0] * 6
    assert c.solution_tokens == 6 and len(c.token_ids) == 13 and c.finish_reason == "length"
    tok = llm.engine.tokenizer
    assert c.thinking_text == tok.decode(c.token_ids[:5]) and c.solution_text == tok.decode(c.token_ids[7:])
    assert len(c.logprobs) == 13 and all(lp <= 0 for lp in c.logprobs)


def test_generate_tensors_pads_and_groups_by_prompt(llm):
    ids = [llm.engine.tokenizer.encode(p) for p in PROMPTS[:2]]
    p = SamplingParams(n=3, temperature=1.0, seed=9, think_budget=3, solution_budget=4, end_think=(300,))
    batch = llm.generate_tensors(ids, p)
    assert batch.completion_ids.shape[0] == 6 and batch.prompt_index.tolist() == [0, 0, 0, 1, 1, 1]
    lengths = batch.completion_mask.sum(-1)
    assert torch.equal(lengths, batch.think_tokens + 1 + batch.solution_tokens)
    assert torch.all(batch.forced_mask.sum(-1) <= 1)
    assert torch.equal(batch.forced_mask.sum(-1).bool(), batch.forced_end)
    assert torch.all(batch.logprobs[batch.completion_mask == 0] == 0)


def test_load_weights_updates_in_place_and_drops_stale_prefix_cache(tiny_models, llm):
    other = AutoModelForCausalLM.from_pretrained(tiny_models["llama"], dtype=torch.float32)
    with torch.no_grad():
        for p in other.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    prompt = llm.engine.tokenizer.encode("one two three four five six seven eight nine")
    greedy = SamplingParams(temperature=0.0, max_tokens=10)
    llm.generate([prompt], greedy, use_tqdm=False)  # leaves the prompt's blocks in the prefix cache
    assert llm.load_weights(other.named_parameters()) == len(list(llm.engine.model.hf_named_parameters()))
    got = llm.generate([prompt], greedy, use_tqdm=False)[0].outputs[0].token_ids
    ids = torch.tensor([prompt])
    expected = other.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=10, do_sample=False,
                              pad_token_id=2)[0, len(prompt):].tolist()
    assert got == expected


def test_bad_requests_raise_clear_errors_before_any_work(llm):
    with pytest.raises(InvalidRequestError, match="prompt 1: prompt is empty"):
        llm.generate(["fine", ""], use_tqdm=False)
    with pytest.raises(InvalidRequestError, match="context window is 512"):
        llm.generate([[5] * 600], use_tqdm=False)
    with pytest.raises(InvalidRequestError, match="token ids must be integers"):
        llm.generate([[5, 10**9]], use_tqdm=False)
    with pytest.raises(InvalidRequestError, match="2 SamplingParams for 1 prompts"):
        llm.generate(["x"], [SamplingParams(), SamplingParams()], use_tqdm=False)
    assert not llm.engine.has_unfinished()


@pytest.mark.parametrize("kwargs, message", [
    (dict(top_p=0.0), "top_p must be a number in (0.0, 1.0]"),
    (dict(top_p=1.5), "top_p"),
    (dict(temperature=-0.1), "temperature"),
    (dict(think_budget=-1), "think_budget must be an integer in [0, 2147483647], got -1"),
    (dict(think_budget=2.5), "think_budget must be an integer"),
    (dict(solution_budget=0), "solution_budget must be an integer in [1, 2147483647]"),
    (dict(think_budget=2**31), "think_budget must be an integer in [0, 2147483647], got 2147483648"),
    (dict(seed=2**63), "seed must be an integer in [0, 9223372036854775807]"),
    (dict(seed=-1), "seed must be an integer in [0, 9223372036854775807], got -1"),
    (dict(stop_token_ids=[2**70]), "stop_token_ids[i] must be an integer in [0, 2147483647]"),
    (dict(stop_token_ids=None), "stop_token_ids must be a sequence of token ids, got None"),
    (dict(stop_token_ids="7"), "stop_token_ids must be a sequence of token ids"),
    (dict(end_think=[1, -2]), "end_think[i] must be an integer in [0, 2147483647], got -2"),
    (dict(max_tokens=2**31), "max_tokens must be an integer in [1, 2147483647]"),
    (dict(top_k=2**31), "top_k must be an integer in [0, 2147483647]"),
    (dict(n=10**6), "n must be an integer in [1, 4096]"),
    (dict(temperature=float("nan")), "temperature must be a number"),
    (dict(top_p=float("nan")), "top_p must be a number"),
    (dict(ignore_eos="yes"), "ignore_eos must be True or False"),
    (dict(think_budget=4, min_think=5), "min_think"),
    (dict(n=0), "n must be"),
    (dict(end_think=""), "end_think"),
])
def test_sampling_params_validation(kwargs, message):
    with pytest.raises(InvalidRequestError, match=re.escape(message)):
        SamplingParams(**kwargs)


def test_sleep_frees_the_kv_cache_and_generation_wakes_it(tiny_llama):
    llm = LLM(str(tiny_llama), dtype="float32", device="cpu", block_size=4, seed=0)
    params = SamplingParams(temperature=0.9, seed=5, max_tokens=10, ignore_eos=True)
    before = tokens(llm.generate(PROMPTS, params, use_tqdm=False))
    llm.sleep()
    assert llm.engine.sleeping and llm.engine.runner.kv_caches == []
    assert tokens(llm.generate(PROMPTS, params, use_tqdm=False)) == before  # woke up by itself
    assert not llm.engine.sleeping
    llm.engine.add_request([1, 2, 3], params)
    with pytest.raises(ElasticDecodeError, match="in flight"):
        llm.sleep()
    while llm.engine.has_unfinished():
        llm.engine.step()
