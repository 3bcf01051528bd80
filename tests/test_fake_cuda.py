"""The engine's CUDA path on a fake `cuda:1`, in CI without a GPU (tests/fake_cuda.py).

Every Triton launch must go to the device its tensors are on (Triton launches on the *current* device,
which is cuda:0 on any thread that did not set it); no host sync and no host-to-device copy may happen
inside a decode step (a CUDA graph replays it); model build, KV allocation, the start-up compile, the
memory profile, graph capture, prefill and multi-step decode chunks run end to end.
"""
from __future__ import annotations

import threading

import pytest
import torch

from elastic_decode import LLM, SamplingParams
from fake_cuda import NoHostCopies, ScriptedStep, _Graph, fake_cuda, scripted_results

PROMPTS = ["Hello there, how are", "The quick brown fox", "1 2 3"]


def guard_decode_steps(monkeypatch) -> list[int]:
    """Run every decode step (eager, or the one a graph captures) under a mode that refuses host-to-device
    copies; returns the list of steps run."""
    from elastic_decode.worker import cuda_graphs, decode_step, model_runner

    steps, mode = [], NoHostCopies()

    def guarded(*args, **kwargs):
        steps.append(1)
        with mode:
            mode.armed = True
            try:
                return decode_step.decode_step(*args, **kwargs)
            finally:
                mode.armed = False

    monkeypatch.setattr(model_runner, "decode_step", guarded)
    monkeypatch.setattr(cuda_graphs, "decode_step", guarded)
    return steps


def fake_llm(model, **engine) -> LLM:
    return LLM(str(model), dtype="bfloat16", device="cuda:1", seed=0, max_model_len=128, **engine)


@pytest.mark.parametrize("k", [1, 4])
def test_the_engine_runs_its_cuda_path_on_cuda_1(monkeypatch, tiny_models, k):
    script = ScriptedStep()
    with fake_cuda(monkeypatch) as launches:
        scripted_results(monkeypatch, script)
        steps = guard_decode_steps(monkeypatch)
        llm = fake_llm(tiny_models["qwen3"], enforce_eager=True, num_scheduler_steps=k, kv_cache_memory_gb=0.01)
        assert llm.engine.device == torch.device("cuda", 1) and llm.engine.ops.name == "triton"
        assert all(p.device == torch.device("cuda", 1) for p in llm.engine.model.parameters())
        outputs = llm.generate(PROMPTS, [SamplingParams(max_tokens=n, seed=1) for n in (3, 9, 6)], use_tqdm=False)
    assert [len(o.outputs[0].token_ids) for o in outputs] == [3, 9, 6]
    assert all(t == script.token for o in outputs for t in o.outputs[0].token_ids)
    assert launches.devices == {1}
    # The start-up compile ran every kernel; prefill and decode launched theirs on cuda:1.
    assert {"_rope_write_kv_kernel", "_prefill_kernel", "_decode_kernel", "_scan_kernel", "_finish_kernel",
            "_rms_norm_kernel", "_silu_mul_kernel"} <= set(launches.counts)
    decode_chunks = [b for b in script.batches if not b[0]]
    assert decode_chunks and max(s for _, _, s in decode_chunks) == min(k, 8)  # multi-step chunks, rows leaving
    assert len(steps) == sum(s for _, _, s in decode_chunks)


def test_confidence_and_deer_probes_launch_on_the_engines_device(monkeypatch, tiny_models):
    """A batch that asks for token confidence runs the sampler's confidence variant, eagerly, on cuda:1; DEER probes
    forked from its traces (the scripted token is a transition) share their blocks and launch there too."""
    script = ScriptedStep()
    with fake_cuda(monkeypatch) as launches:
        scripted_results(monkeypatch, script)
        llm = fake_llm(tiny_models["qwen3"], num_scheduler_steps=2, kv_cache_memory_gb=0.01)
        graphs_before = len(_Graph.captured_on)
        script.token = llm.engine.tokenizer.hf(" Wait", add_special_tokens=False)["input_ids"][0]
        transition = llm.engine.tokenizer.decode([script.token])
        params = SamplingParams(max_tokens=12, seed=1, n=2, think_budget=10, early_stop="deer",
                                deer_transitions=(transition,), deer_probe_tokens=3)
        out = llm.generate(PROMPTS[:1], params, use_tqdm=False)[0]
        assert llm.engine.stats()["kv_blocks_used"] == 0
    assert launches.devices == {1}
    assert launches.counts["_scan_kernel + confidence"] >= 1 and launches.counts["_finish_kernel + confidence"] >= 1
    assert sum(c.probes for c in out.outputs) >= 1
    assert len(_Graph.captured_on) == graphs_before  # a confidence batch decodes eagerly: no capture on demand


def test_the_engine_loop_thread_launches_on_the_engines_device(monkeypatch, tiny_models):
    """The server's engine loop steps the engine on a thread of its own, whose current device is cuda:0."""
    from elastic_decode.engine.loop import EngineLoop

    with fake_cuda(monkeypatch) as launches:
        scripted_results(monkeypatch, ScriptedStep())
        run = EngineLoop._run

        def run_faked(loop):  # the loop's thread enters the fake mode too (modes are per thread)
            with launches.mode:
                run(loop)

        monkeypatch.setattr(EngineLoop, "_run", run_faked)
        llm = fake_llm(tiny_models["llama"], enforce_eager=True, kv_cache_memory_gb=0.01)
        start_up = sum(launches.counts.values())
        done, updates = threading.Event(), []

        def heard(update):
            updates.append(update)
            if update.finished:
                done.set()

        with EngineLoop(llm.engine) as loop:
            loop.submit(llm.encode("Hello there"), SamplingParams(max_tokens=5), heard)
            assert done.wait(60)
    assert updates[-1].error is None and sum(len(c.token_ids) for u in updates for c in u.completions) == 5
    assert sum(launches.counts.values()) > start_up and launches.devices == {1}


def test_start_up_profiles_and_captures_graphs_under_the_engines_device(monkeypatch, tiny_models):
    """The CUDA-graph default: the memory profile (largest prefill, largest graph), the capture of every
    bucket on the engine's device, then decoding through the graphs' static rows."""
    script = ScriptedStep()
    with fake_cuda(monkeypatch) as launches:
        scripted_results(monkeypatch, script)
        steps = guard_decode_steps(monkeypatch)
        llm = fake_llm(tiny_models["qwen2"], max_num_seqs=4, num_scheduler_steps=2)
        graphs = llm.engine.runner.graphs
        assert graphs is not None and llm.engine.memory_plan is not None
        assert sorted(graphs._graphs) == graphs.buckets == [1, 2, 4]
        assert _Graph.captured_on and set(_Graph.captured_on) == {1}
        captures = len(steps)
        outputs = llm.generate(PROMPTS, SamplingParams(max_tokens=4), use_tqdm=False)
    assert [len(o.outputs[0].token_ids) for o in outputs] == [4, 4, 4]
    assert launches.devices == {1} and len(steps) == captures  # decoding replayed graphs: no step ran eagerly


def test_a_host_sync_inside_the_decode_step_is_caught(monkeypatch, tiny_models):
    """The fake run fails on a `.item()` (or .tolist(), bool(...)) inside the step: a GPU would stall there,
    and a graph capture would fail."""
    from torch._subclasses.fake_tensor import DataDependentOutputException

    from elastic_decode.worker import decode_step

    with fake_cuda(monkeypatch):
        scripted_results(monkeypatch, ScriptedStep())
        llm = fake_llm(tiny_models["llama"], enforce_eager=True, kv_cache_memory_gb=0.01)
        top = decode_step.top_logprobs
        monkeypatch.setattr(decode_step, "top_logprobs", lambda logits, k: (logits.max().item(), top(logits, k))[1])
        with pytest.raises(DataDependentOutputException):
            llm.generate(PROMPTS[:1], SamplingParams(max_tokens=3, logprobs=2), use_tqdm=False)


def test_a_launch_off_its_device_is_caught(monkeypatch, tiny_models):
    """The check itself: a launch made with cuda:0 current and cuda:1 tensors fails (what every launch did
    before the launchers took their tensors' device)."""
    from fake_cuda import WrongDevice

    from elastic_decode.kernels import rms_norm

    with fake_cuda(monkeypatch):
        x = torch.empty(2, 64, device="cuda:1")
        rms_norm(x, torch.empty(64, device="cuda:1"), 1e-6)  # the launcher's guard: fine
        with pytest.raises(WrongDevice, match="launched on cuda:0"):
            rms_norm.__wrapped__(x, torch.empty(64, device="cuda:1"), 1e-6)  # the bare launcher
