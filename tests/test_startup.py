"""Engine start-up order on a GPU, run on CPU with stand-ins for what only CUDA has.

A fake memory probe scripts what torch.cuda would report, and the suite's capture stand-in
(test_cuda_graphs.EagerCaptureGraphs) replaces the graph capture. The engine must profile the
largest prefill and the largest graph before it sizes the KV cache, give the cache what is
left, capture every bucket largest first, and decode eagerly (one warning) if a capture fails.
"""
from __future__ import annotations

import dataclasses
import logging

import pytest

from elastic_decode import LLM
from elastic_decode.engine import LLMEngine
from elastic_decode.engine.startup import GPU_MEMORY_UTILIZATION, MemoryProbe
from test_cuda_graphs import EagerCaptureGraphs
from test_multistep import PROMPTS, run, same, workload

MiB = 2**20


class RecordingGraphs(EagerCaptureGraphs):
    """Records which bucket each capture was for, and the size (blocks) of the cache it was against."""

    fail_on: str | None = None  # "measure" (the temporary cache) or "capture" (the engine's cache)

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.order: list[tuple[int, int]] = []  # (bucket, the cache's number of blocks)

    def _graph(self, kv_caches, batch, b):
        if b not in self._graphs:
            self.order.append((b, kv_caches[0][0].shape[0]))
        return super()._graph(kv_caches, batch, b)

    def _capture(self, step):
        measuring = len(self.order) == 1
        if self.fail_on == ("measure" if measuring else "capture"):
            raise RuntimeError("CUDA error: out of memory\nmore detail")
        return super()._capture(step)


class FakeMemory:
    """A device's memory as its counters report it: 7 MiB free after the weights, 8 MiB allocated and
    reserved at rest. The largest step peaks 3 MiB above that in live tensors and makes the allocator
    reserve 4 MiB (blocks it keeps after the step). Each captured graph holds 1 MiB while it lives: its
    pool's blocks are free again after the capture (so `allocated` does not see them) but stay reserved
    and out of the driver's free memory. The probe takes the counters its fields name."""

    def __init__(self, graphs_alive):
        self.graphs_alive = graphs_alive
        self.events: list[str] = []

    def counters(self) -> dict:
        graphs = lambda: 1 * MiB * self.graphs_alive()  # noqa: E731
        return {"free": lambda: 7 * MiB - graphs(), "allocated": lambda: 8 * MiB, "peak": lambda: 11 * MiB,
                "reserved": lambda: 8 * MiB + graphs(), "peak_reserved": lambda: 12 * MiB,
                "reset_peak": None, "release": None}

    def probe(self) -> MemoryProbe:
        def record(name, value=None):
            def call():
                self.events.append(name)
                return value() if value else None
            return call

        counters = self.counters()
        return MemoryProbe(**{f.name: record(f.name, counters[f.name]) for f in dataclasses.fields(MemoryProbe)})


def start(monkeypatch, model, fail_on=None, **engine):
    built = {}

    def graphs(self):
        RecordingGraphs.fail_on = fail_on
        built["graphs"] = RecordingGraphs(self.model, self.ops, self.config.block_size, self.config.max_num_seqs,
                                          max_blocks_per_seq=-(-self.max_model_len // self.config.block_size),
                                          device=self.device, capture=True)
        built["memory"] = FakeMemory(lambda: len(built["graphs"]._graphs))
        return built["graphs"]

    monkeypatch.setattr(LLMEngine, "_graphs", graphs)
    monkeypatch.setattr(LLMEngine, "_memory_probe", lambda self: built["memory"].probe())
    llm = LLM(str(model), dtype="float32", device="cpu", block_size=4, seed=0, max_num_seqs=12, **engine)
    return llm, built["graphs"], built["memory"]


def test_the_cache_gets_what_the_largest_step_and_the_graphs_leave(monkeypatch, tiny_models):
    llm, graphs, memory = start(monkeypatch, tiny_models["qwen3"], max_num_batched_tokens=64)
    engine = llm.engine
    plan = engine.memory_plan
    # What the step made the allocator reserve, and what the graphs hold by the device's count (the
    # allocated counters see 3 MiB and nothing).
    assert (plan.free, plan.step_peak, plan.graph_bytes) == (7 * MiB, 4 * MiB, 1 * MiB)
    spec = engine.spec
    per_block = 2 * spec.num_layers * 4 * spec.num_kv_heads * spec.head_dim * 4
    expected = (int(GPU_MEMORY_UTILIZATION * 7 * MiB) - 4 * MiB - 1 * MiB) // per_block
    assert 0 < expected < engine.config.max_num_seqs * engine.max_model_len // 4  # not capped by the batch
    assert engine.block_manager.allocator.num_blocks == expected
    # Profile (reset_peak .. peak) and graph measurement came before the free-memory reading
    # that sized the cache; the graphs were then captured for real against the cache.
    events = memory.events
    assert events.index("reset_peak") < events.index("peak_reserved") < len(events) - 1 - events[::-1].index("free")
    buckets = sorted(graphs.buckets, reverse=True)
    measured, *real = graphs.order
    assert measured[0] == buckets[0]  # the largest bucket, on the temporary cache
    cache = engine.block_manager.allocator.num_blocks
    assert measured[1] != cache and [b for b, c in real] == buckets and {c for _, c in real} == {cache}
    assert graphs.captures == 1 + len(buckets)
    # Captured with autograd off: with it on, every F.linear keeps its input alive in the graphs' pool.
    assert graphs.grad_modes == {(True, False)}


def test_start_up_graphs_give_the_plain_loop_completions(monkeypatch, tiny_models):
    expected, _ = run(tiny_models["qwen3"], 4)
    llm, graphs, _ = start(monkeypatch, tiny_models["qwen3"], num_scheduler_steps=4)
    captured = graphs.captures
    same(llm.generate(PROMPTS, workload(), use_tqdm=False), expected)
    assert graphs.captures == captured  # every bucket was ready: nothing captured mid-run


@pytest.mark.parametrize("fail_on", ["measure", "capture"])
def test_a_failed_capture_leaves_the_engine_eager_with_one_warning(monkeypatch, tiny_models, caplog, fail_on):
    expected, _ = run(tiny_models["qwen3"], 1)
    with caplog.at_level(logging.WARNING, logger="elastic_decode"):
        llm, graphs, _ = start(monkeypatch, tiny_models["qwen3"], fail_on=fail_on)
    warnings = [r.getMessage() for r in caplog.records if r.name == "elastic_decode"]
    assert len(warnings) == 1 and "CUDA graph capture failed at start-up (RuntimeError: CUDA error: out of memory)" \
        in warnings[0] and "decoding eagerly" in warnings[0]
    assert llm.engine.runner.graphs is None
    same(llm.generate(PROMPTS, workload(), use_tqdm=False), expected)


def test_too_little_memory_for_a_cache_is_one_clear_error(monkeypatch, tiny_models):
    from elastic_decode.errors import ElasticDecodeError

    monkeypatch.setattr("elastic_decode.engine.startup.GPU_MEMORY_UTILIZATION", 0.1)
    with pytest.raises(ElasticDecodeError, match="not enough device memory for a KV cache: 0.01 GiB free after the "
                                                 "weights, the largest step needs 0.00 GiB and the CUDA graphs 0.00 GiB"):
        start(monkeypatch, tiny_models["qwen3"])
