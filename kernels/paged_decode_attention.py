"""paged_decode_attention: one query token per sequence over its paged K/V context.

GQA-aware: one program handles all the query heads that share a KV head, so each K/V tile is
read from memory once for the whole group (the query group is padded to 16 rows, the minimum
tl.dot tile, as vLLM's unified attention does). Long contexts with few sequences are split
along the context (flash-decoding): each split writes a partial output with its running max
and sum, and a second kernel merges the splits by their log-sum-exp. The grid's split count
comes from the batch size class alone (launch_policy.py), and each row splits only as far as its
own context warrants (MIN_TOKENS_PER_SPLIT per split): a row's output depends on its own
context, never on which other rows share its batch or whether a CUDA graph replays it, and no
batch makes the kernel recompile (the split count is a grid dimension, not a constexpr). Each loop iteration
covers a tile of TILE tokens that may span several cache blocks (each token's block looked up
in the table). Softmax statistics and accumulation are fp32 whatever the input dtype.

Layout: q [num_seqs, num_q_heads, head_dim]; k_cache/v_cache [num_blocks, block_size,
num_kv_heads, head_dim]; block_tables int32 [num_seqs, max_blocks]; context_lens int32 [num_seqs].
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .device_guard import on_tensor_device
from .launch_policy import choose_num_splits, num_sms
from .paged_checks import check_paged_attention_inputs

# Tokens per loop iteration: several cache blocks per K/V tile, looked up token by token, so
# each iteration has enough loads in flight however small the blocks (vLLM's unified attention
# tiles the same way). Unmeasured default; bench_kernels.py sweeps it.
DEFAULT_TILE = 64
# fp32 inputs take the exact (non-tensor-core) dot, which holds more per thread: a [64, head_dim] fp32 K and
# V tile at 4 warps spills ~1.9 KB per thread at head_dim 128 under triton 3.6 (the GPU machines' version)
# on sm_90, and 32 tokens at 4 warps still a few bytes for query groups of 5 and 8; 32 tokens at 8 warps:
# about 60 registers, no spill (kernels/aot.py).
DEFAULT_TILE_FP32 = 32
FP32_WARPS = 8
# A row splits its context only into parts of at least this many tokens (unmeasured default).
MIN_TOKENS_PER_SPLIT = 256


@triton.jit
def _row_splits(ctx, max_splits, min_split_tokens):
    """How many splits a row of `ctx` tokens uses: at most the grid's, at least one."""
    return tl.minimum(tl.maximum(ctx // min_split_tokens, 1), max_splits)


@triton.jit(do_not_specialize=["max_blocks", "min_split_tokens"])
def _decode_kernel(
    q_ptr,  # [num_seqs, num_q_heads, HEAD_DIM]
    k_cache_ptr,  # [num_blocks, BLOCK_SIZE, num_kv_heads, HEAD_DIM]
    v_cache_ptr,
    block_tables_ptr,  # int32 [num_seqs, max_blocks]
    context_lens_ptr,  # int32 [num_seqs]
    out_ptr,  # [num_seqs, num_q_heads, HEAD_DIM], or with SPLIT partials [num_seqs, num_q_heads, splits, HEAD_DIM]
    m_ptr,  # fp32 [num_seqs, num_q_heads, splits]: running max (SPLIT only)
    l_ptr,  # fp32 [num_seqs, num_q_heads, splits]: running sum (SPLIT only)
    scale,
    max_blocks,  # block_tables row stride
    num_kv_heads,
    min_split_tokens,  # a row splits into parts of at least this many tokens
    GROUP: tl.constexpr,  # query heads per KV head
    GROUP_PAD: tl.constexpr,  # GROUP padded to >= 16 and a power of two
    HEAD_DIM: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,  # tokens per cache block
    TILE: tl.constexpr,  # tokens per loop iteration: a multiple of BLOCK_SIZE, >= 16 (tl.dot)
    SPLIT: tl.constexpr,  # the grid has several splits per row: write partials for the merge
    IEEE: tl.constexpr,  # fp32 inputs: exact fp32 dot instead of tf32
):
    seq = tl.program_id(0)
    kv_head = tl.program_id(1)
    split = tl.program_id(2)
    max_splits = tl.num_programs(2)
    num_q_heads = num_kv_heads * GROUP
    ctx = tl.load(context_lens_ptr + seq)
    splits = _row_splits(ctx, max_splits, min_split_tokens)
    if split >= splits:
        return
    # Each sequence splits its own context evenly (whole tiles), whatever the batch's longest.
    per_split = tl.cdiv(tl.cdiv(ctx, splits), TILE) * TILE
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

    if not SPLIT:
        o = acc / l[:, None]
        tl.store(out_ptr + (seq.to(tl.int64) * num_q_heads + head[:, None]) * HEAD_DIM + d[None, :],
                 o.to(out_ptr.dtype.element_ty), mask=g_mask[:, None])
    else:
        stat = (seq.to(tl.int64) * num_q_heads + head) * max_splits + split  # [GROUP_PAD]
        tl.store(out_ptr + stat[:, None] * HEAD_DIM + d[None, :], acc, mask=g_mask[:, None])
        tl.store(m_ptr + stat, m, mask=g_mask)
        tl.store(l_ptr + stat, l, mask=g_mask)


@triton.jit(do_not_specialize=["max_splits", "min_split_tokens"])
def _merge_splits_kernel(
    partial_ptr,  # fp32 [num_seqs * num_q_heads, max_splits, HEAD_DIM]: unnormalised sums
    m_ptr,  # fp32 [num_seqs * num_q_heads, max_splits]
    l_ptr,  # fp32 [num_seqs * num_q_heads, max_splits]
    context_lens_ptr,  # int32 [num_seqs]
    out_ptr,  # [num_seqs * num_q_heads, HEAD_DIM]
    num_q_heads,
    max_splits,
    min_split_tokens,
    HEAD_DIM: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)  # one (sequence, query head)
    splits = _row_splits(tl.load(context_lens_ptr + row // num_q_heads), max_splits, min_split_tokens)
    d = tl.arange(0, HEAD_DIM)
    m_all = float("-inf")
    l_all = 0.0
    acc = tl.zeros([HEAD_DIM], tl.float32)
    for s in range(0, splits):  # online log-sum-exp merge; splits past the context hold m = -inf
        m = tl.load(m_ptr + row * max_splits + s)
        m_new = tl.maximum(m_all, m)
        m_safe = tl.where(m_new > float("-inf"), m_new, 0.0)
        w_old = tl.exp(m_all - m_safe)
        w = tl.exp(m - m_safe)
        acc = acc * w_old + tl.load(partial_ptr + (row * max_splits + s) * HEAD_DIM + d) * w
        l_all = l_all * w_old + tl.load(l_ptr + row * max_splits + s) * w
        m_all = m_new
    tl.store(out_ptr + row * HEAD_DIM + d, (acc / l_all).to(out_ptr.dtype.element_ty))


@on_tensor_device
def paged_decode_attention(
    q: torch.Tensor,  # [num_seqs, num_q_heads, head_dim]
    k_cache: torch.Tensor,  # [num_blocks, block_size, num_kv_heads, head_dim]
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,  # int32 [num_seqs, max_blocks]
    context_lens: torch.Tensor,  # int32 [num_seqs]
    scale: float,
    out: torch.Tensor | None = None,  # [num_seqs, num_q_heads, head_dim]
    *,
    max_context_len: int | None = None,  # unused here (the reference needs it to avoid a device sync)
    num_splits: int | None = None,  # None: the policy; an int: every row split into that many parts
    tile: int | None = None,  # tokens per loop iteration; None: DEFAULT_TILE(_FP32) (at least one block)
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
    min_split_tokens = 1
    if num_splits is None:
        num_splits = choose_num_splits(num_seqs, num_kv_heads, num_sms(q))
        min_split_tokens = MIN_TOKENS_PER_SPLIT
    if num_splits < 1:
        raise ValueError(f"num_splits must be >= 1, got {num_splits}")
    tile = max(tile or (DEFAULT_TILE_FP32 if q.dtype == torch.float32 else DEFAULT_TILE), block_size, 16)
    if tile & (tile - 1):
        raise ValueError(f"tile must be a power of two, got {tile}")
    meta = dict(
        scale=scale, max_blocks=block_tables.shape[1], num_kv_heads=num_kv_heads, min_split_tokens=min_split_tokens,
        GROUP=group, GROUP_PAD=max(16, triton.next_power_of_2(group)), HEAD_DIM=head_dim,
        BLOCK_SIZE=block_size, TILE=tile, SPLIT=num_splits > 1, IEEE=q.dtype == torch.float32,
        num_warps=FP32_WARPS if q.dtype == torch.float32 else 4,
    )
    grid = (num_seqs, num_kv_heads, num_splits)
    if num_splits == 1:
        _decode_kernel[grid](q, k_cache, v_cache, block_tables, context_lens, out, out, out, **meta)
        return out
    partial = torch.empty(num_seqs, num_q_heads, num_splits, head_dim, dtype=torch.float32, device=q.device)
    m = torch.empty(num_seqs, num_q_heads, num_splits, dtype=torch.float32, device=q.device)
    l = torch.empty_like(m)
    _decode_kernel[grid](q, k_cache, v_cache, block_tables, context_lens, partial, m, l, **meta)
    _merge_splits_kernel[(num_seqs * num_q_heads,)](partial, m, l, context_lens, out, num_q_heads=num_q_heads,
                                                    max_splits=num_splits, min_split_tokens=min_split_tokens,
                                                    HEAD_DIM=head_dim)
    return out
