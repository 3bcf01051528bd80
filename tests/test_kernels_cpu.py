"""The C++ CPU attention kernels (csrc/cpu_attention.cpp via kernels/cpu.py) against the torch reference.

Fresh random inputs every case: GQA ratios 1/3/4/6/8, head dims 64/128 and 80 (not a power of two),
block sizes 16/32, length-1 contexts, exact block boundaries, ragged mixes, permuted block tables;
prefill over a cached prefix (new tokens fewer than the context) and longer than one 16-token tile;
fp32 at the attention tests' tight tolerance, bf16 and fp16 at theirs.
"""
from __future__ import annotations

import pytest
import torch

from elastic_decode.kernels import cpu, reference
from test_kernels_attention import DECODE_CASES, make_paged

pytestmark = pytest.mark.skipif(not cpu.HAVE_CPU_KERNELS, reason="elastic_decode._C built without its CPU kernels")
TOL = {torch.float32: (2e-5, 2e-5), torch.float16: (2e-3, 2e-3), torch.bfloat16: (1.5e-2, 1.5e-2)}
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
CASES = DECODE_CASES + [(3, 3, 80, 16, [1, 15, 16, 33, 64]), (4, 2, 128, 32, [31, 32, 33])]


def close(got, expected, dtype):
    atol, rtol = TOL[dtype]
    worst = float((got.float() - expected.float()).abs().max())
    assert torch.allclose(got.float(), expected.float(), atol=atol, rtol=rtol), f"worst abs error {worst:.3g}"


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("group, num_kv_heads, head_dim, block_size, lens", CASES)
def test_cpu_paged_decode_attention_matches_reference(dtype, group, num_kv_heads, head_dim, block_size, lens):
    k_cache, v_cache, bt = make_paged(lens, num_kv_heads, head_dim, block_size, dtype, seed=group * head_dim)
    q = torch.randn(len(lens), num_kv_heads * group, head_dim).to(dtype)
    ctx = torch.tensor(lens, dtype=torch.int32)
    scale = head_dim**-0.5
    got = cpu.paged_decode_attention(q, k_cache, v_cache, bt, ctx, scale)
    assert got.dtype == dtype and got.shape == q.shape
    close(got, reference.paged_decode_attention(q, k_cache, v_cache, bt, ctx, scale), dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("group, num_kv_heads, head_dim, block_size, lens", CASES)
def test_cpu_paged_prefill_attention_matches_reference(dtype, group, num_kv_heads, head_dim, block_size, lens):
    k_cache, v_cache, bt = make_paged(lens, num_kv_heads, head_dim, block_size, dtype, seed=group + head_dim)
    n_new = [max(1, n - 5) if i % 2 else n for i, n in enumerate(lens)]  # odd rows: a 5-token cached prefix
    cu = torch.tensor([0] + torch.tensor(n_new).cumsum(0).tolist(), dtype=torch.int32)
    q = torch.randn(sum(n_new), num_kv_heads * group, head_dim).to(dtype)
    ctx = torch.tensor(lens, dtype=torch.int32)
    scale = head_dim**-0.5
    got = cpu.paged_prefill_attention(q, k_cache, v_cache, bt, cu, ctx, scale)
    close(got, reference.paged_prefill_attention(q, k_cache, v_cache, bt, cu, ctx, scale), dtype)


def test_cpu_attention_takes_strided_queries_and_writes_out():
    k_cache, v_cache, bt = make_paged([40, 7], 2, 64, 16, torch.float32)
    wide = torch.randn(2, 8, 64)
    q = wide[:, :4]  # heads contiguous, rows 8 heads apart
    ctx = torch.tensor([40, 7], dtype=torch.int32)
    out = torch.empty(2, 4, 64)
    assert cpu.paged_decode_attention(q, k_cache, v_cache, bt, ctx, 0.125, out) is out
    close(out, reference.paged_decode_attention(q, k_cache, v_cache, bt, ctx, 0.125), torch.float32)


def test_cpu_attention_refuses_mismatched_inputs():
    k_cache, v_cache, bt = make_paged([5], 2, 64, 16, torch.float32)
    ctx = torch.tensor([5], dtype=torch.int32)
    with pytest.raises(RuntimeError, match="multiple of num_kv_heads"):
        cpu.paged_decode_attention(torch.randn(1, 3, 64), k_cache, v_cache, bt, ctx, 0.125)
    with pytest.raises(RuntimeError, match="share a dtype"):
        cpu.paged_decode_attention(torch.randn(1, 4, 64).double(), k_cache, v_cache, bt, ctx, 0.125)


# linear on oneDNN-packed weights: F.linear's result up to summation order, on fresh weights, for
# row counts below, at and above the packing hint; a weight changed in place is packed again.
packed_only = pytest.mark.skipif(not cpu.HAVE_PACKED_LINEAR, reason="torch built without oneDNN")
LINEAR_TOL = {torch.float32: (1e-5, 1e-5), torch.bfloat16: (1.5e-2, 1.5e-2)}


@packed_only
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rows", [1, 3, 16, 40])
@pytest.mark.parametrize("in_features, out_features, bias", [(64, 96, False), (80, 1000, True), (576, 960, True)])
def test_packed_linear_matches_f_linear(dtype, rows, in_features, out_features, bias):
    w = (torch.randn(out_features, in_features) / in_features**0.5).to(dtype)
    b = torch.randn(out_features).to(dtype) if bias else None
    x = torch.randn(rows, in_features).to(dtype)
    with torch.inference_mode():
        got = cpu.linear(x, w, b)
    assert got.dtype == dtype and got.shape == (rows, out_features)
    atol, rtol = LINEAR_TOL[dtype]
    expected = torch.nn.functional.linear(x.double(), w.double(), None if b is None else b.double())
    assert torch.allclose(got.double(), expected, atol=atol, rtol=rtol), float((got.double() - expected).abs().max())


@packed_only
def test_packed_linear_follows_in_place_updates_and_forgets_dead_weights():
    layer = torch.nn.Linear(64, 32)
    x = torch.randn(5, 64)
    with torch.no_grad():
        first = cpu.linear(x, layer.weight, layer.bias)
        torch.testing.assert_close(first, layer(x))
        layer.weight.mul_(-2.0)  # an update in place (load_weights, an optimizer step): packed again
        torch.testing.assert_close(cpu.linear(x, layer.weight, layer.bias), layer(x))
        layer.weight[3].zero_()  # through a view (a packed projection's rows)
        torch.testing.assert_close(cpu.linear(x, layer.weight, layer.bias), layer(x))
    key = id(layer.weight)
    assert key in cpu._packed
    del layer
    assert key not in cpu._packed


@packed_only
def test_packed_linear_leaves_autograd_to_f_linear():
    layer = torch.nn.Linear(16, 8)
    x = torch.randn(3, 16)
    y = cpu.linear(x, layer.weight, layer.bias)
    y.sum().backward()
    assert layer.weight.grad is not None


@packed_only
def test_packed_linear_leaves_inference_tensor_weights_unpacked():
    with torch.inference_mode():  # an engine built inside inference mode: its weights have no versions
        w, x = torch.randn(32, 64), torch.randn(2, 64)
        torch.testing.assert_close(cpu.linear(x, w), x @ w.T)
        w.mul_(3.0)
        torch.testing.assert_close(cpu.linear(x, w), x @ w.T)
    assert id(w) not in cpu._packed
