"""The engine against HF transformers: greedy, fp32, token for token."""
from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

from elastic_decode import LLM, SamplingParams

PROMPTS = [
    "The capital of France is",
    "def fibonacci(n):",
    "Once upon a time, in a small village near the mountains, there lived an old clockmaker who",
    "1, 2, 3,",
    "Q: What is the boiling point of water in Celsius?\nA:",
]


def hf_greedy(path, prompt_ids: list[int], max_new_tokens: int) -> list[int]:
    """HF generate, one prompt at a time (no padding), stopping at EOS like the engine."""
    model = hf_greedy.cache.get(str(path))
    if model is None:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
        hf_greedy.cache = {str(path): model}
    ids = torch.tensor([prompt_ids])
    with torch.no_grad():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                             do_sample=False, pad_token_id=model.config.eos_token_id)
    return out[0, len(prompt_ids):].tolist()


hf_greedy.cache = {}


def check_parity(path, max_new_tokens: int, **llm_kwargs) -> LLM:
    llm = LLM(str(path), dtype="float32", device="cpu", **llm_kwargs)
    prompt_ids = [llm.engine.tokenizer.encode(p) for p in PROMPTS]
    outs = llm.generate(prompt_ids, SamplingParams(temperature=0.0, max_tokens=max_new_tokens), use_tqdm=False)
    for prompt, ids, out in zip(PROMPTS, prompt_ids, outs):
        expected = hf_greedy(path, ids, max_new_tokens)
        got = out.outputs[0].token_ids
        first = next(i for i, (a, b) in enumerate(zip(got + [None], expected + [None])) if a != b) if got != expected else None
        assert got == expected, f"{prompt!r}: first difference at token {first}"
    return llm


@pytest.mark.slow
def test_embedded_smollm2_matches_hf(embedded_path):
    check_parity(embedded_path, max_new_tokens=24)


@pytest.mark.parametrize("kind", ["llama", "qwen2", "qwen3"])
def test_tiny_random_models_match_hf(tiny_models, kind):
    check_parity(tiny_models[kind], max_new_tokens=20)


def test_tiny_model_matches_hf_with_small_blocks_and_preemption(tiny_llama):
    # Block size 4 and a cache too small for all prompts at once: sequences are preempted
    # and recomputed, which must not change a single token.
    llm = check_parity(tiny_llama, max_new_tokens=20, block_size=4, num_kv_blocks=24)
    assert llm.last_stats.preemptions > 0
    assert llm.engine.block_manager.num_free == 24
