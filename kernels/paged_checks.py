"""Input checks shared by the paged attention launchers (decode and prefill)."""
from __future__ import annotations

import torch

MIN_HEAD_DIM = 16  # tl.dot's smallest K on NVIDIA GPUs (q @ k^T reduces over head_dim)


def check_paged_attention_inputs(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                                 **int32_tensors: torch.Tensor) -> tuple[int, int]:
    """Validate q [.., num_q_heads, head_dim] against the caches; returns (block_size, num_kv_heads)."""
    num_q_heads, head_dim = q.shape[-2:]
    _, block_size, num_kv_heads, cache_head_dim = k_cache.shape
    if cache_head_dim != head_dim or v_cache.shape != k_cache.shape:
        raise ValueError(f"cache shape {tuple(k_cache.shape)} does not fit q {tuple(q.shape)}")
    if num_q_heads % num_kv_heads:
        raise ValueError(f"num_q_heads {num_q_heads} is not a multiple of num_kv_heads {num_kv_heads}")
    if head_dim & (head_dim - 1) or block_size & (block_size - 1):
        raise ValueError("head_dim and block_size must be powers of two")
    if head_dim < MIN_HEAD_DIM:  # the interpreter runs a smaller tl.dot; the compiler refuses it on NVIDIA GPUs
        raise ValueError(f"head_dim {head_dim} < {MIN_HEAD_DIM}: the kernels' tl.dot needs K >= {MIN_HEAD_DIM}")
    wrong = [name for name, t in int32_tensors.items() if t.dtype != torch.int32]
    if wrong:
        raise ValueError(f"{', '.join(wrong)} must be int32")
    return block_size, num_kv_heads
