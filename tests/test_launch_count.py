"""Kernel launches per layer of one decode step (issue "The decode step without host overhead"):
aten ops that launch a kernel (views, metadata and allocations excluded) plus Triton launches, per
layer (a 4-layer model minus a 2-layer one, halved), on the Triton backend (interpreter): 4 GEMMs
(q/k/v and gate/up packed) and 5 Triton kernels (two RMSNorms with their residual adds, RoPE + the
cache write, attention, SiLU-mul) = 9; the issue's bound is 10. The torch reference ops are the
oracle and the CPU backend, written for clarity: not bounded here (bench_host.py reports them)."""
from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from elastic_decode import LLM, SamplingParams

LAUNCHES_PER_LAYER = 10
NOT_LAUNCHES = {"detach", "lift_fresh", "sym_size", "sym_stride", "sym_numel", "is_same_size", "size", "stride",
                "empty", "empty_like", "new_empty", "empty_strided", "new_empty_strided"}


class Launches(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.count = 0
        self.inside_triton = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if not func.is_view and func.overloadpacket.__name__ not in NOT_LAUNCHES and not self.inside_triton:
            self.count += 1
        return func(*args, **(kwargs or {}))


def _model(folder, layers, embedded_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig

    config = LlamaConfig(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=layers,
                         num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=512)
    AutoModelForCausalLM.from_config(config).save_pretrained(folder)
    AutoTokenizer.from_pretrained(embedded_path).save_pretrained(folder)
    return folder


def test_launches_per_layer_per_decode_step(tmp_path, embedded_path, monkeypatch):
    from triton.runtime import interpreter

    mode = Launches()
    real = interpreter.GridExecutor.__call__

    def counted(self, *args, **kwargs):
        mode.count += 1
        mode.inside_triton += 1  # the interpreter's own torch ops are not launches
        try:
            return real(self, *args, **kwargs)
        finally:
            mode.inside_triton -= 1

    monkeypatch.setattr(interpreter.GridExecutor, "__call__", counted)
    counts = []
    for layers in (2, 4):
        llm = LLM(str(_model(tmp_path / str(layers), layers, embedded_path)), device="cpu", backend="triton",
                  kv_cache_memory_gb=0.01, max_model_len=128)
        engine = llm.engine
        for prompt in ([1, 2, 3], [4, 5]):
            engine.add_request(prompt, SamplingParams(max_tokens=4, ignore_eos=True, end_think=(10, 11)))
        engine.step()  # the prefill
        mode.count = 0
        with mode, torch.inference_mode():
            engine.step()  # one decode step
        counts.append(mode.count)
    per_layer = (counts[1] - counts[0]) / 2
    assert per_layer <= LAUNCHES_PER_LAYER, f"{per_layer} launches per layer (bound {LAUNCHES_PER_LAYER})"
    assert per_layer > 0, per_layer
