"""Tensor parallelism on CPU (gloo, 2 processes): TP=2 gives TP=1's tokens, budgets, forced masks and
logprobs on tiny Llama / Qwen2 / Qwen3 checkpoints and on one with a single kv head (replicated),
biases on the row-parallel layers and a vocabulary that 2 does not divide; weight updates, sleep and
the worker processes' lifecycle."""
from __future__ import annotations

import gc
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from elastic_decode import LLM, ElasticDecodeError, SamplingParams
from engines import tiny_llm

pytestmark = pytest.mark.slow

PROMPTS = [[1, 5, 9, 300, 7], [4, 4, 8, 15, 16, 23, 42] * 3, [77]]
PARAMS = [
    SamplingParams(temperature=0.0, max_tokens=14, ignore_eos=True),
    SamplingParams(n=2, seed=3, temperature=1.0, top_p=0.9, think_budget=5, solution_budget=4),
]


def _llm(path, tp: int = 1, **kw) -> LLM:
    return tiny_llm(path, max_model_len=256, tensor_parallel_size=tp, **kw)


@pytest.fixture(scope="module")
def odd_model(tmp_path_factory, embedded_path):
    """One kv head (replicated on both ranks), biases on every projection, an odd vocabulary."""
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig

    tokenizer = AutoTokenizer.from_pretrained(embedded_path)
    config = LlamaConfig(vocab_size=len(tokenizer) + 1, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=1, head_dim=16, max_position_embeddings=512,
                         rms_norm_eps=1e-6, initializer_range=0.2, attention_bias=True, mlp_bias=True,
                         tie_word_embeddings=False, eos_token_id=2, bos_token_id=1, pad_token_id=2)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.normal_(0, 0.2)  # HF initialises biases to zero: make them count
    folder = tmp_path_factory.mktemp("odd")
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def _outputs(llm: LLM):
    return [llm.generate(PROMPTS, p, use_tqdm=False) for p in PARAMS]


def _assert_same(got, want):
    for run_got, run_want in zip(got, want):
        for out_got, out_want in zip(run_got, run_want):
            for a, b in zip(out_got.outputs, out_want.outputs):
                assert a.token_ids == b.token_ids
                assert a.forced_mask == b.forced_mask
                assert (a.think_tokens, a.solution_tokens, a.forced_end, a.finish_reason) == \
                       (b.think_tokens, b.solution_tokens, b.forced_end, b.finish_reason)
                torch.testing.assert_close(torch.tensor(a.logprobs), torch.tensor(b.logprobs), rtol=0, atol=1e-5)


@pytest.mark.parametrize("kind", ["llama", "qwen2", "qwen3", "odd"])
def test_tp2_gives_tp1_outputs(kind, tiny_models, odd_model):
    path = odd_model if kind == "odd" else tiny_models[kind]
    want = _outputs(_llm(path))
    llm = _llm(path, tp=2, num_scheduler_steps=4 if kind == "qwen2" else 1)
    try:
        _assert_same(_outputs(llm), want)
    finally:
        llm.close()


def test_weight_updates_and_sleep_under_tp(odd_model, tmp_path):
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    new = AutoModelForCausalLM.from_pretrained(odd_model, dtype=torch.float32)
    with torch.no_grad():
        for p in new.parameters():
            p.add_(0.1 * torch.randn_like(p))
    new.save_pretrained(tmp_path / "new")
    weights = load_file(str(tmp_path / "new" / "model.safetensors"))
    one, two = _llm(odd_model), _llm(odd_model, tp=2)
    try:
        before = _outputs(two)
        with pytest.raises(ElasticDecodeError, match="shape"):
            two.load_weights([("model.norm.weight", torch.ones(3))])
        _assert_same(_outputs(two), before)  # a refused update changed nothing
        assert one.load_weights(weights.items()) == two.load_weights(weights.items()) == len(weights)
        two.sleep()
        two.wake_up()
        _assert_same(_outputs(two), _outputs(one))
    finally:
        two.close()


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    with open(f"/proc/{pid}/stat") as f:  # a zombie is gone for our purposes
        return f.read().split()[2] != "Z"


def _gone(pids, wait: float = 15.0) -> bool:
    deadline = time.monotonic() + wait
    while any(_alive(p) for p in pids):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.1)
    return True


def test_workers_end_with_the_llm(tiny_llama):
    llm = _llm(tiny_llama, tp=2)
    pids = [p.pid for p in llm.engine.workers.processes]
    assert all(_alive(p) for p in pids)
    del llm
    gc.collect()
    assert _gone(pids)


def test_a_dead_worker_is_one_clear_error(tiny_llama):
    llm = _llm(tiny_llama, tp=2)
    worker = llm.engine.workers.processes[0]
    worker.send_signal(signal.SIGKILL)
    worker.wait(10)
    start = time.monotonic()
    with pytest.raises(ElasticDecodeError, match="worker 1 exited"):
        llm.generate([[1, 2, 3]], SamplingParams(max_tokens=4), use_tqdm=False)
    assert time.monotonic() - start < 10
    llm.close()


@pytest.mark.parametrize("end", ["killed", "exception"])
def test_workers_die_with_their_parent(tiny_llama, end):
    script = (f"from elastic_decode import LLM\n"
              f"llm = LLM({str(tiny_llama)!r}, device='cpu', dtype='float32', kv_cache_memory_gb=0.05, "
              f"max_model_len=256, tensor_parallel_size=2)\n"
              f"print(*[p.pid for p in llm.engine.workers.processes], flush=True)\n"
              f"import sys; sys.stdin.readline()\n"
              f"raise RuntimeError('the user script fails')\n")
    parent = subprocess.Popen([sys.executable, "-c", script], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True)
    pids = [int(x) for x in parent.stdout.readline().split()]
    assert pids and all(_alive(p) for p in pids)
    if end == "killed":
        parent.kill()
    else:
        parent.stdin.write("go\n")
        parent.stdin.flush()
    parent.wait(30)
    assert _gone(pids)


@pytest.mark.parametrize("size,words", [(3, "divide the model's 4 attention heads"), (0, "positive integer"),
                                        (8, "divide the model's 4 attention heads")])
def test_bad_sizes_fail_before_any_process_starts(tiny_llama, size, words):
    start = time.monotonic()
    with pytest.raises(ElasticDecodeError, match=words):
        _llm(tiny_llama, tp=size)
    assert time.monotonic() - start < 10


def test_generate_cli_takes_tensor_parallel_size(tiny_llama):
    cmd = [sys.executable, "-m", "elastic_decode.generate", "--model", str(tiny_llama), "--prompt", "hello",
           "--tensor-parallel-size", "2", "--device", "cpu", "--think-budget", "4", "--solution-budget", "4",
           "--seed", "1", "--max-model-len", "256", "--dtype", "float32"]  # exact: bf16 all-reduces round differently
    two = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    one = subprocess.run(cmd[:cmd.index("--tensor-parallel-size")] + cmd[cmd.index("--device"):], capture_output=True,
                         text=True, timeout=300)
    assert two.returncode == 0, two.stderr
    strip = lambda out: [line for line in out.splitlines() if " in " not in line]  # noqa: E731 - not the timing line
    assert strip(two.stdout) == strip(one.stdout)


def test_tp2_on_the_triton_kernels(tiny_models):
    """The Triton kernels (interpreter on CPU) take each rank's local heads: qwen2 has 4 q heads and
    2 kv heads, so each rank runs GQA 2:1 on its half."""
    path = tiny_models["qwen2"]
    params = SamplingParams(temperature=0.0, max_tokens=5, ignore_eos=True)
    want = _llm(path).generate(PROMPTS[:2], params, use_tqdm=False)
    llm = _llm(path, tp=2, backend="triton")
    try:
        got = llm.generate(PROMPTS[:2], params, use_tqdm=False)
        assert [o.outputs[0].token_ids for o in got] == [o.outputs[0].token_ids for o in want]
    finally:
        llm.close()
