"""Tensor parallelism's arithmetic: which slice of each weight a rank holds, and the vocabulary-parallel
embedding lookup.

Sharding is Megatron-LM's (Shoeybi et al. 2019), as vLLM applies it to Llama: q/k/v and gate/up are
column-parallel (each rank owns whole attention heads and a slice of the MLP), o_proj and down_proj
row-parallel with an all-reduce after them, the embedding and the LM head split by vocabulary
(vocab-parallel lookup with an all-reduce; logits all-gathered, so the sampler and the budget machine
see the full vocabulary). When there are fewer kv heads than ranks, each kv head is replicated on
N / num_kv_heads ranks (vLLM's rule); each rank's KV cache holds only its kv heads.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.nn import functional as F

from ..errors import ElasticDecodeError
from .group import Group


@dataclass(frozen=True)
class Shard:
    """Rank `rank` of `size`: the slice of the model it holds."""

    rank: int
    size: int
    q_heads: int  # local
    kv_heads: int  # local
    kv_first: int  # first kv head of this rank (global index)
    head_dim: int
    intermediate: int  # local
    vocab: int  # local rows of the embedding / LM head (the last rank's padded)
    vocab_start: int
    full_vocab: int
    full_kv_heads: int

    @staticmethod
    def of(spec, rank: int, size: int) -> "Shard":
        hq, hkv = spec.num_q_heads, spec.num_kv_heads
        kv_heads = max(1, hkv // size)
        kv_first = rank * hkv // size if hkv < size else rank * kv_heads
        vocab = -(-spec.vocab_size // size)
        return Shard(rank=rank, size=size, q_heads=hq // size, kv_heads=kv_heads, kv_first=kv_first,
                     head_dim=spec.head_dim, intermediate=spec.intermediate_size // size, vocab=vocab,
                     vocab_start=rank * vocab, full_vocab=spec.vocab_size, full_kv_heads=hkv)

    def split(self, name: str) -> tuple[int, int, int] | None:
        """(dim, start, stop) of this rank's part of the HF weight `name`; None if replicated."""
        d = self.head_dim
        parts = name.rsplit(".", 2)
        module, kind = (parts[-2], parts[-1]) if len(parts) >= 2 else (name, "")
        if module == "q_proj":
            return 0, self.rank * self.q_heads * d, (self.rank + 1) * self.q_heads * d
        if module in ("k_proj", "v_proj"):
            return 0, self.kv_first * d, (self.kv_first + self.kv_heads) * d
        if module in ("gate_proj", "up_proj"):
            return 0, self.rank * self.intermediate, (self.rank + 1) * self.intermediate
        if kind == "weight" and module == "o_proj":
            return 1, self.rank * self.q_heads * d, (self.rank + 1) * self.q_heads * d
        if kind == "weight" and module == "down_proj":
            return 1, self.rank * self.intermediate, (self.rank + 1) * self.intermediate
        if name in ("model.embed_tokens.weight", "lm_head.weight"):
            return 0, self.vocab_start, self.vocab_start + self.vocab
        return None  # norms, o_proj / down_proj biases (added once, after the all-reduce)

    def full_shape(self, name: str, local: tuple[int, ...]) -> tuple[int, ...]:
        """The HF shape of a weight whose local part has shape `local`."""
        split = self.split(name)
        if split is None:
            return tuple(local)
        dim = split[0]
        shape = list(local)
        if name in ("model.embed_tokens.weight", "lm_head.weight"):
            shape[0] = self.full_vocab
        elif name.rsplit(".", 2)[-2] in ("k_proj", "v_proj"):
            shape[0] = self.full_kv_heads * self.head_dim
        else:
            shape[dim] = local[dim] * self.size
        return tuple(shape)

    def take(self, name: str, tensor: torch.Tensor) -> torch.Tensor:
        """This rank's part of the full HF tensor (the vocabulary padded with zeros at the end)."""
        split = self.split(name)
        if split is None:
            return tensor
        dim, start, stop = split
        return _padded(tensor.narrow(dim, start, max(0, min(stop, tensor.shape[dim]) - start)), dim, stop - start)

    def read(self, name: str, stored) -> torch.Tensor:
        """This rank's part of a weight in a safetensors file (`safe_open(...).get_slice(name)`),
        reading only that part."""
        split = self.split(name)
        if split is None:
            return stored[:]
        dim, start, stop = split
        end = min(stop, stored.get_shape()[dim])
        part = stored[start:end] if dim == 0 else stored[:, start:end]
        return _padded(part, dim, stop - start)


def _padded(part: torch.Tensor, dim: int, length: int) -> torch.Tensor:
    if part.shape[dim] >= length:
        return part
    pad = list(part.shape)
    pad[dim] = length - part.shape[dim]
    return torch.cat([part, part.new_zeros(pad)], dim=dim)


def check_sizes(spec, size, device: torch.device) -> None:
    """Refuse a tensor-parallel size this model or machine cannot take, before any process starts."""
    if isinstance(size, bool) or not isinstance(size, int) or size < 1:
        raise ElasticDecodeError(f"tensor_parallel_size must be a positive integer, got {size!r}")
    if size == 1:
        return
    hq, hkv = spec.num_q_heads, spec.num_kv_heads
    if hq % size:
        raise ElasticDecodeError(f"tensor_parallel_size {size} must divide the model's {hq} attention heads")
    if hkv % size and size % hkv:
        raise ElasticDecodeError(f"tensor_parallel_size {size} and the model's {hkv} kv heads: one must divide the "
                                 "other (kv heads are split, or replicated when there are fewer than ranks)")
    if spec.intermediate_size % size:
        raise ElasticDecodeError(f"tensor_parallel_size {size} must divide the MLP width {spec.intermediate_size}")
    if device.type == "cuda" and size > torch.cuda.device_count():
        raise ElasticDecodeError(f"tensor_parallel_size {size} needs {size} GPUs; this machine has "
                                 f"{torch.cuda.device_count()}")


def vocab_parallel_embedding(ids: torch.Tensor, weight: torch.Tensor, shard: Shard, group: Group) -> torch.Tensor:
    """Rows of the full embedding from vocabulary shards: each rank looks up the ids it holds."""
    local = ids - shard.vocab_start
    outside = (local < 0) | (local >= shard.vocab)
    x = F.embedding(local.clamp(0, shard.vocab - 1), weight)  # [num_tokens, hidden]
    x = x.masked_fill(outside[:, None], 0)
    return group.all_reduce(x)
