"""CUDA graphs of the decode step: one per batch-size bucket, captured on first use, replayed.

A decode step of a small model at small batch is a few hundred short kernel launches; the GPU
waits on the host between them. A graph replays the whole step (forward, logits, fused sampler
and budget machine, the advance of each row's token, position and context length) as one
launch. Since the step advances its own inputs on the device, a K-step chunk is K replays with
no host work between them. The idea and the bucketing follow vLLM's CUDA-graph runner.

Static buffers: every tensor the step reads or writes lives in a buffer sized for the largest
bucket; a bucket's graph works on the first B rows. A batch of n < B sequences is padded with
rows that are DONE (the sampler emits PAD_TOKEN for them and changes nothing), write no KV
(slot -1) and attend to one token of block 0. Shapes that eager mode takes from the batch are
fixed at capture: the block table is as wide as max_model_len, and the marker window and stop
list have fixed widths (the kernels take the widths at run time, so they do not recompile).
The launch choices that change floating-point results (split-KV, sampler chunks) depend only
on the batch's size class, which a batch and its bucket share (kernels/launch_policy.py), so a
replayed step computes what the eager step computes. A batch that does not fit (a longer stop
list, more rows than the largest bucket) runs eagerly.

Graphs hold the KV cache's addresses: they are dropped when the cache is freed (engine sleep)
or replaced, and captured again on first use. Weight updates copy in place
(LlamaForCausalLM.load_weights), which keeps them valid. At start-up the engine captures every
bucket up front, largest first (`capture_buckets`, startup.py), so the graphs' memory is known
before the KV cache is sized.

`capture=False` runs the very same static-buffer path eagerly (no graph): the CPU tests use it
to check padding, bucketing and the fixed widths against the plain decode loop; they also
replace `_capture` (the only lines that need CUDA) to check warm-up, reuse and re-capture.
"""
from __future__ import annotations

from dataclasses import fields

import torch

from elastic_decode.kernels import DONE, MAX_MARKER_TOKENS, BudgetState, SamplerParams

from .decode_step import DecodeInputs, decode_step
from .models import KernelOps, LlamaForCausalLM
from .sequence import Sequence

MARKER_WIDTH = MAX_MARKER_TOKENS  # every marker the engine accepts fits (the sampler reads the width at run time)
STOP_WIDTH = 8  # EOS ids + stop_token_ids per request


def batch_buckets(max_num_seqs: int) -> list[int]:
    """1, 2, 4, 8, then every multiple of 16, up to max_num_seqs (vLLM's capture sizes): at
    most 15 padding rows above 16, and few graphs to capture."""
    sizes = {b for b in (1, 2, 4, 8) if b < max_num_seqs} | set(range(16, max_num_seqs, 16)) | {max_num_seqs}
    return sorted(sizes)


def _static_like(t: torch.Tensor, rows: int) -> torch.Tensor:
    """Zeros shaped like t but with `rows` rows."""
    return t.new_zeros((rows, *t.shape[1:]))


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
        self.marker_width, self.stop_width = MARKER_WIDTH, STOP_WIDTH
        self.device = device
        self.capture = capture
        self._graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self._pool = None
        self._kv_caches: list | None = None  # the cache the graphs were captured against
        self._static: DecodeInputs | None = None  # allocated on the first run (dtypes from the batch)
        self._out: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None  # tokens, logprobs, forced

    def fits(self, seqs: tuple[Sequence, ...]) -> bool:
        return (len(seqs) <= self.buckets[-1]
                and all(len(s.marker) <= self.marker_width and len(s.stop_ids) <= self.stop_width
                        and len(s.block_table) <= self.max_blocks for s in seqs))

    def reset(self) -> None:
        """Drop every graph and its memory pool (the KV cache they point at is going away)."""
        self._graphs.clear()
        self._pool = None
        self._kv_caches = None

    # -- static buffers -----------------------------------------------------------------

    def _allocate(self, inp: DecodeInputs) -> None:
        rows = self.buckets[-1]

        def like(group):
            return type(group)(**{f.name: _static_like(getattr(group, f.name), rows) for f in fields(group)})

        self._static = DecodeInputs(
            input_ids=_static_like(inp.input_ids, rows),
            positions=_static_like(inp.positions, rows),
            context_lens=_static_like(inp.context_lens, rows),
            block_tables=torch.zeros(rows, self.max_blocks, dtype=torch.int32, device=self.device),
            params=like(inp.params),
            state=like(inp.state),
        )
        self._out = (torch.zeros(rows, dtype=torch.long, device=self.device),
                     torch.zeros(rows, dtype=torch.float32, device=self.device),
                     torch.zeros(rows, dtype=torch.int32, device=self.device))

    def _view(self, b: int) -> DecodeInputs:
        s = self._static
        return DecodeInputs(
            input_ids=s.input_ids[:b], positions=s.positions[:b], context_lens=s.context_lens[:b],
            block_tables=s.block_tables[:b],
            params=SamplerParams(**{f.name: getattr(s.params, f.name)[:b] for f in fields(SamplerParams)}),
            state=BudgetState(**{f.name: getattr(s.state, f.name)[:b] for f in fields(BudgetState)}),
        )

    def _load(self, inp: DecodeInputs, b: int) -> None:
        """Copy a batch of n rows into the static buffers and pad rows n..b."""
        s, n = self._static, inp.input_ids.shape[0]
        for name in ("input_ids", "positions", "context_lens"):
            getattr(s, name)[:n].copy_(getattr(inp, name))
        # Columns past a row's own blocks keep stale block ids: valid indices that no kernel
        # reads (attention stops at the row's context length).
        s.block_tables[:n, : inp.block_tables.shape[1]].copy_(inp.block_tables)
        for group, static in ((inp.params, s.params), (inp.state, s.state)):
            for f in fields(group):
                getattr(static, f.name)[:n].copy_(getattr(group, f.name))
        self._pad(n, b)

    def _pad(self, start: int, end: int) -> None:
        """Rows start..end: DONE, one token of context in block 0, nothing written."""
        s = self._static
        s.state.phase[start:end] = DONE
        s.context_lens[start:end] = 1
        s.positions[start:end] = 0
        s.input_ids[start:end] = 0
        s.block_tables[start:end] = 0

    # -- the step -----------------------------------------------------------------------

    def _step(self, kv_caches, b: int) -> None:
        view = self._view(b)
        tokens, logprobs = decode_step(self.model, self.ops, kv_caches, self.block_size, view)
        out_tokens, out_logprobs, out_forced = self._out
        out_tokens[:b].copy_(tokens)
        out_logprobs[:b].copy_(logprobs)
        out_forced[:b].copy_(view.state.forced)

    def _graph(self, kv_caches, b: int):
        graph = self._graphs.get(b)
        if graph is None:
            self._pad(0, b)  # warm-up and capture run on rows that are all padding: no KV written
            graph = self._capture(lambda: self._step(kv_caches, b))
            self._graphs[b] = graph
        return graph

    def capture_buckets(self, kv_caches, template: DecodeInputs, buckets: list[int] | None = None) -> None:
        """Capture the graphs of `buckets` (default: all) now, largest first: the largest needs the
        most of the shared pool, and the smaller ones then fit in what it left (nano-vllm's order).
        `template` is any decode batch of the fixed widths (it gives the buffers' dtypes)."""
        if kv_caches is not self._kv_caches:
            self.reset()
            self._kv_caches = kv_caches
        if self._static is None:
            self._allocate(template)
        for b in sorted(buckets or self.buckets, reverse=True):
            self._graph(kv_caches, b)

    def release(self) -> None:
        """Drop the graphs and the static buffers (start-up measures what they hold, then frees it)."""
        self.reset()
        self._static = None
        self._out = None

    def _capture(self, step) -> torch.cuda.CUDAGraph:
        """Warm up on a side stream (Triton compiles on first launch, cuBLAS picks its kernels),
        then capture one step into a graph that shares the pool of the others."""
        side = torch.cuda.Stream(self.device)
        side.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(side):
            for _ in range(2):
                step()
        torch.cuda.current_stream(self.device).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self._pool):
            step()
        self._pool = graph.pool()
        return graph

    def run(
        self,
        kv_caches: list[tuple[torch.Tensor, torch.Tensor]],
        inp: DecodeInputs,  # n rows, marker/stop columns of the fixed widths
        num_steps: int,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, BudgetState]:
        """K steps on the batch: tokens int64 [K, n], logprobs fp32 [K, n], forced int32 [K, n],
        and the budget state after the chunk (views of n rows)."""
        n = inp.input_ids.shape[0]
        b = next(size for size in self.buckets if size >= n)
        if kv_caches is not self._kv_caches:
            self.reset()
            self._kv_caches = kv_caches
        if self._static is None:
            self._allocate(inp)
        graph = self._graph(kv_caches, b) if self.capture else None
        self._load(inp, b)  # after a first capture, whose warm-up ran on padding
        out_tokens, out_logprobs, out_forced = self._out
        tokens_k, logprobs_k, forced_k = [], [], []
        for _ in range(num_steps):
            if graph is not None:
                graph.replay()
            else:
                self._step(kv_caches, b)
            tokens_k.append(out_tokens[:n].clone())
            logprobs_k.append(out_logprobs[:n].clone())
            forced_k.append(out_forced[:n].clone())
        state = BudgetState(**{f.name: getattr(self._static.state, f.name)[:n] for f in fields(BudgetState)})
        return torch.stack(tokens_k), torch.stack(logprobs_k), torch.stack(forced_k), state
