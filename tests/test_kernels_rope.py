"""rope_write_kv (RoPE on q and k, Qwen3's head norms, k/v into the paged cache) against the torch
reference, for both providers of the contract: the Triton kernel (in Triton's interpreter on CPU) and the
C++ CPU op. Fresh random inputs: the checkpoint's rope types (default, linear, llama3, yarn's attention
scaling), GQA ratios 1/3/8, head dims 64/128 and 80 (not a power of two), q/k/v as strided views of a
packed QKV row, random positions, skipped slots (< 0), and the cache around them untouched.
Without the head norms the Triton kernel rounds exactly as the reference does (on hardware too: it is
launched with FMA contraction off), so results are compared bit for bit; the C++ op, and both with the
head norms, within one rounding (the norm's sum is added in another order)."""
from __future__ import annotations

import pytest
import torch

from elastic_decode.kernels import cpu, reference
from elastic_decode.kernels.rope_write_kv import rope_write_kv
from test_kernels_attention import PROVIDERS
from test_kernels_fused import fused_close
from elastic_decode.models.llama import rope_inv_freq, rope_tables

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
DTYPES = [torch.float32, torch.float16] + ([torch.bfloat16] if DEVICE == "cuda" else [])
TOL = {torch.float32: (2e-5, 2e-5), torch.float16: (2e-3, 2e-3), torch.bfloat16: (1.5e-2, 1.5e-2)}
ROPES = {
    "default": None,
    "linear": {"rope_type": "linear", "factor": 2.0},
    "llama3": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 64},
    "yarn": {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64},
}
MAX_POSITIONS = 512


def tables(rope: str, head_dim: int):
    from transformers import LlamaConfig

    extra = {} if ROPES[rope] is None else {"rope_scaling": dict(ROPES[rope])}
    config = LlamaConfig(hidden_size=4 * head_dim, num_attention_heads=4, head_dim=head_dim,
                         max_position_embeddings=MAX_POSITIONS, **extra)
    inv_freq, scaling = rope_inv_freq(config, head_dim)
    if rope == "yarn":
        assert scaling != 1.0  # the attention scaling is in the tables
    return rope_tables(inv_freq, scaling, MAX_POSITIONS, DEVICE)


def case(hq, hkv, d, dtype, n=29, num_blocks=7, bs=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    qkv = torch.randn(n, (hq + 2 * hkv) * d, generator=g).to(dtype).to(DEVICE)  # packed: q, k, v are views
    q, k, v = (t.view(n, -1, d) for t in qkv.split((hq * d, hkv * d, hkv * d), dim=-1))
    positions = torch.randint(0, MAX_POSITIONS, (n,), generator=g).to(DEVICE)
    slots = torch.randperm(num_blocks * bs, generator=g)[:n].to(DEVICE)
    slots[::4] = -1  # skipped tokens (padding rows of a decode batch)
    caches = torch.randn(2, num_blocks, bs, hkv, d, generator=g).to(dtype).to(DEVICE)
    return q, k, v, positions, slots, caches


def launcher(provider: str):
    return cpu.rope_write_kv if provider == "cpu" else rope_write_kv


@pytest.mark.parametrize("provider, dtype", PROVIDERS)
@pytest.mark.parametrize("rope", list(ROPES))
@pytest.mark.parametrize("hq, hkv, d", [(2, 2, 64), (6, 2, 128), (8, 1, 80), (9, 3, 64)])
def test_rope_write_kv_matches_reference(provider, dtype, rope, hq, hkv, d):
    q, k, v, positions, slots, caches = case(hq, hkv, d, dtype, seed=hq * d)
    cos, sin = tables(rope, d)
    mine, theirs = caches.clone(), caches.clone()
    got = launcher(provider)(q, k, v, positions, cos, sin, mine[0], mine[1], slots)
    expected = reference.rope_write_kv(q, k, v, positions, cos, sin, theirs[0], theirs[1], slots)
    assert got.shape == (q.shape[0], hq, d) and got.is_contiguous()
    if provider == "triton":
        assert torch.equal(got, expected)
        assert torch.equal(mine, theirs)  # rotated k and plain v in the written slots, the rest untouched
    else:
        fused_close(provider, got, expected, dtype)
        fused_close(provider, mine[0], theirs[0], dtype)
        assert torch.equal(mine[1], theirs[1])  # v: copied
    written = mine[1].view(-1, hkv, d)[slots[slots >= 0]]
    assert torch.equal(written, v[slots >= 0])


@pytest.mark.parametrize("provider, dtype", PROVIDERS)
@pytest.mark.parametrize("hq, hkv, d", [(4, 2, 64), (8, 1, 80), (8, 1, 128)])
def test_rope_write_kv_with_qwen3_head_norms_matches_reference(provider, dtype, hq, hkv, d):
    q, k, v, positions, slots, caches = case(hq, hkv, d, dtype, seed=7 * d)
    g = torch.Generator().manual_seed(d)
    q_norm, k_norm = (torch.rand(d, generator=g).add(0.5).to(dtype).to(DEVICE) for _ in range(2))
    cos, sin = tables("default", d)
    mine, theirs = caches.clone(), caches.clone()
    got = launcher(provider)(q, k, v, positions, cos, sin, mine[0], mine[1], slots, q_norm, k_norm, 1e-6)
    expected = reference.rope_write_kv(q, k, v, positions, cos, sin, theirs[0], theirs[1], slots, q_norm, k_norm, 1e-6)
    atol, rtol = TOL[dtype]
    assert torch.allclose(got.float(), expected.float(), atol=atol, rtol=rtol)
    assert torch.allclose(mine.float(), theirs.float(), atol=atol, rtol=rtol)
    skipped = torch.ones(caches.shape[1] * caches.shape[2], dtype=torch.bool, device=DEVICE)
    skipped[slots[slots >= 0]] = False
    assert torch.equal(mine[:, :, :].flatten(1, 2)[:, skipped], caches.flatten(1, 2)[:, skipped])


def test_rope_write_kv_refuses_mismatched_shapes():
    q, k, v, positions, slots, caches = case(4, 2, 64, torch.float32)
    cos, sin = tables("default", 64)
    with pytest.raises(ValueError, match="cache shape"):
        rope_write_kv(q, k, v, positions, cos, sin, caches[0][..., :32], caches[1][..., :32], slots)
    with pytest.raises(ValueError, match="tables"):
        rope_write_kv(q, k, v, positions, cos[:, :32], sin[:, :32], caches[0], caches[1], slots)
    with pytest.raises(ValueError, match="q_norm"):
        rope_write_kv(q, k, v, positions, cos, sin, caches[0], caches[1], slots, q_norm=cos[0])
