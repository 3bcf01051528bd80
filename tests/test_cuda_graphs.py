"""CUDA graphs of the decode step.

The static-buffer path that a graph captures (the resident device batch reserved for the largest
bucket: fixed-width sampler rows, a block table as wide as max_model_len, batches padded to a size
bucket with DONE rows) runs eagerly on CPU here
(`capture=False`) and must give the plain decode loop's completions; on a GPU the captured
graphs must give the same completions as eager decoding (`cuda` marker).
"""
from __future__ import annotations

import pytest
import torch

from elastic_decode import LLM
from elastic_decode.worker.cuda_graphs import DecodeGraphs, batch_buckets
from elastic_decode.errors import ElasticDecodeError
from test_multistep import PROMPTS, run, same, workload


def test_buckets_cover_every_batch_size():
    assert batch_buckets(256)[:6] == [1, 2, 4, 8, 16, 32] and batch_buckets(256)[-1] == 256
    assert batch_buckets(12) == [1, 2, 4, 8, 12]
    assert batch_buckets(1) == [1]
    for max_num_seqs in (1, 3, 16, 40, 256):
        buckets = batch_buckets(max_num_seqs)
        for n in range(1, max_num_seqs + 1):
            b = next(size for size in buckets if size >= n)
            assert b - n < max(n, 16)  # padding at most doubles a batch, or 15 rows above 16


class StepGraph:
    """Stands in for a captured graph on CPU: a replay runs the step it was made from."""

    def __init__(self, step):
        self.replay = step


class EagerCaptureGraphs(DecodeGraphs):
    """DecodeGraphs with only its CUDA lines (`_capture`) replaced: the warm-up steps run, and so
    does the captured step (a real capture records it without running it: this is stricter)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.captures = 0
        self.grad_modes: set[tuple[bool, bool]] = set()  # (inference mode, grad enabled) of each capture

    def _capture(self, step):
        self.grad_modes.add((torch.is_inference_mode_enabled(), torch.is_grad_enabled()))
        for _ in range(3):
            step()
        self.captures += 1
        return StepGraph(step)


def static_path(llm: LLM, graphs_class=DecodeGraphs, capture: bool = False) -> list[int]:
    """Route the engine's decode chunks through the graphs' static buffers (eagerly by default).
    Returns the list that will hold each chunk's batch size."""
    engine, runner = llm.engine, llm.engine.runner
    runner.graphs = graphs_class(engine.model, engine.ops, engine.config.block_size, engine.config.max_num_seqs,
                                 max_blocks_per_seq=-(-engine.max_model_len // engine.config.block_size),
                                 device=engine.device, capture=capture)
    sizes = []
    graphs_run = runner.graphs.run

    def counted(kv_caches, batch, n, num_steps):
        sizes.append(n)
        return graphs_run(kv_caches, batch, n, num_steps)

    runner.graphs.run = counted
    return sizes


def test_capture_warms_up_on_padding_reuses_graphs_and_recaptures_after_sleep(tiny_models):
    expected, _ = run(tiny_models["qwen3"], 4)
    llm = LLM(str(tiny_models["qwen3"]), dtype="float32", device="cpu", block_size=4, seed=0,
              num_scheduler_steps=4)
    sizes = static_path(llm, EagerCaptureGraphs, capture=True)
    graphs = llm.engine.runner.graphs
    same(llm.generate(PROMPTS, workload(), use_tqdm=False), expected)  # warm-ups wrote nothing that mattered
    buckets = {next(b for b in graphs.buckets if b >= n) for n in sizes}
    assert graphs.captures == len(graphs._graphs) == len(buckets) < len(sizes)  # one per bucket, replayed after
    llm.engine.sleep()  # the cache the graphs point at is freed: they go too
    assert not graphs._graphs
    llm.engine.wake_up()
    same(llm.generate(PROMPTS, workload(), use_tqdm=False), expected)
    assert graphs.captures == 2 * len(buckets)  # captured again against the new cache


@pytest.mark.parametrize("k", [1, 4])
def test_static_buffers_give_the_plain_loop_completions(tiny_models, k):
    expected, _ = run(tiny_models["qwen3"], k)
    llm = LLM(str(tiny_models["qwen3"]), dtype="float32", device="cpu", block_size=4, seed=0,
              num_scheduler_steps=k)
    sizes = static_path(llm)
    outputs = llm.generate(PROMPTS, workload(), use_tqdm=False)
    same(outputs, expected)
    # Batches from 9 rows down to 1, padded to buckets 16, 8, 4, 2 or exact.
    assert max(sizes) > 8 and min(sizes) < 4
    assert {next(b for b in llm.engine.runner.graphs.buckets if b >= n) - n for n in sizes} != {0}
    bm = llm.engine.block_manager
    assert bm.num_free == bm.allocator.num_blocks


def test_static_buffers_under_preemption(tiny_models):
    expected, _ = run(tiny_models["qwen3"], 1)
    llm = LLM(str(tiny_models["qwen3"]), dtype="float32", device="cpu", block_size=4, seed=0,
              num_scheduler_steps=3, num_kv_blocks=14, max_num_seqs=12)
    static_path(llm)
    outputs = llm.generate(PROMPTS, workload(), use_tqdm=False)
    assert llm.engine.scheduler.num_preemptions > 0
    same(outputs, expected)


def test_a_longer_stop_list_widens_the_batch_and_the_graphs_follow(tiny_models):
    """A stop list wider than STOP_WIDTH: the device batch reallocates wider, the graphs captured on
    the old rows are dropped and captured again on the new ones; the plain loop's completions."""
    from elastic_decode import SamplingParams

    params = SamplingParams(temperature=0.0, think_budget=2, solution_budget=3, stop_token_ids=tuple(range(20, 30)))
    expected = LLM(str(tiny_models["qwen3"]), dtype="float32", device="cpu", block_size=4).generate(
        PROMPTS[:2], params, use_tqdm=False)
    llm = LLM(str(tiny_models["qwen3"]), dtype="float32", device="cpu", block_size=4)
    sizes = static_path(llm, EagerCaptureGraphs, capture=True)
    graphs, batch = llm.engine.runner.graphs, llm.engine.runner.batch
    llm.generate(PROMPTS[:1], SamplingParams(temperature=0.0, max_tokens=3), use_tqdm=False)  # graphs at STOP_WIDTH
    captures, generation = graphs.captures, batch.generation
    outputs = llm.generate(PROMPTS[:2], params, use_tqdm=False)
    assert sizes and batch.stop_width == 11 and batch.generation > generation  # EOS + 10 stop ids
    assert graphs.captures > captures  # captured again on the wider rows
    same(outputs, expected)


def test_top_logprobs_run_eagerly_on_the_resident_rows(tiny_models):
    from elastic_decode import SamplingParams

    params = SamplingParams(temperature=0.0, max_tokens=4, logprobs=3)
    expected = LLM(str(tiny_models["qwen3"]), dtype="float32", device="cpu", block_size=4).generate(
        PROMPTS[:2], params, use_tqdm=False)
    llm = LLM(str(tiny_models["qwen3"]), dtype="float32", device="cpu", block_size=4)
    sizes = static_path(llm)
    outputs = llm.generate(PROMPTS[:2], params, use_tqdm=False)
    assert sizes == []
    same(outputs, expected)
    assert [c.top_logprobs for o in outputs for c in o.outputs] == [c.top_logprobs for o in expected for c in o.outputs]


def test_every_accepted_marker_fits_the_graphs(tiny_models):
    """The graphs' marker window holds the longest marker the engine accepts (64 tokens); a
    longer one is refused at the request, in one clear error."""
    from elastic_decode import SamplingParams
    from elastic_decode.errors import InvalidRequestError

    marker = tuple(300 + i for i in range(64))
    params = SamplingParams(temperature=0.0, think_budget=2, solution_budget=3, end_think=marker)
    expected = LLM(str(tiny_models["qwen3"]), dtype="float32", device="cpu", block_size=4).generate(
        PROMPTS[:2], params, use_tqdm=False)
    llm = LLM(str(tiny_models["qwen3"]), dtype="float32", device="cpu", block_size=4)
    sizes = static_path(llm)
    outputs = llm.generate(PROMPTS[:2], params, use_tqdm=False)
    assert sizes  # decode chunks took the static path
    same(outputs, expected)
    assert outputs[0].outputs[0].token_ids[2:66] == list(marker)  # the 64-token marker, forced whole
    with pytest.raises(InvalidRequestError, match="end_think is 65 tokens long; at most 64 are supported"):
        llm.generate(PROMPTS[:1], SamplingParams(think_budget=2, end_think=marker + (7,)), use_tqdm=False)


def test_triton_kernels_on_the_static_buffers(tiny_models):
    """The Triton kernels (interpreter on CPU) on views of the static buffers: fixed-width marker
    and stop columns, a block table as wide as max_model_len, padded rows; the reference's tokens."""
    from elastic_decode import SamplingParams

    prompts = ["The quick brown fox", "In 1905, Albert Einstein published his", "1 2 3"]
    greedy = SamplingParams(temperature=0.0, max_tokens=6, think_budget=3, solution_budget=2, end_think=(300, 301))
    sampled = SamplingParams(temperature=0.9, top_k=20, seed=11, max_tokens=3)
    results = {}
    for backend in ("reference", "triton"):
        llm = LLM(str(tiny_models["qwen3"]), dtype="float32", device="cpu", backend=backend, block_size=16,
                  num_scheduler_steps=3, max_model_len=256)
        sizes = static_path(llm) if backend == "triton" else [0]
        outs = llm.generate(prompts, [greedy, greedy, sampled], use_tqdm=False)
        assert sizes  # decode chunks took the static path
        results[backend] = [(c.token_ids, c.forced_mask, c.think_tokens) for o in outs for c in o.outputs]
    assert results["triton"] == results["reference"]


def test_cuda_graphs_need_a_cuda_device(tiny_llama):
    with pytest.raises(ElasticDecodeError, match="cuda_graphs needs a CUDA device"):
        LLM(str(tiny_llama), device="cpu", cuda_graphs=True)
    with pytest.raises(ElasticDecodeError, match="cuda_graphs must be True, False or None"):
        LLM(str(tiny_llama), device="cpu", cuda_graphs="yes")
    with pytest.raises(ElasticDecodeError, match="contradict"):
        LLM(str(tiny_llama), device="cpu", cuda_graphs=True, enforce_eager=True)
    llm = LLM(str(tiny_llama), device="cpu", kv_cache_memory_gb=0.05)  # the default on CPU: eager, no error
    assert llm.engine.runner.graphs is None and llm.engine.cuda_graphs is False


@pytest.mark.parametrize("asked,eager,device,backend,tp,expected", [
    (None, False, "cuda", "triton", 1, True),  # the GPU default
    (None, True, "cuda", "triton", 1, False),  # --enforce-eager
    (None, False, "cpu", "reference", 1, False),
    (None, False, "cuda", "reference", 1, False),
    (None, False, "cuda", "triton", 2, False),  # not with tensor parallelism (yet)
    (True, False, "cpu", "reference", 1, True),  # asked: the engine then says why it cannot
    (False, False, "cuda", "triton", 1, False),
])
def test_cuda_graphs_are_on_by_default_where_they_can_run(asked, eager, device, backend, tp, expected):
    from elastic_decode.config import EngineConfig
    from elastic_decode.worker.cuda_graphs import wants_cuda_graphs

    config = EngineConfig(cuda_graphs=asked, enforce_eager=eager, tensor_parallel_size=tp)
    assert wants_cuda_graphs(config, device, backend) is expected


@pytest.mark.cuda
@pytest.mark.parametrize("k", [1, 8])
def test_graphs_give_the_eager_completions_on_the_gpu(tiny_models, k):
    eager, plain = run(tiny_models["qwen3"], k, device="cuda", enforce_eager=True)  # graphs are the CUDA default
    assert plain.engine.runner.graphs is None
    graphed, llm = run(tiny_models["qwen3"], k, device="cuda", cuda_graphs=True)
    assert llm.engine.runner.graphs._graphs  # graphs were captured and replayed
    same(graphed, eager)
    llm.engine.sleep()  # the graphs point at the freed cache: dropped, captured again after wake-up
    llm.engine.wake_up()
    again = llm.generate(PROMPTS, workload(), use_tqdm=False)
    same(again, eager)
    torch.cuda.synchronize()


def test_the_cli_refuses_both_graph_switches():
    from elastic_decode.generate import build_parser

    with pytest.raises(SystemExit) as e:
        build_parser().parse_args(["--prompt", "x", "--cuda-graphs", "--enforce-eager"])
    assert e.value.code == 2
    assert build_parser().parse_args(["--prompt", "x"]).cuda_graphs is None  # auto
