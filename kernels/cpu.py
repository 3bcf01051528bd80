"""The C++ CPU kernels (csrc/cpu_attention.cpp, in elastic_decode._C) under the op contracts.

Paged decode and prefill attention for CPU tensors: one work item per (sequence, kv head) for decode
and per (sequence, tile of 16 new tokens, kv head) for prefill, each reading a K/V block once for
every query head of its GQA group, an online softmax in fp32, threads from torch's intra-op pool,
AVX-512 / AVX2 / baseline code chosen at load time. The CPU backend (backend.py) selects the decode
kernel; the prefill kernel is tested and measured (`make microbench`) but so far slower than the
reference's batched GEMMs, so the reference keeps prefill and every other op, and stays the oracle.
"""
from __future__ import annotations

import torch

try:
    from elastic_decode import _C

    HAVE_CPU_KERNELS = hasattr(_C, "paged_decode_attention")
except ImportError:  # the extension is not built (an uninstalled checkout)
    HAVE_CPU_KERNELS = False


def _heads_contiguous(q: torch.Tensor) -> torch.Tensor:
    return q if q.stride(2) == 1 and q.stride(1) == q.shape[2] else q.contiguous()


def paged_decode_attention(
    q: torch.Tensor,  # [num_seqs, num_q_heads, head_dim]
    k_cache: torch.Tensor,  # [num_blocks, block_size, num_kv_heads, head_dim]
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,  # int32 [num_seqs, max_blocks_per_seq]
    context_lens: torch.Tensor,  # int32 [num_seqs]; the query sits at position len - 1
    scale: float,
    out: torch.Tensor | None = None,
    *,
    max_context_len: int | None = None,  # the contract's host hint: not needed here
    num_splits: int | None = None,  # the contract's split-KV: not used on CPU
) -> torch.Tensor:
    result = _C.paged_decode_attention(_heads_contiguous(q), k_cache, v_cache,
                                       block_tables.contiguous(), context_lens, scale)
    if out is None:
        return result
    out.copy_(result)
    return out


def paged_prefill_attention(
    q: torch.Tensor,  # [num_tokens, num_q_heads, head_dim], packed new tokens
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,  # int32 [num_seqs, max_blocks_per_seq]
    cu_seqlens_q: torch.Tensor,  # int32 [num_seqs + 1]
    context_lens: torch.Tensor,  # int32 [num_seqs]; new tokens are the last rows of the context
    scale: float,
    out: torch.Tensor | None = None,
    *,
    max_new_tokens: int | None = None,  # the contract's host hint: not needed here
) -> torch.Tensor:
    result = _C.paged_prefill_attention(_heads_contiguous(q), k_cache, v_cache,
                                        block_tables.contiguous(), cu_seqlens_q, context_lens, scale)
    if out is None:
        return result
    out.copy_(result)
    return out
