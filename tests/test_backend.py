"""Backend selection: the engine's choice, never the kernels' (docs/architecture.md, worker/backend.py)."""
from __future__ import annotations

import pytest
import torch

from elastic_decode import ElasticDecodeError
from elastic_decode.worker.backend import select_ops


def test_auto_on_cpu_is_the_cpp_kernels():
    assert select_ops(torch.device("cpu"), "auto").name == "cpu"
    with pytest.raises(ElasticDecodeError, match="the cpu backend runs on CPU tensors"):
        select_ops(torch.device("cuda"), "cpu")


def test_env_variable_forces_a_backend(monkeypatch):
    monkeypatch.setenv("ELASTIC_DECODE_BACKEND", "reference")
    assert select_ops(torch.device("cpu")).name == "reference"
    monkeypatch.setenv("ELASTIC_DECODE_BACKEND", "fast")
    with pytest.raises(ElasticDecodeError, match="backend must be one of auto, triton, cpu, reference"):
        select_ops(torch.device("cpu"))


def test_triton_on_cpu_without_the_interpreter_is_refused(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(ElasticDecodeError, match="TRITON_INTERPRET=1"):
        select_ops(torch.device("cpu"), "triton")


def test_triton_backend_matches_the_reference_end_to_end(tiny_models):
    """The whole engine on the Triton kernels (interpreter on CPU) gives the reference's tokens."""
    from elastic_decode import LLM, SamplingParams

    prompts = ["The quick brown fox", "In 1905, Albert Einstein published his", "1 2 3"]
    greedy = SamplingParams(temperature=0.0, max_tokens=6, think_budget=3, solution_budget=2, end_think=(300, 301))
    sampled = SamplingParams(temperature=0.9, top_k=20, seed=11, max_tokens=3)
    for kind in ("llama", "qwen3"):
        results = {}
        # Triton with 4-step decode chunks (rows that finish inside a chunk write no KV: slot -1).
        for backend, steps in (("reference", 1), ("triton", 4)):
            llm = LLM(str(tiny_models[kind]), dtype="float32", device="cpu", backend=backend, block_size=16,
                      num_scheduler_steps=steps)
            assert llm.engine.ops.name == backend
            outs = llm.generate(prompts, [greedy, greedy, sampled], use_tqdm=False)
            results[backend] = [(c.token_ids, c.forced_mask, c.think_tokens) for o in outs for c in o.outputs]
        assert results["triton"] == results["reference"], kind


def test_cpu_backend_samples_what_the_reference_samples_and_packs_at_load(tiny_models):
    """Sampled tokens (top-k, top-p, min-p, seeded, a forced end) equal to the reference backend's; the GEMM weights are
    packed when the engine is built and again right after load_weights, not in a request."""
    from elastic_decode import LLM, SamplingParams
    from elastic_decode.kernels import cpu

    if not (cpu.HAVE_CPU_KERNELS and cpu.HAVE_PACKED_LINEAR):
        pytest.skip("the C++ kernels or oneDNN's packed linear are missing")
    prompts = ["The quick brown fox", "In 1905, Albert Einstein published his", "1 2 3"]
    params = [SamplingParams(temperature=0.8, top_p=0.9, seed=5, max_tokens=8),
              SamplingParams(temperature=1.0, top_k=7, min_p=0.05, seed=6, max_tokens=8),
              SamplingParams(temperature=0.6, top_p=0.95, seed=7, max_tokens=8, think_budget=3, solution_budget=3,
                             end_think=(300, 301))]
    results = {}
    for backend in ("reference", "cpu"):
        llm = LLM(str(tiny_models["qwen3"]), dtype="float32", device="cpu", backend=backend, block_size=16)
        weights = [w for part in llm.engine.model.linear_weights() for w in part]
        if backend == "cpu":  # packed by the constructor
            assert all(cpu._packed[("onednn", id(w))][1] == w._version for w in weights)
        outs = llm.generate(prompts, params, use_tqdm=False)
        results[backend] = [(c.token_ids, c.logprobs) for o in outs for c in o.outputs]
    for (tokens, logprobs), (ref_tokens, ref_logprobs) in zip(results["cpu"], results["reference"]):
        assert tokens == ref_tokens
        # the packed GEMMs and the C++ attention round differently from the reference's: ulps apart
        torch.testing.assert_close(torch.tensor(logprobs), torch.tensor(ref_logprobs), atol=1e-4, rtol=1e-5)

    name, tensor = next((n, t) for n, t in llm.engine.model.state_dict().items() if n.endswith("down_proj.weight"))
    llm.engine.load_weights([(name, torch.randn_like(tensor))])
    assert all(cpu._packed[("onednn", id(w))][1] == w._version for w in weights)  # and again after the update


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_auto_on_cuda_is_triton_and_matches_the_reference(tiny_models, dtype):
    from elastic_decode import LLM, SamplingParams

    prompts = ["The quick brown fox", "In 1905, Albert Einstein published his"]
    params = SamplingParams(temperature=0.0, max_tokens=12, think_budget=4, solution_budget=4, end_think=(300,))
    outs = {}
    for backend in ("auto", "reference"):
        llm = LLM(str(tiny_models["llama"]), dtype=dtype, device="cuda", backend=backend)
        outs[llm.engine.ops.name] = [o.outputs[0].token_ids for o in llm.generate(prompts, params, use_tqdm=False)]
    assert set(outs) == {"triton", "reference"}
    if dtype == "float32":
        assert outs["triton"] == outs["reference"]
    else:  # bf16 rounding may flip a near-tie late; the first tokens must agree
        assert [t[:4] for t in outs["triton"]] == [t[:4] for t in outs["reference"]]


def test_native_bf16_is_read_from_the_cpu_flags():
    from elastic_decode.kernels import cpu

    flags = "fpu vme sse4_2 avx2 fma avx512f avx512bw avx512vl"
    assert not cpu.native_bf16(f"processor\t: 0\nflags\t\t: {flags}\n")  # AVX-512 alone: emulated bf16
    assert cpu.native_bf16(f"processor\t: 0\nflags\t\t: {flags} avx512_bf16\n")
    assert cpu.native_bf16(f"flags\t\t: {flags} amx_bf16 amx_tile\n")
    assert not cpu.native_bf16("Features\t: fp asimd bf16\n")  # ARM: not claimed
    assert not cpu.native_bf16("")


@pytest.mark.parametrize("native", [False, True])
def test_dtype_auto_on_cpu_is_bf16_only_where_native(monkeypatch, native):
    from elastic_decode.engine import startup
    from elastic_decode.kernels import cpu

    monkeypatch.setattr(cpu, "native_bf16", lambda: native)
    picked = startup.pick_dtype("auto", torch.device("cpu"), hf_config=None)
    assert picked == (torch.bfloat16 if native else torch.float32)
    assert startup.pick_dtype("float32", torch.device("cpu"), hf_config=None) == torch.float32


@pytest.mark.parametrize("native", [False, True])
def test_dtype_auto_under_int4_is_float32_where_its_decoder_runs(monkeypatch, native):
    """The int4 one-call decoder runs in float32 only: `auto` must not pick bf16 for it on a CPU with native
    bf16 (the per-op path it would then take decoded make demo at 74 tokens/s instead of 103 there)."""
    from elastic_decode.engine import startup
    from elastic_decode.kernels import cpu

    monkeypatch.setattr(cpu, "native_bf16", lambda: native)
    assert startup.pick_dtype("auto", torch.device("cpu"), None, "int4") == torch.float32
    assert startup.pick_dtype("bfloat16", torch.device("cpu"), None, "int4") == torch.bfloat16  # asked: as asked


def test_the_bf16_reading_can_be_forced_for_a_test_run(monkeypatch):
    from elastic_decode.kernels import cpu

    monkeypatch.setenv("ELASTIC_DECODE_NATIVE_BF16", "1")
    assert cpu.native_bf16() and not cpu.native_bf16("flags\t\t: avx2\n")  # an explicit cpuinfo is read as given
    monkeypatch.setenv("ELASTIC_DECODE_NATIVE_BF16", "0")
    assert not cpu.native_bf16()


def test_head_dims_the_triton_kernels_cannot_run_are_refused_at_start_up_and_at_the_launch():
    """tl.dot needs K >= 16 on NVIDIA GPUs (the interpreter runs smaller ones, so only a check catches it)."""
    import dataclasses

    from elastic_decode.worker.backend import check_kernel_shapes
    from elastic_decode.kernels import paged_decode_attention, paged_prefill_attention
    from elastic_decode.models import ModelSpec

    spec = ModelSpec("llama", 100, 64, 128, 1, 4, 2, 16, 1e-6, False, False, False, False, True, 64)
    check_kernel_shapes(spec, "triton")
    for d in (8, 80):
        with pytest.raises(ElasticDecodeError, match=f"power of two and at least 16.*this model's is {d}"):
            check_kernel_shapes(dataclasses.replace(spec, head_dim=d), "triton")
        check_kernel_shapes(dataclasses.replace(spec, head_dim=d), "reference")  # the torch ops take any
    q, cache = torch.zeros(2, 4, 8), torch.zeros(3, 16, 2, 8)
    tables, lens = torch.zeros(2, 1, dtype=torch.int32), torch.ones(2, dtype=torch.int32)
    with pytest.raises(ValueError, match="head_dim 8 < 16"):
        paged_decode_attention(q, cache, cache, tables, lens, 1.0)
    with pytest.raises(ValueError, match="head_dim 8 < 16"):
        paged_prefill_attention(q, cache, cache, tables, torch.tensor([0, 1, 2], dtype=torch.int32), lens, 1.0)


def test_quantization_is_checked_and_needs_the_cpu_backend():
    with pytest.raises(ElasticDecodeError, match="quantization must be one of int4"):
        select_ops(torch.device("cpu"), "cpu", "int8")
    with pytest.raises(ElasticDecodeError, match="runs on the cpu backend"):
        select_ops(torch.device("cpu"), "reference", "int4")


@pytest.mark.parametrize("kind", ["llama", "qwen3", pytest.param("embedded", marks=pytest.mark.slow)])
def test_int4_engine_matches_hf_on_the_same_quantized_weights(tiny_models, embedded_path, kind, monkeypatch):
    """LLM(quantization="int4") against HF greedy, token for token: for the tiny random models, HF with its
    decoder Linears on the same 4-bit GEMM and its LM head on the 8-bit one; for the embedded model, a Q4_1
    GGUF (Q8_0 embeddings), plain HF in float32: quantizing gives back the file's own weights."""
    from test_parity import PROMPTS, hf_greedy

    from elastic_decode import LLM, SamplingParams
    from elastic_decode.kernels import cpu

    if not cpu.HAVE_QUANTIZED_LINEAR:
        pytest.skip("elastic_decode._C built without q4_linear")
    path = embedded_path if kind == "embedded" else tiny_models[kind]
    llm = LLM(str(path), dtype="float32", device="cpu", quantization="int4")
    layers, head = llm.engine.model.linear_weights()
    assert all(("q4", id(w)) in cpu._packed for w in layers)  # quantized at load
    assert ("q8", id(head[0])) in cpu._packed
    prompt_ids = [llm.engine.tokenizer.encode(p) for p in PROMPTS]
    outs = llm.generate(prompt_ids, SamplingParams(temperature=0.0, max_tokens=16), use_tqdm=False)
    assert llm.last_stats.engine.endswith("cpu kernels, int4 weights")

    if kind != "embedded":
        def quantized_forward(self, x):
            linear = cpu.int8_linear if self.out_features == llm.engine.spec.vocab_size else cpu.int4_linear
            return linear(x.reshape(-1, x.shape[-1]), self.weight, self.bias).reshape(*x.shape[:-1], -1)

        monkeypatch.setattr(torch.nn.Linear, "forward", quantized_forward)
    hf_greedy.cache = {}  # a fresh HF model
    try:
        for ids, out in zip(prompt_ids, outs):
            assert out.outputs[0].token_ids == hf_greedy(path, ids, 16)
    finally:
        hf_greedy.cache = {}


@pytest.mark.parametrize("kind", ["llama", "qwen2", "qwen3"])
def test_int4_decode_steps_run_every_layer_in_one_call_with_the_same_numbers(tiny_models, kind, monkeypatch):
    """The int4 decode step's layers in one C++ call (csrc/cpu_decoder.cpp): the per-op forward's tokens and
    logprobs, bit for bit, with Qwen2's biases and Qwen3's head norms; built again after an update in place."""
    import dataclasses

    from elastic_decode import LLM, SamplingParams
    from elastic_decode.kernels import cpu

    if not cpu.HAVE_INT4_DECODER:
        pytest.skip("elastic_decode._C built without Int4Decoder")
    llm = LLM(str(tiny_models[kind]), dtype="float32", device="cpu", quantization="int4", seed=0)
    runner = llm.engine.runner
    fused_ops = runner.ops
    calls = []

    def counting(*args):
        result = cpu.int4_decode_layers(*args)
        calls.append(result is not None or args[-1].is_prefill)  # prefill: the per-op forward
        return result

    prompts = [llm.engine.tokenizer.encode(p) for p in ("Hello there", "One two three four five")]
    params = SamplingParams(temperature=0.8, top_p=0.9, max_tokens=12, ignore_eos=True, logprobs=2, seed=3)

    def run(ops):
        runner.ops = ops
        return [(o.outputs[0].token_ids, o.outputs[0].logprobs) for o in llm.generate(prompts, params, use_tqdm=False)]

    for _ in range(2):
        fused = run(dataclasses.replace(fused_ops, decode_layers=counting))
        assert calls and all(calls)  # every decode step took the one-call path
        assert fused == run(dataclasses.replace(fused_ops, decode_layers=None))
        calls.clear()
        with torch.no_grad():  # an update in place: the layers are quantized and built again
            llm.engine.model.model.layers[0].mlp.down_proj.weight.mul_(-1.5)
