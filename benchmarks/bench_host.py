"""Host overhead of the decode step (issue "The decode step without host overhead"): kernel launches per
layer per decode step, and host time per decode chunk on a model so small that compute is negligible.

Launches are counted in one eager decode step: every aten op that does work (views, metadata ops and
allocations excluded) plus every Triton kernel launch (the Triton backend runs in the interpreter on CPU). Host time
per chunk is the runner's own work around the model: finding which resident rows changed (`plan`),
applying those changes to the device rows (`DeviceBatch.apply`), and reading the results back
(`_result`), timed separately from the whole `run`, at 64 and 256 sequences, in steady decoding (the
chunk after the prefill, where every row joins, left out). Prints markdown tables.

    TRITON_INTERPRET=1 .venv/bin/python benchmarks/bench_host.py
"""
from __future__ import annotations

import os
import platform
import statistics
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TRITON_INTERPRET", "1")

import torch  # noqa: E402
from torch.utils._python_dispatch import TorchDispatchMode  # noqa: E402

from elastic_decode import LLM, SamplingParams  # noqa: E402
from elastic_decode.models.loader import resolve_checkpoint  # noqa: E402

# Metadata ops and allocations: no kernel runs for them on a GPU.
SKIP = {"detach", "lift_fresh", "sym_size", "sym_stride", "sym_numel", "is_same_size", "size", "stride",
        "empty", "empty_like", "new_empty", "empty_strided", "new_empty_strided"}


class CountOps(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.ops: dict[str, int] = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        if not func.is_view and name not in SKIP and not TRITON["inside"]:  # not the interpreter's own ops
            self.ops[name] = self.ops.get(name, 0) + 1
        return func(*args, **(kwargs or {}))


TRITON = {"launches": 0, "inside": 0}


def count_triton_launches():
    """Wrap the interpreter's launcher: count Triton kernel launches (and mark the torch ops the
    interpreter runs to emulate one, which are not launches)."""
    from triton.runtime import interpreter

    real = interpreter.GridExecutor.__call__

    def counted(self, *args, **kwargs):
        TRITON["launches"] += 1
        TRITON["inside"] += 1
        try:
            return real(self, *args, **kwargs)
        finally:
            TRITON["inside"] -= 1

    interpreter.GridExecutor.__call__ = counted
    return TRITON


def tiny_model(folder: Path, layers: int) -> Path:
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig

    tokenizer = AutoTokenizer.from_pretrained(resolve_checkpoint(None))
    # A 512-token vocabulary: the LM head and the sampler stay as small as the layers (prompts are ids).
    config = LlamaConfig(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=layers,
                         num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=2048,
                         tie_word_embeddings=True)
    AutoModelForCausalLM.from_config(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def launches_per_layer(path: Path, backend: str, triton_counter) -> tuple[float, dict]:
    """(launches per layer, aten op counts) of one decode step at batch 4, from two models of 2 and 4
    layers: the difference is what the layers cost, without the step's fixed part."""
    per_model = []
    for layers in (2, 4):
        llm = LLM(str(path / f"l{layers}"), device="cpu", backend=backend, kv_cache_memory_gb=0.05,
                  max_model_len=256)
        engine = llm.engine
        for p in ([1, 2, 3], [4, 5], [6], [7, 8, 9, 10]):
            engine.add_request(p, SamplingParams(max_tokens=8, ignore_eos=True, end_think=(10, 11)))
        engine.step()  # the prefill
        mode = CountOps()
        triton_counter["launches"] = 0
        with mode:
            engine.step()  # one decode step
        per_model.append((sum(mode.ops.values()) + triton_counter["launches"], dict(mode.ops)))
        while engine.has_unfinished():
            engine.step()
    (two, ops2), (four, ops4) = per_model
    return (four - two) / 2, {k: (ops4.get(k, 0) - ops2.get(k, 0)) / 2 for k in ops4}


def host_time(path: Path, seqs: int, steps: int) -> dict[str, float]:
    """Median ms per decode chunk: plan (which rows changed), upload (apply the changes to the resident
    rows), read back, and the whole run."""
    llm = LLM(str(path / "l2"), device="cpu", kv_cache_memory_gb=0.2, max_model_len=1024, max_num_seqs=seqs,
              num_scheduler_steps=steps)
    engine, runner = llm.engine, llm.engine.runner
    for i in range(seqs):
        engine.add_request([1, 2, 3 + i % 50] * 20, SamplingParams(max_tokens=200, ignore_eos=True, end_think=(10, 11),
                                                                   think_budget=100, solution_budget=50))
    engine.step()  # prefill
    times = {"plan": [], "upload": [], "readback": [], "run": []}

    def timed(owner, name, label):
        real = getattr(owner, name)

        def wrapper(*args, **kwargs):
            start = time.perf_counter()
            out = real(*args, **kwargs)
            times[label].append(time.perf_counter() - start)
            return out

        setattr(owner, name, wrapper)

    timed(runner, "plan", "plan")
    timed(runner.batch, "apply", "upload")
    timed(runner, "_result", "readback")
    for _ in range(17):  # the first chunk uploads every row (they joined after the prefill): left out
        batch = engine.scheduler.schedule()
        start = time.perf_counter()
        result = runner.run(batch)
        times["run"].append(time.perf_counter() - start)
        engine.scheduler.postprocess(batch, result)
    medians = {k: 1000 * statistics.median(v[1:]) for k, v in times.items()}
    return {**medians, "joined": 1000 * (times["plan"][0] + times["upload"][0])}


def main() -> None:
    triton_counter = count_triton_launches()
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp)
        for layers in (2, 4):
            tiny_model(path / f"l{layers}", layers)
        print(f"{platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}; tiny Llama (hidden 64, "
              "4 q / 2 kv heads, vocabulary 512), CPU")
        print()
        print("| backend | launches per layer per decode step | the layer's ops |")
        print("| --- | --- | --- |")
        for backend in ("reference", "triton"):
            per_layer, ops = launches_per_layer(path, backend, triton_counter)
            listed = ", ".join(f"{k} {v:g}" for k, v in sorted(ops.items(), key=lambda kv: -kv[1]) if v)
            print(f"| {backend} | {per_layer:g} | {listed} |")
        print()
        print("| sequences | steps per chunk | plan ms | upload ms | read back ms | host per chunk ms | "
              "whole run ms (compute included) | plan + upload when every row joins ms |")
        print("| --- | --- | --- | --- | --- | --- | --- | --- |")
        for seqs in (64, 256):
            for steps in (1, 8):
                t = host_time(path, seqs, steps)
                host = t["plan"] + t["upload"] + t["readback"]
                print(f"| {seqs} | {steps} | {t['plan']:.2f} | {t['upload']:.2f} | {t['readback']:.2f} | {host:.2f} | "
                      f"{t['run']:.1f} | {t['joined']:.2f} |")


if __name__ == "__main__":
    main()
