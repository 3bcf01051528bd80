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

import math
from dataclasses import dataclass, fields

import torch

from elastic_decode.kernels import NO_LIMIT, PAD_TOKEN, BudgetState, SamplerParams

from .cuda_graphs import DecodeGraphs
from .decode_step import DecodeInputs, decode_step, top_logprobs
from .models import AttentionBatch, KernelOps, LlamaForCausalLM
from .scheduler import ScheduledBatch, StepResult
from .sequence import Sequence


def _top_rows(top: tuple[torch.Tensor, torch.Tensor], keep: list[list[int]]) -> list:
    """Per sequence, per kept step (padding of DONE rows dropped): [(token id, raw logprob)]."""
    values = top[0].transpose(0, 1).tolist()  # [num_seqs][num_steps][k]
    ids = top[1].transpose(0, 1).tolist()
    return [[list(zip(ids[i][s], values[i][s])) for s in steps] for i, steps in enumerate(keep)]


def _rows(values: list[list[int]], width: int, fill: int) -> list[list[int]]:
    """Right-align ragged int rows into a rectangle."""
    return [[fill] * (width - len(v)) + list(v) for v in values]


@dataclass(frozen=True)
class StepPlan:
    """One step or decode chunk as host values: what rank 0 sends the tensor-parallel workers."""

    is_prefill: bool
    host: dict  # name -> (dtype, flat values, shape), uploaded by `_upload`
    num_steps: int
    graphs: bool  # replay the CUDA graphs (decode, where the batch fits them)
    top: int = 0  # alternatives per token to return (the most any sequence asked for); off the graphs


class ModelRunner:
    def __init__(
        self,
        model: LlamaForCausalLM,
        kv_caches: list[tuple[torch.Tensor, torch.Tensor]],
        ops: KernelOps,
        block_size: int,
        graphs: DecodeGraphs | None = None,
        workers=None,
    ):
        self.workers = workers  # parallel.Workers: the other tensor-parallel ranks, sent every plan
        self.model = model
        self.kv_caches = kv_caches
        self.ops = ops
        self.block_size = block_size
        self.graphs = graphs  # CUDA graphs of the decode step, where the batch fits them
        self.device = next(model.parameters()).device

    # -- inputs -----------------------------------------------------------------------

    def _upload(self, host: dict[str, tuple[torch.dtype, list, tuple[int, ...]]]) -> dict[str, torch.Tensor]:
        """Named flat host values -> device tensors of the given shapes, in one copy per dtype
        rather than one per field (a step's inputs are some twenty small fields). Each field is a
        view of its dtype's buffer starting 16-byte aligned, as a fresh allocation would be
        (Triton specialises kernels on pointer alignment; misaligned views would recompile)."""
        by_dtype: dict[torch.dtype, list] = {}
        for name, (dtype, values, shape) in host.items():
            by_dtype.setdefault(dtype, []).append((name, values, shape))
        out = {}
        for dtype, items in by_dtype.items():
            align = 16 // dtype.itemsize
            flat, spans = [], []
            for name, values, shape in items:
                spans.append((name, len(flat), shape))
                flat += values
                flat += [0] * (-len(flat) % align)
            buf = torch.tensor(flat, dtype=dtype).to(self.device, non_blocking=True)
            for name, start, shape in spans:
                out[name] = buf[start : start + math.prod(shape)].view(shape)
        return out

    @staticmethod
    def _block_table_rows(seqs: tuple[Sequence, ...]) -> tuple[torch.dtype, list[int], tuple[int, int]]:
        width = max(len(s.block_table) for s in seqs)
        flat = [b for s in seqs for b in s.block_table + [0] * (width - len(s.block_table))]
        return torch.int32, flat, (len(seqs), width)

    @staticmethod
    def _sampler_fields(seqs: tuple[Sequence, ...], width: int | None = None,
                        stop_width: int | None = None) -> dict[str, tuple[torch.dtype, list, tuple[int, ...]]]:
        """The sampler's rows on the host; marker and stop columns as wide as the batch needs
        unless given."""
        n = len(seqs)
        width = width or max(len(s.marker) for s in seqs)
        stop_width = stop_width or max(1, max(len(s.stop_ids) for s in seqs))
        i32, f32 = torch.int32, torch.float32
        p = [s.params for s in seqs]

        def flat(rows: list[list[int]]) -> list[int]:
            return [v for row in rows for v in row]

        return {
            "temperature": (f32, [x.temperature for x in p], (n,)),
            "top_k": (i32, [max(x.top_k, 0) for x in p], (n,)),
            "top_p": (f32, [x.top_p for x in p], (n,)),
            "min_p": (f32, [x.min_p for x in p], (n,)),
            "seed": (torch.long, [s.seed for s in seqs], (n,)),
            "think_budget": (i32, [x.think_budget if x.think_budget is not None else NO_LIMIT for x in p], (n,)),
            "solution_budget": (i32, [x.solution_budget if x.solution_budget is not None else NO_LIMIT for x in p],
                                (n,)),
            "max_new_tokens": (i32, [s.max_new_tokens for s in seqs], (n,)),
            "min_think": (i32, [x.min_think for x in p], (n,)),
            "marker": (i32, flat(_rows([s.marker for s in seqs], width, -2)), (n, width)),
            "marker_len": (i32, [len(s.marker) for s in seqs], (n,)),
            "stop_ids": (i32, flat([list(s.stop_ids) + [-1] * (stop_width - len(s.stop_ids)) for s in seqs]),
                         (n, stop_width)),
            "phase": (i32, [s.phase for s in seqs], (n,)),
            "think_count": (i32, [s.think_count for s in seqs], (n,)),
            "solution_count": (i32, [s.solution_count for s in seqs], (n,)),
            "generated": (i32, [s.num_generated for s in seqs], (n,)),
            "force_pos": (i32, [s.force_pos for s in seqs], (n,)),
            "recent": (i32, flat(_rows([s.recent for s in seqs], width, -1)), (n, width)),
            "forced_end": (i32, [s.forced_end for s in seqs], (n,)),
            "forced": (i32, [0] * n, (n,)),
            "finish": (i32, [s.finish for s in seqs], (n,)),
        }

    @staticmethod
    def _sampler_inputs(dev: dict[str, torch.Tensor]) -> tuple[SamplerParams, BudgetState]:
        return (SamplerParams(**{f.name: dev[f.name] for f in fields(SamplerParams)}),
                BudgetState(**{f.name: dev[f.name] for f in fields(BudgetState)}))

    @staticmethod
    def _prefill_host(seqs: tuple[Sequence, ...]) -> dict[str, tuple[torch.dtype, list, tuple[int, ...]]]:
        """Packed new tokens of every sequence (after its cached prefix) and the sampler rows."""
        starts = [s.num_cached_tokens for s in seqs]
        cu = [0]
        for s, a in zip(seqs, starts):
            cu.append(cu[-1] + len(s) - a)
        num_tokens = cu[-1]
        return {
            "input_ids": (torch.long, [t for s, a in zip(seqs, starts) for t in s.token_ids[a:]], (num_tokens,)),
            "positions": (torch.long, [p for s, a in zip(seqs, starts) for p in range(a, len(s))], (num_tokens,)),
            "owner": (torch.long, [i for i, (s, a) in enumerate(zip(seqs, starts)) for _ in range(a, len(s))],
                      (num_tokens,)),
            "cu_seqlens_q": (torch.int32, cu, (len(seqs) + 1,)),
            "context_lens": (torch.int32, [len(s) for s in seqs], (len(seqs),)),
            "block_tables": ModelRunner._block_table_rows(seqs),
            **ModelRunner._sampler_fields(seqs),
        }

    def _prepare_prefill(self, host: dict):
        dev = self._upload(host)
        pos, block_tables = dev["positions"], dev["block_tables"]  # [num_tokens], int32 [num_seqs, max_blocks]
        slot_mapping = block_tables[dev["owner"], pos // self.block_size].long() * self.block_size + pos % self.block_size
        cu = host["cu_seqlens_q"][1]
        attn = AttentionBatch(
            is_prefill=True,
            slot_mapping=slot_mapping,
            block_tables=block_tables,
            context_lens=dev["context_lens"],
            cu_seqlens_q=dev["cu_seqlens_q"],
            max_new_tokens=max(b - a for a, b in zip(cu, cu[1:])),
        )
        logits_rows = dev["cu_seqlens_q"][1:].long() - 1  # last new token of each sequence
        return dev["input_ids"], pos, attn, logits_rows, *self._sampler_inputs(dev)

    # -- step -------------------------------------------------------------------------

    def plan(self, batch: ScheduledBatch) -> StepPlan:
        """What a step runs, as host values (the same on every tensor-parallel rank)."""
        top = max(s.params.logprobs for s in batch.seqs)
        if batch.is_prefill:
            return StepPlan(True, self._prefill_host(batch.seqs), 1, False, top)
        graphs = not top and self.graphs is not None and self.graphs.fits(batch.seqs)
        widths = (self.graphs.marker_width, self.graphs.stop_width) if graphs else (None, None)
        return StepPlan(False, self._decode_host(batch.seqs, widths), batch.num_steps, graphs, top)

    def run(self, batch: ScheduledBatch) -> StepResult:
        plan = self.plan(batch)
        if self.workers is not None:
            self.workers.send(("step", plan))  # the other ranks run the same plan
        return self._result(*self.execute(plan))

    @torch.inference_mode()
    def execute(self, plan: StepPlan):
        """Run a plan: (tokens [steps, seqs], logprobs, forced, final budget state, top alternatives
        ((values, ids) [steps, seqs, top]) or None) on the device."""
        if not plan.is_prefill:
            return self._run_decode(plan)
        input_ids, positions, attn, logits_rows, params, state = self._prepare_prefill(plan.host)
        hidden = self.model(input_ids, positions, self.kv_caches, attn, self.ops)  # [num_tokens, hidden]
        logits = self.model.compute_logits(hidden[logits_rows])  # [num_seqs, vocab]
        top = top_logprobs(logits, plan.top) if plan.top else None
        tokens, logprobs = self.ops.sample_with_budget(logits, params, state)
        return tokens[None], logprobs[None], state.forced[None], state, \
            None if top is None else (top[0][None], top[1][None])

    @staticmethod
    def _decode_host(seqs: tuple[Sequence, ...], widths: tuple[int | None, int | None] = (None, None)) -> dict:
        n = len(seqs)
        return {
            "input_ids": (torch.long, [s.token_ids[-1] for s in seqs], (n,)),
            "positions": (torch.long, [len(s) - 1 for s in seqs], (n,)),
            "context_lens": (torch.int32, [len(s) for s in seqs], (n,)),
            "block_tables": ModelRunner._block_table_rows(seqs),  # the chunk's slots are reserved
            **ModelRunner._sampler_fields(seqs, *widths),
        }

    def decode_inputs(self, seqs: tuple[Sequence, ...], widths: tuple[int | None, int | None] = (None, None)
                      ) -> DecodeInputs:
        """A decode chunk's device inputs (marker and stop columns of the given widths, else as
        wide as the batch needs)."""
        return self._decode_inputs(self._decode_host(seqs, widths))

    def _decode_inputs(self, host: dict) -> DecodeInputs:
        dev = self._upload(host)
        params, state = self._sampler_inputs(dev)
        return DecodeInputs(input_ids=dev["input_ids"], positions=dev["positions"], context_lens=dev["context_lens"],
                            block_tables=dev["block_tables"], params=params, state=state)

    def _run_decode(self, plan: StepPlan):
        inp = self._decode_inputs(plan.host)
        if plan.graphs:
            return (*self.graphs.run(self.kv_caches, inp, plan.num_steps), None)
        tokens_k, logprobs_k, forced_k, top_k = [], [], [], []
        for _ in range(plan.num_steps):
            tokens, logprobs, *top = decode_step(self.model, self.ops, self.kv_caches, self.block_size, inp, plan.top)
            tokens_k.append(tokens)
            logprobs_k.append(logprobs)
            forced_k.append(inp.state.forced.clone())
            top_k += top
        top = (torch.stack([v for v, _ in top_k]), torch.stack([i for _, i in top_k])) if top_k else None
        return torch.stack(tokens_k), torch.stack(logprobs_k), torch.stack(forced_k), inp.state, top

    @staticmethod
    def _result(
        tokens: torch.Tensor,  # [num_steps, num_seqs]; PAD_TOKEN where a row was already DONE
        logprobs: torch.Tensor,  # float32 [num_steps, num_seqs]
        forced: torch.Tensor,  # int32 [num_steps, num_seqs]
        state: BudgetState,  # after the last step
        top: tuple[torch.Tensor, torch.Tensor] | None = None,  # float32 / int64 [num_steps, num_seqs, k]
    ) -> StepResult:
        """The device-to-host copies of a step or chunk: one for every int, one for the logprobs."""
        num_steps, n = tokens.shape
        state_ints = [state.phase, state.think_count, state.solution_count, state.force_pos, state.forced_end,
                      state.finish]
        ints = torch.cat([tokens.int().t().flatten(), forced.t().flatten(), *state_ints,
                          state.recent.flatten()]).tolist()
        logprob_rows = logprobs.t().tolist()

        def cut(start: int, width: int) -> list[list[int]]:  # n rows of `width` from ints[start:]
            return [ints[start + i * width : start + (i + 1) * width] for i in range(n)]

        tokens_rows, forced_rows = cut(0, num_steps), cut(n * num_steps, num_steps)
        at = 2 * n * num_steps
        phase, think, solution, force_pos, forced_end, finish = (ints[at + j * n : at + (j + 1) * n] for j in range(6))
        recent = cut(at + 6 * n, state.recent.shape[1])
        keep = [[i for i, t in enumerate(row) if t != PAD_TOKEN] for row in tokens_rows]
        return StepResult(
            tokens=[[row[i] for i in idx] for row, idx in zip(tokens_rows, keep)],
            logprobs=[[row[i] for i in idx] for row, idx in zip(logprob_rows, keep)],
            forced=[[row[i] for i in idx] for row, idx in zip(forced_rows, keep)],
            phase=phase,
            think_count=think,
            solution_count=solution,
            force_pos=force_pos,
            recent=recent,
            forced_end=forced_end,
            finish=finish,
            top_logprobs=None if top is None else _top_rows(top, keep),
        )
