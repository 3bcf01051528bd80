"""Engine start-up on a GPU: compile every kernel, measure the largest step and the CUDA graphs,
then give the KV cache what is left, then capture the graphs.

1. Compile: the kernels' launch plan at this model's shapes (kernels/aot.launch_plan: every
   compile-time variant the engine launches), so no request pays a Triton compile.
2. Profile: the largest prefill the scheduler can form (its token budget spread over up to
   max_num_seqs sequences, so the logits and sampler rows are the largest too) runs on a small
   temporary cache; the peak memory the allocator reserves above what it held before is what any
   later step can need on top of the weights and the cache (vLLM's profile run; reserved, not
   allocated: freed blocks the allocator keeps are not the cache's).
3. Graph memory: the largest bucket's graph is captured (under inference mode, as every capture
   is) against that temporary cache and the memory it holds is measured by the device's free
   memory (every bucket shares one pool, and the largest needs the most, which is why nano-vllm
   captures largest first); then it is dropped.
4. The KV cache takes GPU_MEMORY_UTILIZATION of the free memory, less those two.
5. The graphs are captured for real against the cache, largest bucket first. A capture that
   fails leaves the engine decoding eagerly, with one warning line that says why.

The memory figures come through a `MemoryProbe`, so tests can run this order on CPU with stand-in
numbers (and the suite's stand-in for graph capture).
"""
from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass

import torch

from elastic_decode.kernels import cpu as cpu_kernels

from ..core.sequence import Sequence, SequenceStatus
from ..core.step import ScheduledBatch
from ..errors import ElasticDecodeError
from ..sampling_params import SamplingParams
from ..worker.cuda_graphs import capture_or_eager

log = logging.getLogger("elastic_decode")

GPU_MEMORY_UTILIZATION = 0.9  # of the free memory after the weights, for activations, graphs and cache


def pick_device(name: str | None) -> torch.device:
    """The engine's device: as named (checked against this machine), else CUDA where there is a GPU."""
    if name is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ElasticDecodeError(f"unknown device {name!r}") from None
    if device.type == "cuda":
        count = torch.cuda.device_count()  # 0 without a GPU (or a CUDA build of torch)
        if count == 0:
            raise ElasticDecodeError("device 'cuda' requested but no CUDA GPU is available")
        if device.index is not None and device.index >= count:
            raise ElasticDecodeError(f"device {name!r} requested but this machine has {count} CUDA GPU"
                                     f"{'s' if count > 1 else ''} (cuda:0{f' to cuda:{count - 1}' if count > 1 else ''})")
    return device


def pick_dtype(name: str, device: torch.device, hf_config, quantization: str | None = None) -> torch.dtype:
    """The weights' and KV cache's dtype for `dtype="auto"` (EngineConfig.dtype says why), else as named."""
    if name != "auto":
        return getattr(torch, name)
    if quantization == "int4":  # its one-call decoder runs in float32 only: bf16 would take the slower per-op path
        return torch.float32
    if device.type == "cpu":  # bf16 where the CPU has the instructions for it, else fp32 (exact and faster there)
        return torch.bfloat16 if cpu_kernels.native_bf16() else torch.float32
    if device.type != "cuda":
        return torch.float32
    ckpt = getattr(hf_config, "dtype", None) or getattr(hf_config, "torch_dtype", None)
    ckpt = getattr(torch, ckpt) if isinstance(ckpt, str) else ckpt
    return ckpt if ckpt in (torch.float16, torch.bfloat16) else torch.bfloat16


@dataclass(frozen=True)
class MemoryProbe:
    """What start-up measures; torch.cuda's counters on a GPU (`cuda_memory`). Reserved memory, not
    allocated: what the caching allocator holds (freed blocks it keeps, a graph pool's blocks) is as
    unavailable to the KV cache as live tensors are."""

    free: Callable[[], int]  # bytes the device can still give (driver view)
    reserved: Callable[[], int]  # bytes the caching allocator holds
    reset_peak: Callable[[], None]
    peak_reserved: Callable[[], int]  # the most bytes it held since reset_peak
    release: Callable[[], None]  # hand cached, unused blocks back to the device


def cuda_memory(device: torch.device) -> MemoryProbe:
    def sync_then(fn):
        def call():
            torch.cuda.synchronize(device)
            return fn()
        return call

    return MemoryProbe(
        free=sync_then(lambda: torch.cuda.mem_get_info(device)[0]),
        reserved=sync_then(lambda: torch.cuda.memory_reserved(device)),
        reset_peak=lambda: torch.cuda.reset_peak_memory_stats(device),
        peak_reserved=sync_then(lambda: torch.cuda.max_memory_reserved(device)),
        release=torch.cuda.empty_cache,
    )


@dataclass(frozen=True)
class MemoryPlan:
    """What start-up measured and what the KV cache was given (bytes)."""

    free: int  # free after the weights (and the compile warm-up), before the cache
    step_peak: int  # the largest step's transient need
    graph_bytes: int | None  # the CUDA graphs' pool and static buffers; 0 without graphs, None if capture failed
    kv_cache: int  # the cache's size


def compile_kernels(spec, block_size: int, dtype: torch.dtype, device: torch.device) -> None:
    """Run every kernel variant the engine launches once at this model's shapes (a compile each)."""
    from elastic_decode.kernels import aot  # CUDA only: `python -m elastic_decode.kernels.aot` imports this package

    shape = aot.ModelShape("engine", num_q_heads=spec.num_q_heads, num_kv_heads=spec.num_kv_heads,
                           head_dim=spec.head_dim, hidden=spec.hidden_size, intermediate=spec.intermediate_size,
                           vocab=spec.vocab_size, block_size=block_size)
    for _, launch in aot.launch_plan(shape, dtype, device=device):
        launch()


def largest_prefill(num_tokens: int, max_num_seqs: int, max_model_len: int, block_size: int,
                    vocab_size: int) -> tuple[ScheduledBatch, int]:
    """The largest prefill batch the scheduler can form (num_tokens tokens over as many
    sequences as it may run, each within max_model_len), with block tables numbered from 0 on a
    cache of the returned number of blocks. Token ids cycle through the vocabulary."""
    num_tokens = min(num_tokens, max_num_seqs * max_model_len)
    num_seqs = max(1, min(max_num_seqs, num_tokens))
    base, extra = divmod(num_tokens, num_seqs)  # base + 1 <= max_model_len whenever extra > 0
    seqs, next_block = [], 0
    greedy = SamplingParams(temperature=0.0, max_tokens=1)
    for i in range(num_seqs):
        length = base + (i < extra)
        blocks = -(-length // block_size)
        seq = Sequence(seq_id=-1 - i, request_id=-1, sample_index=0,
                       token_ids=[(i * 7919 + t) % vocab_size for t in range(length)], num_prompt_tokens=length,
                       params=greedy, seed=0, marker=(0,), stop_ids=(), max_new_tokens=1,
                       status=SequenceStatus.RUNNING, block_table=list(range(next_block, next_block + blocks)))
        next_block += blocks
        seqs.append(seq)
    return ScheduledBatch(tuple(seqs), is_prefill=True), next_block


def profile_step(run_prefill: Callable[[], object], probe: MemoryProbe) -> int:
    """Bytes the largest step makes the allocator reserve above what it holds when the step starts."""
    probe.release()
    before = probe.reserved()
    probe.reset_peak()
    run_prefill()
    return max(0, probe.peak_reserved() - before)


def measure_graphs(capture_largest: Callable[[], None], drop: Callable[[], None], probe: MemoryProbe) -> int | None:
    """Bytes the largest bucket's graph (its pool, the static buffers) holds, by the device's own count:
    what dropping it gives back. What stays after the drop (the side stream's cuBLAS workspace) is gone
    from the free memory the KV cache is sized from already. None (after one warning) if the capture fails."""
    probe.release()
    captured = capture_or_eager(capture_largest)
    probe.release()
    holding = probe.free()
    drop()
    probe.release()
    return max(0, probe.free() - holding) if captured else None


def kv_cache_bytes(free: int, step_peak: int, graph_bytes: int | None) -> int:
    return int(GPU_MEMORY_UTILIZATION * free) - step_peak - (graph_bytes or 0)


def num_kv_blocks(budget: float, per_block: int, max_num_seqs: int, max_model_len: int, block_size: int,
                  plan: MemoryPlan | None = None) -> int:
    """Blocks a KV cache of `budget` bytes holds, but no more than every sequence at full length needs;
    one clear error where a measured plan leaves not even one block."""
    if budget < per_block and plan is not None:
        raise ElasticDecodeError(
            f"not enough device memory for a KV cache: {plan.free / 2**30:.2f} GiB free after the weights, "
            f"the largest step needs {plan.step_peak / 2**30:.2f} GiB and the CUDA graphs "
            f"{(plan.graph_bytes or 0) / 2**30:.2f} GiB (lower max_num_batched_tokens or max_num_seqs, "
            "or turn cuda_graphs off)")
    most = max_num_seqs * -(-max_model_len // block_size)
    return max(1, min(int(budget // per_block), most))
