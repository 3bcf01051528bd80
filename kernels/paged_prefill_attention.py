"""paged_prefill_attention: causal attention of packed new tokens over their paged context.

Sequence i owns query rows cu_seqlens_q[i]:cu_seqlens_q[i+1], which are the LAST rows of its
context_lens[i] tokens; the tokens before them (a cached prefix, or earlier tokens of a
preempted sequence) are already in the cache, as are the new ones (rope_write_kv runs first).
One program per (sequence, tile of BLOCK_M new tokens, query head) walks the context in
BLOCK_N-token tiles with an online softmax (flash-attention), stopping at the causal edge of
its tile; each token's cache row is found through the block table, so a tile may span blocks.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .device_guard import on_tensor_device
from .paged_checks import check_paged_attention_inputs

BLOCK_M = 16  # new tokens per program
BLOCK_N = 32  # context tokens per inner step
# fp32 inputs take the exact (non-tensor-core) dot, which holds more per thread: at 32, triton 3.6 (the GPU
# machines' version) spills on sm_90 at head_dim 128; at 16, 80 registers and no spill (kernels/aot.py).
BLOCK_N_FP32 = 16


@triton.jit(do_not_specialize=["max_blocks"])  # the block table's width varies per batch
def _prefill_kernel(
    q_ptr,  # [num_tokens, num_q_heads, HEAD_DIM]
    k_cache_ptr,  # [num_blocks, BLOCK_SIZE, num_kv_heads, HEAD_DIM]
    v_cache_ptr,
    block_tables_ptr,  # int32 [num_seqs, max_blocks]
    cu_seqlens_ptr,  # int32 [num_seqs + 1]
    context_lens_ptr,  # int32 [num_seqs]
    out_ptr,  # [num_tokens, num_q_heads, HEAD_DIM]
    scale,
    max_blocks,
    num_q_heads,
    GROUP: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    IEEE: tl.constexpr,
):
    seq = tl.program_id(0)
    tile = tl.program_id(1)
    head = tl.program_id(2)
    q_start = tl.load(cu_seqlens_ptr + seq)
    n_new = tl.load(cu_seqlens_ptr + seq + 1) - q_start
    if tile * BLOCK_M >= n_new:
        return
    ctx = tl.load(context_lens_ptr + seq)
    prefix = ctx - n_new  # context tokens before the first new one
    kv_head = head // GROUP
    num_kv_heads = num_q_heads // GROUP

    r = tile * BLOCK_M + tl.arange(0, BLOCK_M)  # [BLOCK_M] new-token index within the sequence
    r_mask = r < n_new
    d = tl.arange(0, HEAD_DIM)
    rows = (q_start + r).to(tl.int64)  # [BLOCK_M] packed rows
    q = tl.load(q_ptr + (rows[:, None] * num_q_heads + head) * HEAD_DIM + d[None, :],
                mask=r_mask[:, None], other=0.0)  # [BLOCK_M, HEAD_DIM]
    q_pos = prefix + r  # [BLOCK_M] absolute positions

    m = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], tl.float32)
    end = tl.minimum(prefix + (tile + 1) * BLOCK_M, ctx)  # causal edge of this tile
    row_stride = num_kv_heads * HEAD_DIM
    for start in range(0, end, BLOCK_N):
        pos = start + tl.arange(0, BLOCK_N)  # [BLOCK_N] context positions
        valid = pos < end
        block = tl.load(block_tables_ptr + seq.to(tl.int64) * max_blocks + pos // BLOCK_SIZE,
                        mask=valid, other=0).to(tl.int64)  # [BLOCK_N]
        slot = block * BLOCK_SIZE + pos % BLOCK_SIZE
        offs = slot[:, None] * row_stride + kv_head * HEAD_DIM + d[None, :]  # [BLOCK_N, HEAD_DIM]
        k = tl.load(k_cache_ptr + offs, mask=valid[:, None], other=0.0)
        v = tl.load(v_cache_ptr + offs, mask=valid[:, None], other=0.0)
        if IEEE:
            s = tl.dot(q, tl.trans(k), input_precision="ieee")  # [BLOCK_M, BLOCK_N]
        else:
            s = tl.dot(q, tl.trans(k))
        visible = valid[None, :] & (pos[None, :] <= q_pos[:, None])
        s = tl.where(visible, s * scale, float("-inf"))
        m_new = tl.maximum(m, tl.max(s, axis=1))
        # Rows past n_new see nothing: keep their statistics finite.
        m_safe = tl.where(m_new > float("-inf"), m_new, 0.0)
        alpha = tl.exp(m - m_safe)
        p = tl.exp(s - m_safe[:, None])
        l = l * alpha + tl.sum(p, axis=1)
        if IEEE:
            acc = acc * alpha[:, None] + tl.dot(p, v.to(tl.float32), input_precision="ieee")
        else:
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
        m = m_new
    o = acc / tl.where(l > 0, l, 1.0)[:, None]
    tl.store(out_ptr + (rows[:, None] * num_q_heads + head) * HEAD_DIM + d[None, :],
             o.to(out_ptr.dtype.element_ty), mask=r_mask[:, None])


@on_tensor_device
def paged_prefill_attention(
    q: torch.Tensor,  # [num_tokens, num_q_heads, head_dim]
    k_cache: torch.Tensor,  # [num_blocks, block_size, num_kv_heads, head_dim]
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,  # int32 [num_seqs, max_blocks]
    cu_seqlens_q: torch.Tensor,  # int32 [num_seqs + 1]
    context_lens: torch.Tensor,  # int32 [num_seqs]
    scale: float,
    out: torch.Tensor | None = None,
    *,
    max_new_tokens: int | None = None,  # longest new-token run, if known on the host
) -> torch.Tensor:
    num_tokens, num_q_heads, head_dim = q.shape
    block_size, num_kv_heads = check_paged_attention_inputs(
        q, k_cache, v_cache, block_tables=block_tables, cu_seqlens_q=cu_seqlens_q, context_lens=context_lens)
    q = q.contiguous()
    block_tables = block_tables.contiguous()
    if out is None:
        out = torch.empty_like(q)
    num_seqs = context_lens.shape[0]
    if num_tokens == 0 or num_seqs == 0:
        return out
    if max_new_tokens is None:
        max_new_tokens = int((cu_seqlens_q[1:] - cu_seqlens_q[:-1]).max().item())
    grid = (num_seqs, triton.cdiv(max_new_tokens, BLOCK_M), num_q_heads)
    _prefill_kernel[grid](
        q, k_cache, v_cache, block_tables, cu_seqlens_q, context_lens, out,
        scale=scale, max_blocks=block_tables.shape[1], num_q_heads=num_q_heads,
        GROUP=num_q_heads // num_kv_heads, HEAD_DIM=head_dim, BLOCK_SIZE=block_size,
        BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N_FP32 if q.dtype == torch.float32 else BLOCK_N, IEEE=q.dtype == torch.float32,
    )
    return out
