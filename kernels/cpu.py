"""The C++ CPU kernels (csrc/cpu_attention.cpp, in elastic_decode._C) under the op contracts.

Paged decode and prefill attention for CPU tensors: one work item per (sequence, kv head) for decode
and per (sequence, tile of 16 new tokens, kv head) for prefill, each reading a K/V block once for
every query head of its GQA group, an online softmax in fp32, threads from torch's intra-op pool,
AVX-512 / AVX2 / baseline code chosen at load time. The CPU backend (backend.py) selects the decode
kernel; the prefill kernel is tested and measured (`make microbench`) but so far slower than the
reference's batched GEMMs, so the reference keeps prefill and every other op, and stays the oracle.

Plus `linear`: the model's GEMMs on weights that oneDNN has packed once into its blocked layout, which
this CPU BLAS path runs 1.2-2.5x faster than `F.linear` at decode shapes (`make microbench`).
"""
from __future__ import annotations

import weakref

import torch
import torch.nn.functional as F

try:
    from elastic_decode import _C

    HAVE_CPU_KERNELS = hasattr(_C, "paged_decode_attention")
except ImportError:  # the extension is not built (an uninstalled checkout)
    HAVE_CPU_KERNELS = False


# The x86 flags (AVX512-BF16, AMX-BF16) of a CPU that computes bfloat16 dot products in hardware, as
# Linux's /proc/cpuinfo spells them. (ARM's BF16 is left out: unmeasured with torch's CPU build.)
NATIVE_BF16_FLAGS = frozenset({"avx512_bf16", "amx_bf16"})


def native_bf16(cpuinfo: str | None = None) -> bool:
    """Whether this CPU computes bfloat16 natively, from the flags its kernel reports (Linux). Not
    guessed from the vendor or the AVX level: without these instructions oneDNN emulates bf16, and a
    batch of 16 decodes at about a quarter of fp32's rate on an AVX2 EPYC (RESULTS.md; batch 1, bound
    by bytes, is faster in bf16 even there). False where unknown."""
    if cpuinfo is None:
        try:
            with open("/proc/cpuinfo", encoding="ascii", errors="replace") as f:
                cpuinfo = f.read()
        except OSError:
            return False
    for line in cpuinfo.splitlines():
        key, _, value = line.partition(":")
        if key.strip() == "flags":  # every core lists the same set
            return not NATIVE_BF16_FLAGS.isdisjoint(value.split())
    return False


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


# linear: oneDNN-packed weights (torch's own mkldnn ops, the ones Inductor's CPU freezing uses).
# A packed copy per weight tensor, made on first use and made again whenever the weight changes in
# place (its version counter moves: load_weights, a trainer's update); it dies with the weight.
# The copy costs the weight's memory once more.
HAVE_PACKED_LINEAR = torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")
_PACK_BATCH_HINT = 16  # oneDNN picks the blocked layout for this many rows; any row count runs on it
_packed: dict[int, tuple[weakref.ref, int, torch.Tensor | None]] = {}


def _pack(weight: torch.Tensor) -> torch.Tensor | None:
    key, version = id(weight), weight._version
    entry = _packed.get(key)
    if entry is not None and entry[0]() is weight and entry[1] == version:
        return entry[2]
    try:
        packed = torch.ops.mkldnn._reorder_linear_weight(weight.detach(), _PACK_BATCH_HINT)
    except RuntimeError:  # a dtype or build oneDNN does not pack: plain F.linear for this weight
        packed = None
    _packed[key] = (weakref.ref(weight, lambda _, key=key: _packed.pop(key, None)), version, packed)
    return packed


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """F.linear's contract (x [rows, in], weight [out, in], bias [out]) on the packed weight."""
    packed = None
    # Not for autograd, nor for weights made under torch.inference_mode (an LLM built inside one): those
    # have no version counter, so an update in place could not be seen.
    if HAVE_PACKED_LINEAR and x.dim() == 2 and x.device.type == "cpu" and x.dtype == weight.dtype \
            and not (torch.is_grad_enabled() and weight.requires_grad) and not weight.is_inference():
        packed = _pack(weight)
    if packed is None:
        return F.linear(x, weight, bias)
    return torch.ops.mkldnn._linear_pointwise(x.contiguous(), packed, bias, "none", [], "")
