"""rope_write_kv: rotate q and k (RoPE, Qwen3's q/k RMSNorm first) and write k and v into the paged cache.

The attention block's glue between the QKV GEMM and attention, in one launch: the torch graph it
replaces is a gather of cos/sin by position, about ten small ops of rotate-half RoPE on q and on k
(vLLM fuses the same pair in its rotary-embedding + reshape_and_cache path), the cache write, and
for Qwen3 the two head norms. Rounding follows HF's eager graph in the model dtype, so the result
equals the unfused torch ops (kernels/reference.py): cos/sin are rounded to the model dtype, each
product is rounded, then their sum; the head norm rounds like rms_norm.py.

Layout: q [num_tokens, num_q_heads, head_dim], k and v [num_tokens, num_kv_heads, head_dim], each
with contiguous heads and any token stride (views of the packed QKV output); cos_table, sin_table
fp32 [max_positions, head_dim] (rotate-half layout, rope scaling already in them); positions int64
[num_tokens]; k_cache, v_cache [num_blocks, block_size, num_kv_heads, head_dim]; slot_mapping int64
[num_tokens], slot < 0 skips the token's cache write (its q is still rotated). Returns the rotated
q, contiguous. One program per (token, head) over the q heads then the kv heads; a kv head's
program also copies that head's v.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl
from .device_guard import on_tensor_device


@triton.jit
def _rotated_head(
    x_ptr,  # one head's head_dim elements
    cos_ptr,  # this position's cos row
    sin_ptr,
    norm_ptr,  # [head_dim] norm weight (HAS_NORM)
    eps,
    HALF: tl.constexpr,
    HALF_BLOCK: tl.constexpr,
    HAS_NORM: tl.constexpr,
):
    """(first half, second half) of the rotated head in fp32, each rounded as the model dtype rounds."""
    dt = x_ptr.dtype.element_ty
    cols = tl.arange(0, HALF_BLOCK)
    mask = cols < HALF
    x1 = tl.load(x_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    x2 = tl.load(x_ptr + HALF + cols, mask=mask, other=0.0).to(tl.float32)
    if HAS_NORM:  # HF's RMSNorm: fp32 statistics, normed row rounded to the dtype, then the weight
        rstd = tl.div_rn(1.0, tl.sqrt_rn(tl.div_rn(tl.sum(x1 * x1, axis=0) + tl.sum(x2 * x2, axis=0), 2.0 * HALF) + eps))
        w1 = tl.load(norm_ptr + cols, mask=mask, other=0.0).to(tl.float32)
        w2 = tl.load(norm_ptr + HALF + cols, mask=mask, other=0.0).to(tl.float32)
        x1 = (w1 * (x1 * rstd).to(dt).to(tl.float32)).to(dt).to(tl.float32)
        x2 = (w2 * (x2 * rstd).to(dt).to(tl.float32)).to(dt).to(tl.float32)
    c1 = tl.load(cos_ptr + cols, mask=mask, other=0.0).to(dt).to(tl.float32)
    c2 = tl.load(cos_ptr + HALF + cols, mask=mask, other=0.0).to(dt).to(tl.float32)
    s1 = tl.load(sin_ptr + cols, mask=mask, other=0.0).to(dt).to(tl.float32)
    s2 = tl.load(sin_ptr + HALF + cols, mask=mask, other=0.0).to(dt).to(tl.float32)
    # x * cos + rotate_half(x) * sin, rotate_half(x) = (-x2, x1)
    o1 = ((x1 * c1).to(dt).to(tl.float32) + (-x2 * s1).to(dt).to(tl.float32)).to(dt)
    o2 = ((x2 * c2).to(dt).to(tl.float32) + (x1 * s2).to(dt).to(tl.float32)).to(dt)
    return o1, o2


@triton.jit
def _rope_write_kv_kernel(
    q_ptr,  # [num_tokens, num_q_heads, head_dim], heads contiguous
    k_ptr,  # [num_tokens, num_kv_heads, head_dim], heads contiguous
    v_ptr,  # [num_tokens, num_kv_heads, head_dim], heads contiguous
    positions_ptr,  # int64 [num_tokens]
    cos_ptr,  # fp32 [max_positions, head_dim]
    sin_ptr,  # fp32 [max_positions, head_dim]
    q_norm_ptr,  # [head_dim] (HAS_NORM)
    k_norm_ptr,  # [head_dim] (HAS_NORM)
    q_out_ptr,  # [num_tokens, num_q_heads, head_dim] contiguous
    k_cache_ptr,  # [num_slots, num_kv_heads, head_dim]
    v_cache_ptr,  # [num_slots, num_kv_heads, head_dim]
    slot_ptr,  # int64 [num_tokens]
    q_stride,  # elements between tokens of q (k, v)
    k_stride,
    v_stride,
    eps,
    NUM_Q_HEADS: tl.constexpr,
    NUM_KV_HEADS: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    HALF_BLOCK: tl.constexpr,  # head_dim / 2 rounded up to a power of two
    HAS_NORM: tl.constexpr,
):
    token = tl.program_id(0).to(tl.int64)
    head = tl.program_id(1)
    HALF: tl.constexpr = HEAD_DIM // 2
    cols = tl.arange(0, HALF_BLOCK)
    mask = cols < HALF
    pos = tl.load(positions_ptr + token)
    cos_row, sin_row = cos_ptr + pos * HEAD_DIM, sin_ptr + pos * HEAD_DIM
    if head < NUM_Q_HEADS:
        o1, o2 = _rotated_head(q_ptr + token * q_stride + head * HEAD_DIM, cos_row, sin_row, q_norm_ptr, eps,
                               HALF, HALF_BLOCK, HAS_NORM)
        out = q_out_ptr + (token * NUM_Q_HEADS + head) * HEAD_DIM
        tl.store(out + cols, o1.to(q_out_ptr.dtype.element_ty), mask=mask)
        tl.store(out + HALF + cols, o2.to(q_out_ptr.dtype.element_ty), mask=mask)
    else:
        kv_head = head - NUM_Q_HEADS
        slot = tl.load(slot_ptr + token)  # int64: slot * row overflows int32 on big caches
        if slot >= 0:
            o1, o2 = _rotated_head(k_ptr + token * k_stride + kv_head * HEAD_DIM, cos_row, sin_row, k_norm_ptr, eps,
                                   HALF, HALF_BLOCK, HAS_NORM)
            dst = (slot * NUM_KV_HEADS + kv_head) * HEAD_DIM
            tl.store(k_cache_ptr + dst + cols, o1.to(k_cache_ptr.dtype.element_ty), mask=mask)
            tl.store(k_cache_ptr + dst + HALF + cols, o2.to(k_cache_ptr.dtype.element_ty), mask=mask)
            src = v_ptr + token * v_stride + kv_head * HEAD_DIM
            v1 = tl.load(src + cols, mask=mask)
            v2 = tl.load(src + HALF + cols, mask=mask)
            tl.store(v_cache_ptr + dst + cols, v1.to(v_cache_ptr.dtype.element_ty), mask=mask)
            tl.store(v_cache_ptr + dst + HALF + cols, v2.to(v_cache_ptr.dtype.element_ty), mask=mask)


def _heads_contiguous(x: torch.Tensor) -> torch.Tensor:
    return x if x.stride(2) == 1 and x.stride(1) == x.shape[2] else x.contiguous()


@on_tensor_device
def rope_write_kv(
    q: torch.Tensor,  # [num_tokens, num_q_heads, head_dim]
    k: torch.Tensor,  # [num_tokens, num_kv_heads, head_dim]
    v: torch.Tensor,  # [num_tokens, num_kv_heads, head_dim]
    positions: torch.Tensor,  # int64 [num_tokens]
    cos_table: torch.Tensor,  # fp32 [max_positions, head_dim]
    sin_table: torch.Tensor,  # fp32 [max_positions, head_dim]
    k_cache: torch.Tensor,  # [num_blocks, block_size, num_kv_heads, head_dim]
    v_cache: torch.Tensor,  # [num_blocks, block_size, num_kv_heads, head_dim]
    slot_mapping: torch.Tensor,  # int64 [num_tokens]; < 0 = skip the write
    q_norm: torch.Tensor | None = None,  # [head_dim]: Qwen3's RMSNorm of each q head before RoPE
    k_norm: torch.Tensor | None = None,  # [head_dim]: the same for k
    eps: float = 0.0,
) -> torch.Tensor:  # rotated q [num_tokens, num_q_heads, head_dim], contiguous
    num_tokens, num_q_heads, head_dim = q.shape
    num_kv_heads = k.shape[1]
    if head_dim % 2:
        raise ValueError(f"head_dim must be even for rotate-half RoPE, got {head_dim}")
    if k.shape != (num_tokens, num_kv_heads, head_dim) or v.shape != k.shape:
        raise ValueError(f"k and v must be [{num_tokens}, kv_heads, {head_dim}], "
                         f"got {tuple(k.shape)}, {tuple(v.shape)}")
    if k_cache.shape[2:] != (num_kv_heads, head_dim) or v_cache.shape != k_cache.shape:
        raise ValueError(f"cache shape {tuple(k_cache.shape)} does not fit k {tuple(k.shape)}")
    if not (k_cache.is_contiguous() and v_cache.is_contiguous()):
        raise ValueError("k_cache and v_cache must be contiguous")
    if cos_table.shape[1:] != (head_dim,) or sin_table.shape != cos_table.shape:
        raise ValueError(f"cos/sin tables must be [positions, {head_dim}], got {tuple(cos_table.shape)}")
    if positions.shape != (num_tokens,) or slot_mapping.shape != (num_tokens,):
        raise ValueError(f"positions and slot_mapping must be [{num_tokens}]")
    if (q_norm is None) != (k_norm is None):
        raise ValueError("give both q_norm and k_norm, or neither")
    q_out = torch.empty(num_tokens, num_q_heads, head_dim, dtype=q.dtype, device=q.device)
    if num_tokens == 0:
        return q_out
    q, k, v = _heads_contiguous(q), _heads_contiguous(k), _heads_contiguous(v)
    has_norm = q_norm is not None
    half_block = triton.next_power_of_2(head_dim // 2)
    _rope_write_kv_kernel[(num_tokens, num_q_heads + num_kv_heads)](
        q, k, v, positions, cos_table.contiguous(), sin_table.contiguous(),
        q_norm.contiguous() if has_norm else q, k_norm.contiguous() if has_norm else q,
        q_out, k_cache, v_cache, slot_mapping,
        q_stride=q.stride(0), k_stride=k.stride(0), v_stride=v.stride(0), eps=eps,
        NUM_Q_HEADS=num_q_heads, NUM_KV_HEADS=num_kv_heads, HEAD_DIM=head_dim,
        HALF_BLOCK=half_block, HAS_NORM=has_norm,
        num_warps=min(4, max(1, half_block // 64)),  # a head is small: one warp holds 64 elements twice over
        enable_fp_fusion=False,  # no a*b+c contracted into an FMA: the reference's roundings on hardware too
    )
    return q_out
