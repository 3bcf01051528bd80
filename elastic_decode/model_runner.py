"""Turns a scheduled batch into tensors, runs the model and the fused sampler, returns a StepResult.

One step = one forward (packed prefill or one token per sequence) + one `sample_with_budget`
launch over the batch's last-position logits; the budget machine advances on the device.
A decode chunk runs `batch.num_steps` such steps back to back (decode_step.py): each step's
tokens feed the next step's forward, positions and context lengths advance on the device, and
the host reads the chunk's tokens and the final budget state back once (multi-step scheduling
as in vLLM's `num_scheduler_steps`; here the budgets make every sequence's room known ahead).
With CUDA graphs on, each step of a chunk is a replay of the graph captured for the batch's
size bucket (cuda_graphs.py).
"""
from __future__ import annotations

import torch

from elastic_decode.kernels import NO_LIMIT, PAD_TOKEN, BudgetState, SamplerParams

from .cuda_graphs import DecodeGraphs
from .decode_step import DecodeInputs, decode_step
from .models import AttentionBatch, KernelOps, LlamaForCausalLM
from .scheduler import ScheduledBatch, StepResult
from .sequence import Sequence


def _rows(values: list[list[int]], width: int, fill: int) -> list[list[int]]:
    """Right-align ragged int rows into a rectangle."""
    return [[fill] * (width - len(v)) + list(v) for v in values]


class ModelRunner:
    def __init__(
        self,
        model: LlamaForCausalLM,
        kv_caches: list[tuple[torch.Tensor, torch.Tensor]],
        ops: KernelOps,
        block_size: int,
        graphs: DecodeGraphs | None = None,
    ):
        self.model = model
        self.kv_caches = kv_caches
        self.ops = ops
        self.block_size = block_size
        self.graphs = graphs  # CUDA graphs of the decode step, where the batch fits them
        self.device = kv_caches[0][0].device

    # -- inputs -----------------------------------------------------------------------

    def _tensor(self, data, dtype: torch.dtype) -> torch.Tensor:
        return torch.tensor(data, dtype=dtype).to(self.device, non_blocking=True)

    def _block_tables(self, seqs: tuple[Sequence, ...]) -> torch.Tensor:
        width = max(len(s.block_table) for s in seqs)
        return self._tensor([s.block_table + [0] * (width - len(s.block_table)) for s in seqs], torch.int32)

    def _prepare(self, batch: ScheduledBatch) -> tuple[torch.Tensor, torch.Tensor, AttentionBatch, torch.Tensor]:
        seqs = batch.seqs
        block_tables = self._block_tables(seqs)  # int32 [num_seqs, max_blocks]
        if batch.is_prefill:
            starts = [s.num_cached_tokens for s in seqs]
            ids = [t for s, a in zip(seqs, starts) for t in s.token_ids[a:]]
            positions = [p for s, a in zip(seqs, starts) for p in range(a, len(s))]
            seq_index = [i for i, (s, a) in enumerate(zip(seqs, starts)) for _ in range(a, len(s))]
            cu = [0]
            for s, a in zip(seqs, starts):
                cu.append(cu[-1] + len(s) - a)
            cu_seqlens_q = self._tensor(cu, torch.int32)  # [num_seqs + 1]
            logits_rows = cu_seqlens_q[1:].long() - 1  # last new token of each sequence
        else:
            ids = [s.token_ids[-1] for s in seqs]
            positions = [len(s) - 1 for s in seqs]
            seq_index = list(range(len(seqs)))
            cu_seqlens_q = None
            logits_rows = torch.arange(len(seqs), device=self.device)
        input_ids = self._tensor(ids, torch.long)  # [num_tokens]
        pos = self._tensor(positions, torch.long)  # [num_tokens]
        owner = self._tensor(seq_index, torch.long)  # [num_tokens]
        slot_mapping = block_tables[owner, pos // self.block_size].long() * self.block_size + pos % self.block_size
        attn = AttentionBatch(
            is_prefill=batch.is_prefill,
            slot_mapping=slot_mapping,
            block_tables=block_tables,
            context_lens=self._tensor([len(s) for s in seqs], torch.int32),
            cu_seqlens_q=cu_seqlens_q,
            max_context_len=max(len(s) for s in seqs),
            max_new_tokens=max(len(s) - s.num_cached_tokens for s in seqs) if batch.is_prefill else 1,
        )
        return input_ids, pos, attn, logits_rows

    def _sampler_inputs(self, seqs: tuple[Sequence, ...], width: int | None = None,
                        stop_width: int | None = None) -> tuple[SamplerParams, BudgetState]:
        """Sampler rows; the marker and stop columns are as wide as the batch needs unless given."""
        width = width or max(len(s.marker) for s in seqs)
        stop_width = stop_width or max(1, max(len(s.stop_ids) for s in seqs))
        i32 = torch.int32
        p = [s.params for s in seqs]
        params = SamplerParams(
            temperature=self._tensor([x.temperature for x in p], torch.float32),
            top_k=self._tensor([max(x.top_k, 0) for x in p], i32),
            top_p=self._tensor([x.top_p for x in p], torch.float32),
            min_p=self._tensor([x.min_p for x in p], torch.float32),
            seed=self._tensor([s.seed for s in seqs], torch.long),
            think_budget=self._tensor([x.think_budget if x.think_budget is not None else NO_LIMIT for x in p], i32),
            solution_budget=self._tensor(
                [x.solution_budget if x.solution_budget is not None else NO_LIMIT for x in p], i32
            ),
            max_new_tokens=self._tensor([s.max_new_tokens for s in seqs], i32),
            min_think=self._tensor([x.min_think for x in p], i32),
            marker=self._tensor(_rows([s.marker for s in seqs], width, -2), i32),
            marker_len=self._tensor([len(s.marker) for s in seqs], i32),
            stop_ids=self._tensor([list(s.stop_ids) + [-1] * (stop_width - len(s.stop_ids)) for s in seqs], i32),
        )
        state = BudgetState(
            phase=self._tensor([s.phase for s in seqs], i32),
            think_count=self._tensor([s.think_count for s in seqs], i32),
            solution_count=self._tensor([s.solution_count for s in seqs], i32),
            generated=self._tensor([s.num_generated for s in seqs], i32),
            force_pos=self._tensor([s.force_pos for s in seqs], i32),
            recent=self._tensor(_rows([s.recent for s in seqs], width, -1), i32),
            forced_end=self._tensor([s.forced_end for s in seqs], i32),
            forced=torch.zeros(len(seqs), dtype=i32, device=self.device),
            finish=self._tensor([s.finish for s in seqs], i32),
        )
        return params, state

    # -- step -------------------------------------------------------------------------

    @torch.inference_mode()
    def run(self, batch: ScheduledBatch) -> StepResult:
        if not batch.is_prefill:
            return self._run_decode(batch)
        input_ids, positions, attn, logits_rows = self._prepare(batch)
        hidden = self.model(input_ids, positions, self.kv_caches, attn, self.ops)  # [num_tokens, hidden]
        logits = self.model.compute_logits(hidden[logits_rows])  # [num_seqs, vocab]
        params, state = self._sampler_inputs(batch.seqs)
        tokens, logprobs = self.ops.sample_with_budget(logits, params, state)
        return self._result(tokens[None], logprobs[None], state.forced[None], state)

    def _run_decode(self, batch: ScheduledBatch) -> StepResult:
        seqs = batch.seqs
        graphs = self.graphs if self.graphs is not None and self.graphs.fits(seqs) else None
        widths = (graphs.marker_width, graphs.stop_width) if graphs else (None, None)
        params, state = self._sampler_inputs(seqs, *widths)
        inp = DecodeInputs(
            input_ids=self._tensor([s.token_ids[-1] for s in seqs], torch.long),
            positions=self._tensor([len(s) - 1 for s in seqs], torch.long),
            context_lens=self._tensor([len(s) for s in seqs], torch.int32),
            block_tables=self._block_tables(seqs),
            params=params,
            state=state,
        )
        if graphs is not None:
            return self._result(*graphs.run(self.kv_caches, inp, batch.num_steps))
        max_context = max(len(s) for s in seqs)
        tokens_k, logprobs_k, forced_k = [], [], []
        for k in range(batch.num_steps):
            tokens, logprobs = decode_step(self.model, self.ops, self.kv_caches, self.block_size, inp,
                                           max_context_len=max_context + k)  # positions advance <= 1 a step
            tokens_k.append(tokens)
            logprobs_k.append(logprobs)
            forced_k.append(inp.state.forced.clone())
        return self._result(torch.stack(tokens_k), torch.stack(logprobs_k), torch.stack(forced_k), inp.state)

    @staticmethod
    def _result(
        tokens: torch.Tensor,  # [num_steps, num_seqs]; PAD_TOKEN where a row was already DONE
        logprobs: torch.Tensor,  # float32 [num_steps, num_seqs]
        forced: torch.Tensor,  # int32 [num_steps, num_seqs]
        state: BudgetState,  # after the last step
    ) -> StepResult:
        """The one device-to-host copy of a step or chunk."""
        tokens_rows = tokens.t().tolist()
        keep = [[i for i, t in enumerate(row) if t != PAD_TOKEN] for row in tokens_rows]
        logprob_rows, forced_rows = logprobs.t().tolist(), forced.t().tolist()
        return StepResult(
            tokens=[[row[i] for i in idx] for row, idx in zip(tokens_rows, keep)],
            logprobs=[[row[i] for i in idx] for row, idx in zip(logprob_rows, keep)],
            forced=[[row[i] for i in idx] for row, idx in zip(forced_rows, keep)],
            phase=state.phase.tolist(),
            think_count=state.think_count.tolist(),
            solution_count=state.solution_count.tolist(),
            force_pos=state.force_pos.tolist(),
            recent=state.recent.tolist(),
            forced_end=state.forced_end.tolist(),
            finish=state.finish.tolist(),
        )
