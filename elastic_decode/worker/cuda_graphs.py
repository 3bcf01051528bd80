"""CUDA graphs of the decode step: one per batch-size bucket, captured on first use, replayed.

A decode step of a small model at small batch is a few hundred short kernel launches; the GPU
waits on the host between them. A graph replays the whole step (forward, logits, fused sampler
and budget machine, the advance of each row's token, position and context length) as one
launch. Since the step advances its own inputs on the device, a K-step chunk is K replays with
no host work between them. The idea and the bucketing follow vLLM's CUDA-graph runner.

Static buffers: a graph reads and writes fixed addresses, which the persistent device batch
(device_batch.py) provides: its rows stay resident across chunks, reserved for the largest bucket,
with a block table as wide as max_model_len and fixed marker and stop widths (the kernels take the
widths at run time, so they do not recompile). A bucket's graph works on the batch's first B rows;
rows n..B of a batch of n are padding (DONE: the sampler emits PAD_TOKEN for them and changes
nothing, no KV is written, one token of block 0 is attended), as the device batch keeps them.
The launch choices that change floating-point results (split-KV, sampler chunks) depend only
on the batch's size class, which a batch and its bucket share (kernels/launch_policy.py), so a
replayed step computes what the eager step computes. A batch that asks for top logprobs runs
eagerly (on the same rows).

Graphs hold the KV cache's and the device batch's addresses: they are dropped when the cache is
freed (engine sleep) or replaced, or the batch reallocated (a request with a stop list longer than
STOP_WIDTH widens it), and captured again on first use. Weight updates copy in place
(LlamaForCausalLM.load_weights), which keeps them valid. At start-up the engine captures every
bucket up front, largest first (`capture_buckets`, startup.py), so the graphs' memory is known
before the KV cache is sized.

`capture=False` runs the very same static-buffer path eagerly (no graph): the CPU tests use it
to check padding, bucketing and the fixed widths against the plain decode loop; they also
replace `_capture` (the only lines that need CUDA) to check warm-up, reuse and re-capture.
"""
from __future__ import annotations

import logging
from collections.abc import Callable

import torch

from elastic_decode.kernels import BudgetState

from ..config import EngineConfig
from ..models import KernelOps, LlamaForCausalLM
from .decode_step import decode_step
from .device_batch import STOP_WIDTH, DeviceBatch

log = logging.getLogger("elastic_decode")


def wants_cuda_graphs(config: EngineConfig, device_type: str, backend: str) -> bool:
    """Whether the engine captures CUDA graphs: as asked, else (cuda_graphs None) wherever they can run
    (CUDA, the Triton kernels, one rank) unless enforce_eager."""
    if config.cuda_graphs is not None:
        return config.cuda_graphs
    return (not config.enforce_eager and device_type == "cuda" and backend == "triton"
            and config.tensor_parallel_size == 1)


def batch_buckets(max_num_seqs: int) -> list[int]:
    """1, 2, 4, 8, then every multiple of 16, up to max_num_seqs (vLLM's capture sizes): at
    most 15 padding rows above 16, and few graphs to capture."""
    sizes = {b for b in (1, 2, 4, 8) if b < max_num_seqs} | set(range(16, max_num_seqs, 16)) | {max_num_seqs}
    return sorted(sizes)


class DecodeGraphs:
    def __init__(
        self,
        model: LlamaForCausalLM,
        ops: KernelOps,
        block_size: int,
        max_num_seqs: int,
        max_blocks_per_seq: int,
        device: torch.device,
        capture: bool = True,
    ):
        self.model, self.ops, self.block_size = model, ops, block_size
        self.buckets = batch_buckets(max_num_seqs)
        self.max_blocks = max_blocks_per_seq
        self.device = device
        self.capture = capture
        self._graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self._pool = None
        # One side stream for every warm-up and capture: cuBLAS keeps a workspace per stream it runs on,
        # so a stream per bucket would hold one each (~32 MiB) beyond what start-up measured.
        self._stream: torch.cuda.Stream | None = None
        self._against: tuple | None = None  # (kv caches, device batch, its generation) the graphs were captured on
        self._out: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None  # tokens, logprobs, forced

    def fits(self, num_seqs: int) -> bool:
        return num_seqs <= self.buckets[-1]

    def reserve(self, batch: DeviceBatch) -> None:
        """Size a device batch for the graphs: the largest bucket's rows, max_model_len's blocks."""
        batch.ensure(self.buckets[-1], self.max_blocks, STOP_WIDTH)

    def reset(self) -> None:
        """Drop every graph and its memory pool (the KV cache or the rows they point at are going away)."""
        self._graphs.clear()
        self._pool = None
        self._against = None

    def _bind(self, kv_caches, batch: DeviceBatch) -> None:
        """Graphs captured on other buffers than these are dropped (captured again on first use)."""
        self.reserve(batch)
        bound = self._against
        if bound is None or bound[0] is not kv_caches or bound[1] is not batch or bound[2] != batch.generation:
            self.reset()
            self._against = (kv_caches, batch, batch.generation)
        if self._out is None:
            rows = self.buckets[-1]
            self._out = (torch.zeros(rows, dtype=torch.long, device=self.device),
                         torch.zeros(rows, dtype=torch.float32, device=self.device),
                         torch.zeros(rows, dtype=torch.int32, device=self.device))

    # -- the step -----------------------------------------------------------------------

    def _step(self, kv_caches, batch: DeviceBatch, b: int) -> None:
        view = batch.view(b)
        tokens, logprobs = decode_step(self.model, self.ops, kv_caches, self.block_size, view)
        out_tokens, out_logprobs, out_forced = self._out
        out_tokens[:b].copy_(tokens)
        out_logprobs[:b].copy_(logprobs)
        out_forced[:b].copy_(view.state.forced)

    def _graph(self, kv_caches, batch: DeviceBatch, b: int):
        graph = self._graphs.get(b)
        if graph is None:
            # Warm-up and capture run on rows that are all padding (no KV written); the resident rows
            # they stand on are put back afterwards.
            saved = {name: t[:b].clone() for name, t in batch.tensors().items()}
            batch.pad(0, b)
            graph = self._capture(lambda: self._step(kv_caches, batch, b))
            for name, t in batch.tensors().items():
                t[:b].copy_(saved[name])
            self._graphs[b] = graph
        return graph

    @torch.inference_mode()  # no autograd state: F.linear would otherwise keep its inputs in the graphs' pool
    def capture_buckets(self, kv_caches, batch: DeviceBatch, buckets: list[int] | None = None) -> None:
        """Capture the graphs of `buckets` (default: all) now, largest first: the largest needs the
        most of the shared pool, and the smaller ones then fit in what it left (nano-vllm's order)."""
        self._bind(kv_caches, batch)
        for b in sorted(buckets or self.buckets, reverse=True):
            self._graph(kv_caches, batch, b)

    def release(self) -> None:
        """Drop the graphs and their output buffers (start-up measures what they hold, then frees it)."""
        self.reset()
        self._out = None

    def _capture(self, step) -> torch.cuda.CUDAGraph:
        """Warm up on the side stream (Triton compiles on first launch, cuBLAS picks its kernels),
        then capture one step into a graph that shares the pool of the others. All of it under this
        engine's device: `torch.cuda.graph` and a stream made without a device take the *current*
        device, which on another thread or for an engine not on cuda:0 is not this one."""
        with torch.cuda.device(self.device):
            if self._stream is None:
                self._stream = torch.cuda.Stream(self.device)
            side, main = self._stream, torch.cuda.current_stream(self.device)
            side.wait_stream(main)
            with torch.cuda.stream(side):
                for _ in range(2):
                    step()
            main.wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=self._pool, stream=side):
                step()
            main.wait_stream(side)
        self._pool = graph.pool()
        return graph

    def run(
        self,
        kv_caches: list[tuple[torch.Tensor, torch.Tensor]],
        batch: DeviceBatch,  # rows 0..n-1 live, the rest padding
        n: int,
        num_steps: int,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, BudgetState]:
        """K steps on the batch's first n rows: tokens int64 [K, n], logprobs fp32 [K, n], forced int32
        [K, n] (row order), and the budget state after the chunk (views of n rows)."""
        b = next(size for size in self.buckets if size >= n)
        self._bind(kv_caches, batch)
        graph = self._graph(kv_caches, batch, b) if self.capture else None
        out_tokens, out_logprobs, out_forced = self._out
        tokens_k, logprobs_k, forced_k = [], [], []
        for _ in range(num_steps):
            if graph is not None:
                graph.replay()
            else:
                self._step(kv_caches, batch, b)
            tokens_k.append(out_tokens[:n].clone())
            logprobs_k.append(out_logprobs[:n].clone())
            forced_k.append(out_forced[:n].clone())
        return torch.stack(tokens_k), torch.stack(logprobs_k), torch.stack(forced_k), batch.view(n).state


def capture_or_eager(capture_all: Callable[[], None]) -> bool:
    """Capture every bucket (largest first); on failure warn once and report False (eager)."""
    try:
        capture_all()
    except Exception as err:  # a capture that fails must not take the engine down  # noqa: BLE001
        log.warning("CUDA graph capture failed at start-up (%s: %s); decoding eagerly",
                    type(err).__name__, str(err).splitlines()[0] if str(err) else "no message")
        return False
    return True
