"""One decode step over device buffers that it advances in place.

The same function runs a multi-step chunk eagerly (the runner calls it K times on fresh
buffers) and is what a CUDA graph captures (cuda_graphs.py calls it on static buffers), so both
paths share every line of the step: slot lookup, forward, logits, the fused sampler and budget
machine, and the advance of each row's last token, position and context length.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from elastic_decode.kernels import DONE, BudgetState, SamplerParams

from ..models import AttentionBatch, KernelOps, LlamaForCausalLM


@dataclass(frozen=True)
class DecodeInputs:
    """What a decode step reads; the step advances the first three and `state` in place."""

    input_ids: torch.Tensor  # int64 [num_seqs]: each row's last token
    positions: torch.Tensor  # int64 [num_seqs]: that token's position
    context_lens: torch.Tensor  # int32 [num_seqs]: tokens in context, the last one included
    block_tables: torch.Tensor  # int32 [num_seqs, max_blocks]: the chunk's slots already reserved
    params: SamplerParams  # [num_seqs] rows
    state: BudgetState  # [num_seqs] rows, updated in place by the sampler


def decode_step(
    model: LlamaForCausalLM,
    ops: KernelOps,
    kv_caches: list[tuple[torch.Tensor, torch.Tensor]],
    block_size: int,
    inp: DecodeInputs,
    top: int = 0,
    confidence: bool = False,
):
    """Returns (tokens int64 [num_seqs], logprobs float32 [num_seqs]); PAD_TOKEN for DONE rows.
    With `top` > 0 also the `top` most likely tokens of each row's raw distribution:
    (tokens, logprobs, (values float32 [num_seqs, top], ids int64 [num_seqs, top])). With `confidence` the
    sampler also writes each row's token confidence to inp.state.confidence.

    Rows already DONE write no KV (slot -1) and keep their position, so every read stays
    inside KV that was written; rows that finish in this step stop advancing.
    """
    n = inp.input_ids.shape[0]
    rows = torch.arange(n, device=inp.input_ids.device)
    alive = inp.state.phase != DONE  # bool [num_seqs]
    last_block = inp.block_tables.shape[1] - 1
    block = inp.block_tables[rows, (inp.positions // block_size).clamp(max=last_block)].long()  # [num_seqs]
    slot_mapping = torch.where(alive, block * block_size + inp.positions % block_size, -1)  # int64 [num_seqs]
    attn = AttentionBatch(
        is_prefill=False,
        slot_mapping=slot_mapping,
        block_tables=inp.block_tables,
        context_lens=inp.context_lens,
        cu_seqlens_q=None,
        max_new_tokens=1,
    )
    hidden = model(inp.input_ids, inp.positions, kv_caches, attn, ops)  # [num_seqs, hidden]
    logits = model.compute_logits(hidden, ops)  # [num_seqs, vocab]
    alternatives = top_logprobs(logits, top) if top else None
    tokens, logprobs = ops.sample_with_budget(logits, inp.params, inp.state, confidence=confidence)
    live = inp.state.phase != DONE  # bool [num_seqs]: rows that go on
    inp.input_ids.copy_(torch.where(live, tokens, inp.input_ids))
    inp.positions.add_(live.long())
    inp.context_lens.add_(live.int())
    return (tokens, logprobs) if alternatives is None else (tokens, logprobs, alternatives)


def top_logprobs(logits: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The k most likely tokens of each row under log_softmax(logits): (values [rows, k], ids [rows, k])."""
    values, ids = torch.log_softmax(logits.float(), dim=-1).topk(k, dim=-1)
    return values, ids
