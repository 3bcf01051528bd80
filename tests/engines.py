"""The small CPU engine most tests build: float32 (the exact setting, whatever the machine's bf16),
seeded, a 50 MiB KV cache, a short context window."""
from __future__ import annotations

from elastic_decode import LLM


def engine_kwargs(**overrides) -> dict:
    return {"dtype": "float32", "device": "cpu", "seed": 0, "kv_cache_memory_gb": 0.05, "max_model_len": 512,
            **overrides}


def tiny_llm(path, **overrides) -> LLM:
    return LLM(str(path), **engine_kwargs(**overrides))
