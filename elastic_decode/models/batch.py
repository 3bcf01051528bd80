"""What a model forward receives besides token ids: the attention metadata and the ops.

Passed down as arguments (no global context object): the runner builds one AttentionBatch
per step and never mutates it.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class AttentionBatch:
    is_prefill: bool
    slot_mapping: torch.Tensor  # int64 [num_tokens]; cache slot of each new token
    block_tables: torch.Tensor  # int32 [num_seqs, max_blocks_per_seq]
    context_lens: torch.Tensor  # int32 [num_seqs]; tokens in context incl. the new ones
    cu_seqlens_q: torch.Tensor | None  # int32 [num_seqs + 1]; prefill only
    max_new_tokens: int  # longest run of new tokens of one sequence in this step (host side: no sync)


@dataclass(frozen=True)
class KernelOps:
    """One implementation of each kernel contract (Triton or the torch reference)."""

    name: str
    rope_write_kv: Callable  # RoPE on q and k (+ Qwen3's head norms), k and v into the cache; returns q
    paged_decode_attention: Callable
    paged_prefill_attention: Callable
    sample_with_budget: Callable
    rms_norm: Callable  # (x, weight, eps, residual=None) -> normed, or (normed, x + residual)
    silu_mul: Callable  # (gate, up) -> silu(gate) * up
    # (x, weight, bias=None) -> F.linear's result: the vendor BLAS (cuBLAS, the CPU's) unless a
    # backend has a better way to call it (the CPU backend's packed weights, kernels/cpu.py)
    linear: Callable = F.linear
    # The same for the LM head's GEMM; None: `linear`. (Weight-only int4 gives the head 8 bits, not 4:
    # 4 bits there cost far more accuracy than in all the layers, benchmarks/quant_agreement.py.)
    logits_linear: Callable | None = None
    # (weights, logits_weights) -> None: make the weights `linear` and `logits_linear` will be given ready
    # before the first request (the CPU backend packs them, so no request pays for it); called at load and
    # after a weight update
    prepare_linear: Callable = lambda weights, logits_weights: None
    # (model, x, positions, rope, kv_caches, batch) -> (x, residual) after all the decoder layers in one
    # call, the per-op forward's numbers, or None where it does not take this model or batch (the per-op
    # forward runs); None: never (the CPU backend's int4 decode steps, kernels/cpu.py)
    decode_layers: Callable | None = None
