"""Multi-step decoding (K decode steps on the device per host sync) gives the same completions
for any K, with budgets, forcing, EOS, n > 1, preemption; and leaks no blocks (CPU)."""
from __future__ import annotations

import pytest

from elastic_decode import LLM, SamplingParams

PROMPTS = ["Hello there, how are", "The quick brown fox", "In 1905, Albert Einstein published", "a b c d e f g",
           "Once upon a time", "1 2 3"]


def workload():
    """Every budget path: forced ends at t = 0 and t > 0, no thinking phase, multi-token markers,
    solution budgets, max_tokens caps, EOS and stop ids, greedy and seeded sampling, n > 1."""
    return [
        SamplingParams(temperature=0.0, think_budget=5, solution_budget=7),
        SamplingParams(temperature=1.0, seed=3, think_budget=0, solution_budget=9, n=3),
        SamplingParams(temperature=0.9, top_p=0.8, seed=4, think_budget=11, solution_budget=4,
                       end_think=(17, 18, 19)),
        SamplingParams(temperature=1.0, top_k=20, seed=5, max_tokens=13),
        SamplingParams(temperature=1.0, seed=6, think_budget=6, solution_budget=30, stop_token_ids=(7, 8, 9, 10)),
        SamplingParams(temperature=0.7, seed=7, think_budget=3, min_think=2, solution_budget=5, n=2,
                       ignore_eos=True),
    ]


def run(model, k: int, device: str = "cpu", **engine):
    llm = LLM(str(model), dtype="float32", device=device, block_size=4, seed=0, num_scheduler_steps=k, **engine)
    runner_run, chunks = llm.engine.runner.run, []

    def counted(batch):
        chunks.append(batch.num_steps)
        return runner_run(batch)

    llm.engine.runner.run = counted
    outputs = llm.generate(PROMPTS, workload(), use_tqdm=False)
    llm.chunks = chunks
    bm = llm.engine.block_manager
    assert bm.num_free == bm.allocator.num_blocks  # every reserved block came back
    return outputs, llm


def same(a, b):
    for ra, rb in zip(a, b, strict=True):
        for ca, cb in zip(ra.outputs, rb.outputs, strict=True):
            assert ca.token_ids == cb.token_ids
            assert ca.forced_mask == cb.forced_mask
            assert (ca.think_tokens, ca.solution_tokens, ca.forced_end, ca.finish_reason) == (
                cb.think_tokens, cb.solution_tokens, cb.forced_end, cb.finish_reason)
            assert ca.logprobs == pytest.approx(cb.logprobs, abs=1e-5)


@pytest.fixture(scope="module")
def one_step(tiny_models):
    return run(tiny_models["qwen3"], 1)[0]


@pytest.mark.parametrize("k", [2, 5, 16])
def test_any_k_gives_the_same_completions(tiny_models, one_step, k):
    outputs, llm = run(tiny_models["qwen3"], k)
    assert max(llm.chunks) == k  # chunks of k steps did run
    same(outputs, one_step)
    forced = [c.forced_end for o in outputs for c in o.outputs]
    assert any(forced) and not all(forced)  # the workload exercises both endings


def test_any_k_under_preemption(tiny_models, one_step):
    # 14 blocks of 4 tokens cannot hold all 12 sequences: chunks shrink and sequences are preempted.
    outputs, llm = run(tiny_models["qwen3"], 6, num_kv_blocks=14, max_num_seqs=12)
    assert llm.engine.scheduler.num_preemptions > 0
    same(outputs, one_step)


def test_chunks_stop_at_the_longest_remaining_sequence(tiny_llama):
    llm = LLM(str(tiny_llama), dtype="float32", device="cpu", block_size=4, num_scheduler_steps=8)
    engine = llm.engine
    engine.add_request(engine.tokenizer.encode("a b c"), SamplingParams(max_tokens=4, ignore_eos=True))
    engine.step()  # prefill: the first token
    batch = engine.scheduler.schedule()
    assert batch.num_steps == 3  # 3 tokens left, not 8
    seq = batch.seqs[0]
    assert len(seq.block_table) * 4 >= len(seq) + 2  # slots for all three reserved up front
    result = engine.runner.run(batch)
    assert [len(t) for t in result.tokens] == [3]
    engine.scheduler.postprocess(batch, result)
    assert not engine.has_unfinished()


@pytest.mark.cuda
def test_any_k_on_the_gpu(tiny_models):
    """The Triton kernels in fp32 on a GPU: 8-step chunks give the 1-step completions."""
    same(run(tiny_models["qwen3"], 8, device="cuda")[0], run(tiny_models["qwen3"], 1, device="cuda")[0])


def test_shared_prefix_blocks_give_the_unshared_tokens(tiny_llama):
    """n samples share the prompt's blocks and a repeated prompt hits the prefix cache: greedy
    tokens equal those of a fresh engine that computed everything itself."""
    prompt = "one two three four five six seven eight nine ten eleven twelve"
    params = SamplingParams(temperature=0.0, think_budget=6, solution_budget=6, ignore_eos=True)
    fresh = LLM(str(tiny_llama), dtype="float32", device="cpu", block_size=4)
    alone = fresh.generate(prompt, params, use_tqdm=False)[0].outputs[0].token_ids
    shared = LLM(str(tiny_llama), dtype="float32", device="cpu", block_size=4, num_scheduler_steps=3)
    first = shared.generate(prompt, SamplingParams(**{**params.__dict__, "n": 3}), use_tqdm=False)[0]
    assert [c.token_ids for c in first.outputs] == [alone] * 3
    shared.engine.add_request(shared.engine.tokenizer.encode(prompt), params)
    shared.engine.step()  # the repeated prompt's prefill
    (seq,) = shared.engine.scheduler.running
    assert seq.num_cached_tokens >= 8  # it reused cached blocks
    while shared.engine.has_unfinished():
        done = shared.engine.step()
    assert done[0].outputs[0].token_ids == alone
    bm = shared.engine.block_manager
    assert bm.num_free == bm.allocator.num_blocks
