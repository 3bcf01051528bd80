"""Paged decode / paged prefill attention against the torch reference, for every provider of the op
contract: the Triton kernels (in Triton's interpreter on CPU, fp32 / fp16; with a GPU, bf16 too) and the
C++ CPU kernels (csrc/cpu_attention.cpp through kernels/cpu.py: fp32 / bf16 / fp16).

Fresh random inputs every case; GQA ratios 1/3/4/6/8, head dims 64/128 (and 80, not a power of two, on
the C++ kernels, which take it), block sizes 16/32, length-1 contexts, exact block boundaries, ragged
mixes, permuted block tables, split-KV on and off and several tiles (Triton); prefill over a cached
prefix and longer than one tile.
"""
from __future__ import annotations

import pytest
import torch

from elastic_decode.kernels import cpu, reference
from elastic_decode.kernels.paged_decode_attention import paged_decode_attention
from elastic_decode.kernels.paged_prefill_attention import paged_prefill_attention

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
TOL = {torch.float32: (2e-5, 2e-5), torch.float16: (2e-3, 2e-3), torch.bfloat16: (1.5e-2, 1.5e-2)}
DTYPES = [torch.float32, torch.float16] + ([torch.bfloat16] if DEVICE == "cuda" else [])
CPU_KERNELS = pytest.mark.skipif(not cpu.HAVE_CPU_KERNELS, reason="elastic_decode._C built without its CPU kernels")
# (provider, dtype): the Triton launchers at the dtypes the interpreter runs, the C++ kernels at all three.
PROVIDERS = [pytest.param("triton", d, id=f"triton-{str(d)[6:]}") for d in DTYPES] + [
    pytest.param("cpu", d, id=f"cpu-{str(d)[6:]}", marks=CPU_KERNELS)
    for d in (torch.float32, torch.bfloat16, torch.float16)]


def make_paged(context_lens, num_kv_heads, head_dim, block_size, dtype, extra_blocks=3, seed=0):
    """Random caches whose sequences own randomly permuted (non-contiguous) blocks."""
    g = torch.Generator().manual_seed(seed)
    need = [(n + block_size - 1) // block_size for n in context_lens]
    num_blocks = sum(need) + extra_blocks
    perm = torch.randperm(num_blocks, generator=g).tolist()
    width = max(need)
    tables, at = [], 0
    for n in need:
        row = perm[at : at + n]
        at += n
        tables.append(row + [0] * (width - n))
    shape = (num_blocks, block_size, num_kv_heads, head_dim)
    k_cache = torch.randn(shape, generator=g).to(dtype).to(DEVICE)
    v_cache = torch.randn(shape, generator=g).to(dtype).to(DEVICE)
    bt = torch.tensor(tables, dtype=torch.int32, device=DEVICE)
    return k_cache, v_cache, bt


def worst(a, b):
    return float((a.float() - b.float()).abs().max())


DECODE_CASES = [
    # (group ratio, num_kv_heads, head_dim, block_size, context lengths)
    (1, 2, 64, 16, [1, 16, 17, 5]),
    (3, 2, 64, 16, [32, 1, 100]),
    (4, 1, 128, 32, [64, 33, 1, 7]),
    (6, 2, 128, 16, [47, 48, 49]),
    (8, 1, 64, 32, [1, 95, 96, 200]),
    (4, 2, 128, 32, [31, 32, 33]),
    (3, 3, 80, 16, [1, 15, 16, 33, 64]),  # head_dim 80: the C++ kernels take it, the Triton ones refuse it
]


def op(provider: str, name: str):
    triton = {"paged_decode_attention": paged_decode_attention, "paged_prefill_attention": paged_prefill_attention}
    return getattr(cpu, name) if provider == "cpu" else triton[name]


def skip_unsupported(provider: str, head_dim: int) -> None:
    if provider == "triton" and head_dim & (head_dim - 1):
        pytest.skip("the Triton kernels take power-of-two head dims (a model with another is refused at start-up)")


@pytest.mark.parametrize("provider, dtype", PROVIDERS)
@pytest.mark.parametrize("group, num_kv_heads, head_dim, block_size, lens", DECODE_CASES)
def test_decode_attention_matches_reference(provider, dtype, group, num_kv_heads, head_dim, block_size, lens):
    skip_unsupported(provider, head_dim)
    k_cache, v_cache, bt = make_paged(lens, num_kv_heads, head_dim, block_size, dtype, seed=group * head_dim)
    q = torch.randn(len(lens), num_kv_heads * group, head_dim).to(dtype).to(DEVICE)
    ctx = torch.tensor(lens, dtype=torch.int32, device=DEVICE)
    scale = head_dim**-0.5
    got = op(provider, "paged_decode_attention")(q, k_cache, v_cache, bt, ctx, scale)
    assert got.dtype == dtype and got.shape == q.shape
    expected = reference.paged_decode_attention(q, k_cache, v_cache, bt, ctx, scale)
    atol, rtol = TOL[dtype]
    assert torch.allclose(got.float(), expected.float(), atol=atol, rtol=rtol), f"worst abs error {worst(got, expected):.3g}"


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("group, num_kv_heads, head_dim, block_size, lens", DECODE_CASES[:5])
@pytest.mark.parametrize("num_splits", [1, 4])
@pytest.mark.parametrize("tile", [None, 16, 128])  # default 64; one block (16 -> block_size); wider than a split
def test_triton_decode_attention_splits_and_tiles(dtype, group, num_kv_heads, head_dim, block_size, lens, num_splits,
                                                  tile):
    """The Triton kernel's own launch choices (split-KV, tile width) change nothing but rounding."""
    torch.manual_seed(2)
    k_cache, v_cache, bt = make_paged(lens, num_kv_heads, head_dim, block_size, dtype)
    q = torch.randn(len(lens), num_kv_heads * group, head_dim).to(dtype).to(DEVICE)
    ctx = torch.tensor(lens, dtype=torch.int32, device=DEVICE)
    scale = head_dim**-0.5
    got = paged_decode_attention(q, k_cache, v_cache, bt, ctx, scale, num_splits=num_splits, tile=tile)
    expected = reference.paged_decode_attention(q, k_cache, v_cache, bt, ctx, scale)
    atol, rtol = TOL[dtype]
    assert torch.allclose(got.float(), expected.float(), atol=atol, rtol=rtol), f"worst abs error {worst(got, expected):.3g}"


PREFILL_CASES = [
    # (group, num_kv_heads, head_dim, block_size, [(context_len, new_tokens)])
    (1, 2, 64, 16, [(1, 1), (16, 16), (40, 40)]),
    (3, 1, 64, 16, [(33, 5), (17, 17), (64, 1)]),  # cached prefixes
    (4, 2, 128, 32, [(70, 70), (31, 12)]),
    (6, 1, 64, 16, [(20, 20)]),
    (8, 1, 128, 32, [(96, 40), (5, 5)]),
    (3, 3, 80, 16, [(1, 1), (15, 10), (33, 33), (64, 59)]),  # head_dim 80 (the C++ kernels), prefixes
]


@pytest.mark.parametrize("provider, dtype", PROVIDERS)
@pytest.mark.parametrize("group, num_kv_heads, head_dim, block_size, seqs", PREFILL_CASES)
def test_prefill_attention_matches_reference(provider, dtype, group, num_kv_heads, head_dim, block_size, seqs):
    skip_unsupported(provider, head_dim)
    torch.manual_seed(3)
    lens = [c for c, _ in seqs]
    k_cache, v_cache, bt = make_paged(lens, num_kv_heads, head_dim, block_size, dtype)
    n_new = [n for _, n in seqs]
    cu = torch.tensor([0] + torch.tensor(n_new).cumsum(0).tolist(), dtype=torch.int32, device=DEVICE)
    q = torch.randn(sum(n_new), num_kv_heads * group, head_dim).to(dtype).to(DEVICE)
    ctx = torch.tensor(lens, dtype=torch.int32, device=DEVICE)
    scale = head_dim**-0.5
    got = op(provider, "paged_prefill_attention")(q, k_cache, v_cache, bt, cu, ctx, scale)
    expected = reference.paged_prefill_attention(q, k_cache, v_cache, bt, cu, ctx, scale)
    atol, rtol = TOL[dtype]
    assert torch.allclose(got.float(), expected.float(), atol=atol, rtol=rtol), f"worst abs error {worst(got, expected):.3g}"


HUGE_CACHE_CHECK = r"""
import sys, torch
from elastic_decode.kernels import reference
from elastic_decode.kernels.paged_decode_attention import paged_decode_attention
from elastic_decode.kernels.paged_prefill_attention import paged_prefill_attention
from elastic_decode.kernels.rope_write_kv import rope_write_kv
device = sys.argv[1]
bs, hkv, d = 16, 1, 64
num_blocks = 2**31 // (bs * hkv * d) + 4096  # more than 2**31 elements per cache
# torch.empty: the untouched pages of the 4 GiB caches are never committed.
k_cache = torch.empty(num_blocks, bs, hkv, d, dtype=torch.float16, device=device)
v_cache = torch.empty(num_blocks, bs, hkv, d, dtype=torch.float16, device=device)
blocks = [num_blocks - 1, 5, num_blocks - 3000]
bt = torch.tensor([blocks], dtype=torch.int32, device=device)
n = 40
slots = torch.tensor([blocks[p // bs] * bs + p % bs for p in range(n)], dtype=torch.long, device=device)
k = torch.randn(n, hkv, d, device=device).half()
v = torch.randn(n, hkv, d, device=device).half()
identity = torch.ones(n, d, device=device), torch.zeros(n, d, device=device)  # cos 1, sin 0: k unrotated
rope_write_kv(torch.zeros(n, 1, d, device=device).half(), k, v, torch.arange(n, device=device), *identity,
              k_cache, v_cache, slots)
assert torch.equal(k_cache[blocks[0]], k[:bs]) and torch.equal(v_cache[blocks[2], : n - 2 * bs], v[2 * bs :])
ctx = torch.tensor([n], dtype=torch.int32, device=device)
q = torch.randn(1, 4, d, device=device).half()
for splits in (1, 2):
    got = paged_decode_attention(q, k_cache, v_cache, bt, ctx, 0.125, num_splits=splits)
    ref = reference.paged_decode_attention(q, k_cache, v_cache, bt, ctx, 0.125)
    assert (got.float() - ref.float()).abs().max() < 2e-3, "decode"
qp = torch.randn(n, 4, d, device=device).half()
cu = torch.tensor([0, n], dtype=torch.int32, device=device)
got = paged_prefill_attention(qp, k_cache, v_cache, bt, cu, ctx, 0.125)
ref = reference.paged_prefill_attention(qp, k_cache, v_cache, bt, cu, ctx, 0.125)
assert (got.float() - ref.float()).abs().max() < 2e-3, "prefill"
print("ok")
"""


def test_huge_num_blocks_does_not_overflow_index_arithmetic():
    """Cache offsets beyond 2**31 elements; an int32 overflow crashes or corrupts, so run apart."""
    import os
    import subprocess
    import sys

    result = subprocess.run([sys.executable, "-c", HUGE_CACHE_CHECK, DEVICE], capture_output=True, text=True,
                            timeout=600, env={**os.environ})
    assert result.returncode == 0 and result.stdout.strip() == "ok", (result.returncode, result.stderr[-2000:])
