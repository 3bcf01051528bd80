"""write_kv: scatter new K/V rows into the paged cache through a slot mapping.

Layout: k, v [num_tokens, num_kv_heads, head_dim]; k_cache, v_cache [num_blocks, block_size,
num_kv_heads, head_dim] (flash-attn paged layout), so one token's K (or V) for all heads is a
contiguous run of num_kv_heads * head_dim elements at slot * that run. One program per token
copies its K and V rows; a negative slot means "skip" (padding tokens).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _write_kv_kernel(
    k_ptr,  # [num_tokens, row]
    v_ptr,  # [num_tokens, row]
    k_cache_ptr,  # [num_slots, row]
    v_cache_ptr,  # [num_slots, row]
    slot_ptr,  # int64 [num_tokens]
    k_stride,  # elements between tokens of k (and v)
    v_stride,
    ROW: tl.constexpr,  # num_kv_heads * head_dim
    BLOCK: tl.constexpr,  # power of two >= ROW
):
    token = tl.program_id(0)
    slot = tl.load(slot_ptr + token).to(tl.int64)  # int64: slot * ROW overflows int32 on big caches
    if slot < 0:
        return
    cols = tl.arange(0, BLOCK)
    mask = cols < ROW
    k = tl.load(k_ptr + token.to(tl.int64) * k_stride + cols, mask=mask)
    v = tl.load(v_ptr + token.to(tl.int64) * v_stride + cols, mask=mask)
    tl.store(k_cache_ptr + slot * ROW + cols, k.to(k_cache_ptr.dtype.element_ty), mask=mask)
    tl.store(v_cache_ptr + slot * ROW + cols, v.to(v_cache_ptr.dtype.element_ty), mask=mask)


def write_kv(
    k: torch.Tensor,  # [num_tokens, num_kv_heads, head_dim]
    v: torch.Tensor,  # [num_tokens, num_kv_heads, head_dim]
    k_cache: torch.Tensor,  # [num_blocks, block_size, num_kv_heads, head_dim]
    v_cache: torch.Tensor,  # [num_blocks, block_size, num_kv_heads, head_dim]
    slot_mapping: torch.Tensor,  # int64 [num_tokens]; < 0 = skip
) -> None:
    num_tokens, num_kv_heads, head_dim = k.shape
    if k_cache.shape[2:] != (num_kv_heads, head_dim) or v_cache.shape != k_cache.shape:
        raise ValueError(f"cache shape {tuple(k_cache.shape)} does not fit k {tuple(k.shape)}")
    if not (k_cache.is_contiguous() and v_cache.is_contiguous()):
        raise ValueError("k_cache and v_cache must be contiguous")
    if slot_mapping.shape != (num_tokens,):
        raise ValueError(f"slot_mapping must be [{num_tokens}], got {tuple(slot_mapping.shape)}")
    if num_tokens == 0:
        return
    # Rows must be contiguous within a token; the token stride may be anything (views of qkv).
    k = k if k.stride(1) == head_dim and k.stride(2) == 1 else k.contiguous()
    v = v if v.stride(1) == head_dim and v.stride(2) == 1 else v.contiguous()
    row = num_kv_heads * head_dim
    _write_kv_kernel[(num_tokens,)](
        k, v, k_cache, v_cache, slot_mapping,
        k_stride=k.stride(0), v_stride=v.stride(0),
        ROW=row, BLOCK=triton.next_power_of_2(row),
    )
