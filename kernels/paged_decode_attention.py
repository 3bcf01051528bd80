"""paged_decode_attention: one query token per sequence over its paged K/V context.

GQA-aware: one program handles all the query heads that share a KV head, so each K/V tile is
read from memory once for the whole group (the query group is padded to 16 rows, the minimum
tl.dot tile, as vLLM's unified attention does). Long contexts with few sequences are split
along the context (flash-decoding): each split writes a partial output with its running max
and sum, and a second kernel merges the splits by their log-sum-exp. Each loop iteration
covers a tile of TILE tokens that may span several cache blocks (each token's block looked up
in the table). Softmax statistics and accumulation are fp32 whatever the input dtype.

Layout: q [num_seqs, num_q_heads, head_dim]; k_cache/v_cache [num_blocks, block_size,
num_kv_heads, head_dim]; block_tables int32 [num_seqs, max_blocks]; context_lens int32 [num_seqs].
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .paged_checks import check_paged_attention_inputs

# Tokens per loop iteration: several cache blocks per K/V tile, looked up token by token, so
# each iteration has enough loads in flight however small the blocks (vLLM's unified attention
# tiles the same way). Unmeasured default; bench_kernels.py sweeps it.
DEFAULT_TILE = 64
# A split covers whole tiles of its own sequence's context; below this many tokens per split
# (judged on the longest context), splitting does not pay.
MIN_TOKENS_PER_SPLIT = 256
MAX_SPLITS = 32


@triton.jit
def _decode_kernel(
    q_ptr,  # [num_seqs, num_q_heads, HEAD_DIM]
    k_cache_ptr,  # [num_blocks, BLOCK_SIZE, num_kv_heads, HEAD_DIM]
    v_cache_ptr,
    block_tables_ptr,  # int32 [num_seqs, max_blocks]
    context_lens_ptr,  # int32 [num_seqs]
    out_ptr,  # [num_seqs, num_q_heads, HEAD_DIM] (one split) or partials [num_seqs, num_q_heads, NUM_SPLITS, HEAD_DIM]
    m_ptr,  # fp32 [num_seqs, num_q_heads, NUM_SPLITS]: running max (split mode only)
    l_ptr,  # fp32 [num_seqs, num_q_heads, NUM_SPLITS]: running sum (split mode only)
    scale,
    max_blocks,  # block_tables row stride
    num_kv_heads,
    GROUP: tl.constexpr,  # query heads per KV head
    GROUP_PAD: tl.constexpr,  # GROUP padded to >= 16 and a power of two
    HEAD_DIM: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,  # tokens per cache block
    TILE: tl.constexpr,  # tokens per loop iteration: a multiple of BLOCK_SIZE, >= 16 (tl.dot)
    NUM_SPLITS: tl.constexpr,
    IEEE: tl.constexpr,  # fp32 inputs: exact fp32 dot instead of tf32
):
    seq = tl.program_id(0)
    kv_head = tl.program_id(1)
    split = tl.program_id(2)
    num_q_heads = num_kv_heads * GROUP
    ctx = tl.load(context_lens_ptr + seq)
    # Each sequence splits its own context evenly (whole tiles), whatever the batch's longest.
    per_split = tl.cdiv(tl.cdiv(ctx, NUM_SPLITS), TILE) * TILE
    first = split * per_split  # this split's first token
    last = tl.minimum(first + per_split, ctx)  # one past its last token

    g = tl.arange(0, GROUP_PAD)  # [GROUP_PAD] query rows of this group
    d = tl.arange(0, HEAD_DIM)  # [HEAD_DIM]
    t = tl.arange(0, TILE)  # [TILE] tokens of a tile (TILE // BLOCK_SIZE cache blocks)
    head = kv_head * GROUP + g  # [GROUP_PAD]
    g_mask = g < GROUP
    q = tl.load(q_ptr + (seq.to(tl.int64) * num_q_heads + head[:, None]) * HEAD_DIM + d[None, :],
                mask=g_mask[:, None], other=0.0)  # [GROUP_PAD, HEAD_DIM]

    m = tl.full([GROUP_PAD], float("-inf"), tl.float32)
    l = tl.zeros([GROUP_PAD], tl.float32)
    acc = tl.zeros([GROUP_PAD, HEAD_DIM], tl.float32)
    row_stride = num_kv_heads * HEAD_DIM  # elements between tokens in the cache
    table = block_tables_ptr + seq.to(tl.int64) * max_blocks
    for start in range(first, last, TILE):
        pos = start + t  # [TILE]
        valid = pos < last
        block = tl.load(table + pos // BLOCK_SIZE, mask=valid, other=0).to(tl.int64)  # [TILE] each token's block
        slot = block * BLOCK_SIZE + pos % BLOCK_SIZE  # [TILE]
        offs = slot[:, None] * row_stride + kv_head * HEAD_DIM + d[None, :]  # [TILE, HEAD_DIM]
        k = tl.load(k_cache_ptr + offs, mask=valid[:, None], other=0.0)  # [TILE, HEAD_DIM]
        v = tl.load(v_cache_ptr + offs, mask=valid[:, None], other=0.0)
        if IEEE:
            s = tl.dot(q, tl.trans(k), input_precision="ieee")  # [GROUP_PAD, TILE]
        else:
            s = tl.dot(q, tl.trans(k))
        s = tl.where(valid[None, :], s * scale, float("-inf"))
        m_new = tl.maximum(m, tl.max(s, axis=1))
        alpha = tl.exp(m - m_new)
        p = tl.exp(s - m_new[:, None])  # [GROUP_PAD, TILE]
        l = l * alpha + tl.sum(p, axis=1)
        if IEEE:
            acc = acc * alpha[:, None] + tl.dot(p, v.to(tl.float32), input_precision="ieee")
        else:
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
        m = m_new

    if NUM_SPLITS == 1:
        o = acc / l[:, None]
        tl.store(out_ptr + (seq.to(tl.int64) * num_q_heads + head[:, None]) * HEAD_DIM + d[None, :],
                 o.to(out_ptr.dtype.element_ty), mask=g_mask[:, None])
    else:
        stat = (seq.to(tl.int64) * num_q_heads + head) * NUM_SPLITS + split  # [GROUP_PAD]
        tl.store(out_ptr + stat[:, None] * HEAD_DIM + d[None, :], acc, mask=g_mask[:, None])
        tl.store(m_ptr + stat, m, mask=g_mask)
        tl.store(l_ptr + stat, l, mask=g_mask)


@triton.jit
def _merge_splits_kernel(
    partial_ptr,  # fp32 [num_seqs * num_q_heads, NUM_SPLITS, HEAD_DIM]: unnormalised sums
    m_ptr,  # fp32 [num_seqs * num_q_heads, NUM_SPLITS]
    l_ptr,  # fp32 [num_seqs * num_q_heads, NUM_SPLITS]
    out_ptr,  # [num_seqs * num_q_heads, HEAD_DIM]
    NUM_SPLITS: tl.constexpr,
    HEAD_DIM: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)  # one (sequence, query head)
    s = tl.arange(0, NUM_SPLITS)
    d = tl.arange(0, HEAD_DIM)
    m = tl.load(m_ptr + row * NUM_SPLITS + s)  # [NUM_SPLITS]; -inf for empty splits
    l = tl.load(l_ptr + row * NUM_SPLITS + s)
    m_all = tl.max(m, axis=0)
    w = tl.where(m > float("-inf"), tl.exp(m - m_all), 0.0)  # [NUM_SPLITS]
    acc = tl.load(partial_ptr + (row * NUM_SPLITS + s[:, None]) * HEAD_DIM + d[None, :])  # [NUM_SPLITS, HEAD_DIM]
    o = tl.sum(acc * w[:, None], axis=0) / tl.sum(l * w, axis=0)
    tl.store(out_ptr + row * HEAD_DIM + d, o.to(out_ptr.dtype.element_ty))


def choose_num_splits(num_seqs: int, num_kv_heads: int, max_context_len: int, block_size: int,
                      num_sms: int) -> int:
    """Split the context only when there are too few (sequence, KV head) programs to fill the GPU."""
    programs = num_seqs * num_kv_heads
    if programs >= num_sms:
        return 1
    by_length = max(1, max_context_len // MIN_TOKENS_PER_SPLIT)
    wanted = triton.cdiv(2 * num_sms, programs)  # about two waves of programs
    splits = min(MAX_SPLITS, by_length, triton.next_power_of_2(wanted))
    return 1 << (splits.bit_length() - 1)  # a power of two (the merge kernel's tile)


def paged_decode_attention(
    q: torch.Tensor,  # [num_seqs, num_q_heads, head_dim]
    k_cache: torch.Tensor,  # [num_blocks, block_size, num_kv_heads, head_dim]
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,  # int32 [num_seqs, max_blocks]
    context_lens: torch.Tensor,  # int32 [num_seqs]
    scale: float,
    out: torch.Tensor | None = None,  # [num_seqs, num_q_heads, head_dim]
    *,
    max_context_len: int | None = None,  # known on the host: avoids a device sync
    num_splits: int | None = None,  # None: chosen from the shapes
    tile: int | None = None,  # tokens per loop iteration; None: DEFAULT_TILE (at least one block)
) -> torch.Tensor:
    num_seqs, num_q_heads, head_dim = q.shape
    block_size, num_kv_heads = check_paged_attention_inputs(
        q, k_cache, v_cache, block_tables=block_tables, context_lens=context_lens)
    q = q.contiguous()
    block_tables = block_tables.contiguous()
    if out is None:
        out = torch.empty_like(q)
    if num_seqs == 0:
        return out
    group = num_q_heads // num_kv_heads
    if num_splits is None:
        if max_context_len is None:
            max_context_len = int(context_lens.max().item())
        sms = torch.cuda.get_device_properties(q.device).multi_processor_count if q.is_cuda else 1
        num_splits = choose_num_splits(num_seqs, num_kv_heads, max_context_len, block_size, sms)
    if num_splits < 1 or num_splits & (num_splits - 1):
        raise ValueError(f"num_splits must be a power of two, got {num_splits}")
    tile = max(tile or DEFAULT_TILE, block_size, 16)
    if tile & (tile - 1):
        raise ValueError(f"tile must be a power of two, got {tile}")
    meta = dict(
        scale=scale, max_blocks=block_tables.shape[1], num_kv_heads=num_kv_heads,
        GROUP=group, GROUP_PAD=max(16, triton.next_power_of_2(group)), HEAD_DIM=head_dim,
        BLOCK_SIZE=block_size, TILE=tile, NUM_SPLITS=num_splits, IEEE=q.dtype == torch.float32,
    )
    grid = (num_seqs, num_kv_heads, num_splits)
    if num_splits == 1:
        _decode_kernel[grid](q, k_cache, v_cache, block_tables, context_lens, out, out, out, **meta)
        return out
    partial = torch.empty(num_seqs, num_q_heads, num_splits, head_dim, dtype=torch.float32, device=q.device)
    m = torch.empty(num_seqs, num_q_heads, num_splits, dtype=torch.float32, device=q.device)
    l = torch.empty_like(m)
    _decode_kernel[grid](q, k_cache, v_cache, block_tables, context_lens, partial, m, l, **meta)
    _merge_splits_kernel[(num_seqs * num_q_heads,)](partial, m, l, out, NUM_SPLITS=num_splits, HEAD_DIM=head_dim)
    return out
