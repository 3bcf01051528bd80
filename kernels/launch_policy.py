"""Launch-shape policies shared by the Triton launchers, and why they depend on what they do.

A launch choice that changes a kernel's floating-point result (how a row's context is split,
how a logits row is chunked) must be the same whenever the same row is computed: in the eager
decode loop and in the CUDA graph captured for the batch's bucket, whatever else is in the
batch. So these choices depend only on host-known values that are equal in both: the device's
SM count, the model's shape, and the batch's size *class* (`rows_class`), never on the batch's
current context lengths. Their values are grid dimensions, not constexprs, so no choice makes a
kernel recompile.
"""
from __future__ import annotations

import torch
import triton

MAX_SPLITS = 32  # split-KV parts per row at most
MAX_CHUNKS = 16  # sampler programs per logits row at most
MIN_CHUNK = 8192  # a logits row is split into chunks of at least this many tokens


def num_sms(tensor: torch.Tensor) -> int:
    """The SM count of the tensor's GPU; 1 elsewhere (interpreter runs on CPU tensors)."""
    return torch.cuda.get_device_properties(tensor.device).multi_processor_count if tensor.is_cuda else 1


def rows_class(num_rows: int) -> int:
    """The batch-size class the policies depend on: the next power of two. The CUDA-graph
    buckets (1, 2, 4, 8, then multiples of 16, up to max_num_seqs) never straddle a power of
    two, so a batch and the bucket it is padded to are in the same class."""
    return triton.next_power_of_2(max(1, num_rows))


def _pow2_at_most(n: int) -> int:
    return 1 << (max(1, n).bit_length() - 1)


def choose_num_splits(num_rows: int, num_kv_heads: int, num_sms: int) -> int:
    """Split-KV parts per row for paged decode attention (flash-decoding): split only when the
    (row, kv head) programs are too few to fill the GPU, into at least two waves (a power of
    two). A row then uses as many of them as its own context warrants
    (paged_decode_attention._row_splits)."""
    programs = rows_class(num_rows) * num_kv_heads
    if programs >= num_sms:
        return 1
    return min(MAX_SPLITS, _pow2_at_most(triton.next_power_of_2(triton.cdiv(2 * num_sms, programs))))


def choose_num_chunks(num_rows: int, vocab: int, num_sms: int) -> int:
    """Programs per logits row for the sampler's scan: enough for at least four programs per SM
    (a power of two), chunks of at least MIN_CHUNK tokens."""
    wanted = triton.next_power_of_2(triton.cdiv(4 * num_sms, rows_class(num_rows)))
    return _pow2_at_most(min(MAX_CHUNKS, vocab // MIN_CHUNK, wanted))
