"""Turns a scheduled batch into tensors, runs the model and the fused sampler, returns a StepResult.

One step = one forward (packed prefill or one token per sequence) + one `sample_with_budget`
launch over the batch's last-position logits; the budget machine advances on the device.
A decode chunk runs `batch.num_steps` such steps back to back (decode_step.py): each step's
tokens feed the next step's forward, positions and context lengths advance on the device, and
the host reads the chunk's tokens and the final budget state back once (multi-step scheduling
as in vLLM's `num_scheduler_steps`; here the budgets make every sequence's room known ahead).
The decode rows stay resident on the device between chunks (device_batch.py): a chunk sends only
the rows that joined or left and the new block-table entries. With CUDA graphs on, each step of a
chunk is a replay of the graph captured for the batch's size bucket (cuda_graphs.py), on those
same resident rows.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch

from elastic_decode.kernels import DONE, PAD_TOKEN, BudgetState, SamplerParams

from ..core.sequence import Sequence
from ..core.step import ScheduledBatch, StepResult
from ..models import AttentionBatch, KernelOps, LlamaForCausalLM
from .cuda_graphs import DecodeGraphs, capture_or_eager
from .decode_step import decode_step, top_logprobs
from .device_batch import BatchUpdate, DeviceBatch, HostFields, RowPlanner, sampler_fields, upload


PROMPT_LOGITS_ROWS = 256  # prompt positions whose logits are computed at once for prompt logprobs


def allocate_kv_caches(model: LlamaForCausalLM, num_blocks: int, block_size: int) -> list[tuple[torch.Tensor, ...]]:
    """Every layer's (k_cache, v_cache) of `num_blocks` blocks (this rank's kv heads)."""
    spec, weight = model.spec, model.model.norm.weight
    shape = (num_blocks, block_size, model.kv_heads, spec.head_dim)
    return [(torch.zeros(shape, dtype=weight.dtype, device=weight.device),
             torch.zeros(shape, dtype=weight.dtype, device=weight.device)) for _ in range(spec.num_layers)]


@dataclass(frozen=True)
class StepPlan:
    """One step or decode chunk as host values: what rank 0 sends the tensor-parallel workers."""

    is_prefill: bool
    host: HostFields | None  # prefill: the packed inputs, uploaded by `upload`
    update: BatchUpdate | None  # decode: what changed in the resident rows
    num_steps: int
    graphs: bool  # replay the CUDA graphs (decode, where the batch fits them)
    top: int = 0  # alternatives per token to return (the most any sequence asked for); off the graphs
    recent_width: int = 1  # columns of the thinking window to read back (the batch's longest marker)
    confidence: bool = False  # compute token confidences (a sequence asked for them); off the graphs
    # prefill: (sequence, its first packed row, its rows, alternatives) of the sequences whose prompt logprobs
    # are asked for (their prompt is computed whole: no cached prefix)
    prompt_rows: tuple[tuple[int, int, int, int], ...] = ()


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
        self.batch = DeviceBatch(self.device)  # the decode rows, resident across chunks
        self.rows = RowPlanner()  # which sequence owns which row (rank 0's planning only)
        if graphs is not None:
            graphs.reserve(self.batch)

    # -- what the runner owns: the KV cache, the graphs, the weights' prepared form -------------------

    @property
    def sleeping(self) -> bool:
        return not self.kv_caches

    def free_kv_cache(self) -> None:
        """Drop the KV cache (its memory goes back when nothing else holds it); the graphs, which point at
        it, go with it and are captured again on first use after `allocate_kv_cache`."""
        self.kv_caches = []
        if self.graphs is not None:
            self.graphs.reset()

    def allocate_kv_cache(self, num_blocks: int) -> None:
        self.kv_caches = allocate_kv_caches(self.model, num_blocks, self.block_size)

    def prepare_weights(self) -> None:
        """Make the weights ready for the ops' GEMMs (at load and after every update in place)."""
        self.ops.prepare_linear(*self.model.linear_weights())

    def capture_graphs(self) -> bool:
        """Capture every bucket's CUDA graph now (start-up, largest first); a capture that fails leaves the
        runner decoding eagerly, with one warning. Returns whether graphs are on."""
        graphs = self.graphs
        if graphs is not None and not capture_or_eager(lambda: graphs.capture_buckets(self.kv_caches, self.batch)):
            graphs.release()
            self.graphs = None
        return self.graphs is not None

    # -- inputs -----------------------------------------------------------------------

    @staticmethod
    def _block_table_rows(seqs: tuple[Sequence, ...]) -> tuple[torch.dtype, list[int], tuple[int, int]]:
        width = max(len(s.block_table) for s in seqs)
        flat = [b for s in seqs for b in s.block_table + [0] * (width - len(s.block_table))]
        return torch.int32, flat, (len(seqs), width)

    @staticmethod
    def _sampler_inputs(dev: dict[str, torch.Tensor]) -> tuple[SamplerParams, BudgetState]:
        return SamplerParams.take(dev), BudgetState.take(dev)

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
            **sampler_fields(seqs),
        }

    def _prepare_prefill(self, host: dict):
        dev = upload(host, self.device)
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
        confidence = any(s.params.wants_confidence for s in batch.seqs)
        if batch.is_prefill:
            top = max(s.params.logprobs for s in batch.seqs)
            host = self._prefill_host(batch.seqs)
            cu = host["cu_seqlens_q"][1]
            prompt_rows = tuple((i, cu[i], cu[i + 1] - cu[i], s.params.prompt_logprobs) for i, s in enumerate(batch.seqs)
                                if s.params.prompt_logprobs is not None and s.prompt_logprobs is None)
            return StepPlan(True, host, None, 1, False, top, max(len(s.marker) for s in batch.seqs),
                            confidence=confidence, prompt_rows=prompt_rows)
        update, rows = self.rows.update(batch.seqs), self.rows  # the rows know the batch's top and marker width
        graphs = not rows.top and not confidence and self.graphs is not None and self.graphs.fits(len(batch.seqs))
        return StepPlan(False, None, update, batch.num_steps, graphs, rows.top, rows.marker_width,
                        confidence=confidence)

    def run(self, batch: ScheduledBatch) -> StepResult:
        try:
            plan = self.plan(batch)
            if self.workers is not None:
                self.workers.send(("step", plan))  # the other ranks run the same plan
            *step, prompt = self.execute(plan)
            result = self._result(*step, recent_width=plan.recent_width)
            if prompt:
                result = dataclasses.replace(result, prompt_logprobs=prompt)
        except BaseException:
            self.rows = RowPlanner()  # the device rows are in doubt: the next chunk writes them all again
            raise
        if not batch.is_prefill:  # finished rows are free from now on (the next update fills or pads them)
            self.rows.release([s for s, phase in zip(batch.seqs, result.phase) if phase == DONE])
        return result

    @torch.inference_mode()
    def execute(self, plan: StepPlan):
        """Run a plan: (tokens [steps, seqs], logprobs, forced, confidence, final budget state, top alternatives
        ((values, ids) [steps, seqs, top]) or None, prompt logprobs (host values) or None) on the device, in
        the batch's order."""
        if not plan.is_prefill:
            return *self._run_decode(plan), None
        input_ids, positions, attn, logits_rows, params, state = self._prepare_prefill(plan.host)
        hidden = self.model(input_ids, positions, self.kv_caches, attn, self.ops)  # [num_tokens, hidden]
        prompt = self._prompt_logprobs(hidden, input_ids, plan.prompt_rows) if plan.prompt_rows else None
        logits = self.model.compute_logits(hidden[logits_rows], self.ops)  # [num_seqs, vocab]
        top = top_logprobs(logits, plan.top) if plan.top else None
        tokens, logprobs = self.ops.sample_with_budget(logits, params, state, confidence=plan.confidence)
        return tokens[None], logprobs[None], state.forced[None], state.confidence[None] if plan.confidence else None, \
            state, \
            None if top is None else (top[0][None], top[1][None]), prompt

    def _prompt_logprobs(self, hidden: torch.Tensor, input_ids: torch.Tensor, rows) -> dict:
        """{sequence: (logprobs [None, then one per prompt token], alternatives per token)}: each prompt token's
        logprob under the raw distribution given the tokens before it, the logits computed a slice at a time
        (a [prompt, vocab] block at once would be gigabytes for a long prompt and a large vocabulary)."""
        out = {}
        for i, start, count, k in rows:
            values, alternatives = [], []
            for a in range(start, start + count - 1, PROMPT_LOGITS_ROWS):
                b = min(a + PROMPT_LOGITS_ROWS, start + count - 1)
                logp = torch.log_softmax(self.model.compute_logits(hidden[a:b], self.ops).float(), dim=-1)
                values += logp.gather(1, input_ids[a + 1 : b + 1, None]).squeeze(1).tolist()
                if k:
                    v, ids = logp.topk(k, dim=-1)
                    alternatives += [list(zip(r_ids, r_v)) for r_ids, r_v in zip(ids.tolist(), v.tolist())]
            out[i] = ([None, *values], [[], *alternatives] if k else None)
        return out

    def _run_decode(self, plan: StepPlan):
        self.batch.apply(plan.update)
        n = plan.update.n
        if plan.graphs:
            tokens, logprobs, forced, state = self.graphs.run(self.kv_caches, self.batch, n, plan.num_steps)
            confidence = None  # the graphs are captured without it (a batch that wants it runs eagerly)
            top = None
        else:
            inp = self.batch.view(n)
            tokens_k, logprobs_k, forced_k, confidence_k, top_k = [], [], [], [], []
            for _ in range(plan.num_steps):
                tokens, logprobs, *alternatives = decode_step(self.model, self.ops, self.kv_caches, self.block_size,
                                                              inp, plan.top, plan.confidence)
                tokens_k.append(tokens)
                logprobs_k.append(logprobs)
                forced_k.append(inp.state.forced.clone())
                if plan.confidence:
                    confidence_k.append(inp.state.confidence.clone())
                top_k += alternatives
            tokens, logprobs, forced = torch.stack(tokens_k), torch.stack(logprobs_k), torch.stack(forced_k)
            confidence = torch.stack(confidence_k) if confidence_k else None
            top = (torch.stack([v for v, _ in top_k]), torch.stack([i for _, i in top_k])) if top_k else None
            state = inp.state
        perm = self.batch.perm  # rows -> batch order (None: the rows are in batch order)
        if perm is not None:
            tokens, logprobs, forced = tokens[:, perm], logprobs[:, perm], forced[:, perm]
            confidence = None if confidence is None else confidence[:, perm]
            state = state.map(lambda t: t[perm])
            top = None if top is None else (top[0][:, perm], top[1][:, perm])
        return tokens, logprobs, forced, confidence, state, top

    @staticmethod
    def _result(
        tokens: torch.Tensor,  # [num_steps, num_seqs]; PAD_TOKEN where a row was already DONE
        logprobs: torch.Tensor,  # float32 [num_steps, num_seqs]
        forced: torch.Tensor,  # int32 [num_steps, num_seqs]
        confidence: torch.Tensor | None,  # float32 [num_steps, num_seqs], when computed
        state: BudgetState,  # after the last step
        top: tuple[torch.Tensor, torch.Tensor] | None = None,  # float32 / int64 [num_steps, num_seqs, k]
        recent_width: int | None = None,  # the thinking window's last columns to read (default: all)
    ) -> StepResult:
        """The device-to-host copies of a step or chunk: one for every int, one for the logprobs and confidences. A row
        emits PAD_TOKEN only after it is DONE, so each row's tokens are the ones before its first PAD_TOKEN."""
        num_steps, n = tokens.shape
        recent = state.recent[:, -recent_width:] if recent_width else state.recent
        # The one copy of every int; the rest is numpy on the host (cheaper than a torch op per field).
        ints = torch.cat([tokens.int().flatten(), forced.flatten(), state.phase, state.think_count,
                          state.solution_count, state.force_pos, state.forced_end, state.finish,
                          recent.flatten()]).cpu().numpy()
        floats = (logprobs[None] if confidence is None else torch.stack([logprobs, confidence])).cpu().numpy()
        logprob_rows = floats[0].T.tolist()
        confidence_rows = floats[1].T.tolist() if confidence is not None else None
        at = 2 * n * num_steps
        steps_tokens = ints[: n * num_steps].reshape(num_steps, n)
        counts = (steps_tokens != PAD_TOKEN).sum(0).tolist()  # [num_seqs]
        phase, think, solution, force_pos, forced_end, finish = ints[at : at + 6 * n].reshape(6, n).tolist()
        tokens_rows = steps_tokens.T.tolist()
        forced_rows = ints[n * num_steps : at].reshape(num_steps, n).T.tolist()
        if min(counts, default=num_steps) < num_steps:  # rows that finished inside the chunk: drop their padding

            def cut(rows: list[list]) -> list[list]:
                return [row if c == num_steps else row[:c] for row, c in zip(rows, counts)]

            tokens_rows, forced_rows, logprob_rows = cut(tokens_rows), cut(forced_rows), cut(logprob_rows)
            confidence_rows = cut(confidence_rows) if confidence_rows is not None else None
        return StepResult(
            tokens=tokens_rows,
            logprobs=logprob_rows,
            forced=forced_rows,
            phase=phase,
            think_count=think,
            solution_count=solution,
            force_pos=force_pos,
            recent=ints[at + 6 * n :].reshape(n, recent.shape[1]).tolist(),
            forced_end=forced_end,
            finish=finish,
            top_logprobs=None if top is None else _top_rows(top, counts),
            confidence=confidence_rows,
        )


def _top_rows(top: tuple[torch.Tensor, torch.Tensor], counts: list[int]) -> list:
    """Per sequence, per emitted step (padding of DONE rows dropped): [(token id, raw logprob)]."""
    values = top[0].transpose(0, 1).tolist()  # [num_seqs][num_steps][k]
    ids = top[1].transpose(0, 1).tolist()
    return [[list(zip(ids[i][s], values[i][s])) for s in range(c)] for i, c in enumerate(counts)]
