"""SamplingParams.logprobs = k: each emitted token's k most likely alternatives under the model's raw
distribution, checked against HF transformers' log_softmax (fp32) after prefill and through
multi-step decode chunks; mixed batches keep each request's own k."""
from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

from elastic_decode import LLM, ElasticDecodeError, SamplingParams


@pytest.fixture(scope="module")
def hf(tiny_llama):
    return AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32).eval()


@pytest.mark.parametrize("steps", [1, 3])
def test_alternatives_are_the_raw_distributions_top_k(tiny_llama, hf, steps):
    llm = LLM(str(tiny_llama), dtype="float32", device="cpu", kv_cache_memory_gb=0.05, max_model_len=256,
              num_scheduler_steps=steps)
    prompts = [[1, 5, 9, 300, 7], [3, 4], [8, 8, 8]]
    params = [SamplingParams(temperature=0.0, max_tokens=7, ignore_eos=True, logprobs=3),
              SamplingParams(temperature=0.7, top_p=0.8, seed=1, max_tokens=5, ignore_eos=True, logprobs=5),
              SamplingParams(max_tokens=4, ignore_eos=True)]
    outs = [o.outputs[0] for o in llm.generate(prompts, params, use_tqdm=False)]
    assert outs[2].top_logprobs is None
    for prompt, p, c in zip(prompts, params, outs[:2]):
        assert len(c.top_logprobs) == len(c.token_ids)
        with torch.no_grad():
            logp = torch.log_softmax(hf(torch.tensor([prompt + c.token_ids])).logits[0].float(), -1)
        for k, alternatives in enumerate(c.top_logprobs):
            values, ids = logp[len(prompt) - 1 + k].topk(p.logprobs)
            assert [i for i, _ in alternatives] == ids.tolist()
            assert [v for _, v in alternatives] == pytest.approx(values.tolist(), abs=1e-4)
        if p.temperature == 0:  # greedy: the emitted token is the top one, with the same logprob
            assert [a[0][0] for a in c.top_logprobs] == c.token_ids
            assert [a[0][1] for a in c.top_logprobs] == pytest.approx(c.logprobs, abs=1e-5)


def test_logprobs_bound():
    with pytest.raises(ElasticDecodeError, match="logprobs must be an integer in \\[0, 20\\]"):
        SamplingParams(logprobs=21)


def test_prompt_logprobs_are_the_raw_distribution_of_each_prompt_token(tiny_llama, hf):
    """SamplingParams.prompt_logprobs (SGLang's input_token_logprobs, vLLM's prompt_logprobs): every prompt
    token's logprob given the ones before it, and its alternatives; computed whole even where the prefix
    cache holds the prompt (a cached block has no hidden states to give logits)."""
    llm = LLM(str(tiny_llama), dtype="float32", device="cpu", kv_cache_memory_gb=0.05, max_model_len=600)
    prompt = [1] + [(7 * i) % 300 + 2 for i in range(300)]  # longer than one slice of logits (256 rows)
    cached = llm.generate([prompt], SamplingParams(max_tokens=2), use_tqdm=False)[0]
    assert cached.prompt_logprobs is None
    again = llm.generate([prompt, prompt[:40]], [SamplingParams(max_tokens=2, prompt_logprobs=3),
                                                  SamplingParams(max_tokens=2, prompt_logprobs=0, n=2)],
                         use_tqdm=False)
    with torch.no_grad():
        logp = torch.log_softmax(hf(torch.tensor([prompt])).logits[0].float(), -1)
    out = again[0]
    assert out.prompt_logprobs[0] is None and len(out.prompt_logprobs) == len(prompt)
    expected = logp[:-1].gather(1, torch.tensor(prompt[1:])[:, None]).squeeze(1).tolist()
    assert out.prompt_logprobs[1:] == pytest.approx(expected, abs=1e-4)
    values, ids = logp[:-1].topk(3)
    assert [[i for i, _ in row] for row in out.prompt_top_logprobs[1:]] == ids.tolist()
    assert again[1].prompt_logprobs[1:] == pytest.approx(expected[:39], abs=1e-4)
    assert again[1].prompt_top_logprobs is None
