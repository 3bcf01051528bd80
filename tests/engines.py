"""The small CPU engine most tests build: float32 (the exact setting, whatever the machine's bf16),
seeded, a 50 MiB KV cache, a short context window."""
from __future__ import annotations

from elastic_decode import LLM


def engine_kwargs(**overrides) -> dict:
    return {"dtype": "float32", "device": "cpu", "seed": 0, "kv_cache_memory_gb": 0.05, "max_model_len": 512,
            **overrides}


def tiny_llm(path, **overrides) -> LLM:
    return LLM(str(path), **engine_kwargs(**overrides))


def tiny_grpo_config(model, out, **overrides):
    """A GRPO run on a tiny model that takes seconds: 2 prompts x 3 completions, t* = 4, s* = 5, 3 steps."""
    from elastic_decode.train import GRPOConfig

    values = dict(model=str(model), task="arithmetic:1", output_dir=str(out), steps=3, prompts_per_step=2,
                  group_size=3, think_budget=4, solution_budget=5, temperature=1.0, learning_rate=1e-2,
                  entropy_coef=0.1, micro_batch_size=4, device="cpu", kv_cache_memory_gb=0.05)
    values.update(overrides)
    return GRPOConfig(**values)
