"""The C++ CPU backend's own matters (kernels/cpu.py over csrc/): the attention kernels' input handling,
packed and int4 GEMMs, the sort-free sampler, Philox. Where the C++ kernels implement an op contract the
Triton kernels implement too, their comparison with the reference is the same test, parametrized over the
providers: tests/test_kernels_attention.py, test_kernels_fused.py, test_kernels_rope.py."""
from __future__ import annotations

import pytest
import torch

from elastic_decode.kernels import cpu, reference
from test_kernels_attention import make_paged

pytestmark = pytest.mark.skipif(not cpu.HAVE_CPU_KERNELS, reason="elastic_decode._C built without its CPU kernels")
TOL = {torch.float32: (2e-5, 2e-5), torch.float16: (2e-3, 2e-3), torch.bfloat16: (1.5e-2, 1.5e-2)}
DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def close(got, expected, dtype):
    atol, rtol = TOL[dtype]
    worst = float((got.float() - expected.float()).abs().max())
    assert torch.allclose(got.float(), expected.float(), atol=atol, rtol=rtol), f"worst abs error {worst:.3g}"


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
    key = ("onednn", id(layer.weight))
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
    assert ("onednn", id(w)) not in cpu._packed


# Weight-only int4 (LLM(quantization="int4")): the C++ GEMMs on 4-bit (Q4_1) and 8-bit (Q8_0) weights in
# groups of 32 input columns, activations as 16-bit codes per group, float32 scales and outputs.
quant_only = pytest.mark.skipif(not cpu.HAVE_QUANTIZED_LINEAR, reason="elastic_decode._C built without q4_linear")


def gguf_weight(rows: int, cols: int, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A weight as a Q4_1 or Q8_0 GGUF stores it, dequantized to float32 (as the loader does), and its codes.
    Q4_1: w = d * q + m, the quantizer maps each group's min to code 0 and its max to 15; Q8_0: w = d * q,
    the group's largest magnitude to +-127. d and m are float16 in the file."""
    groups = cols // 32
    d = (torch.rand(rows, groups, 1) * 0.02 + 1e-3).half().float()
    if bits == 4:
        codes = torch.randint(0, 16, (rows, groups, 32))
        codes[..., 0], codes[..., 1] = 0, 15
        m = (-d * torch.rand(rows, groups, 1) * 15).half().float()
    else:
        codes = torch.randint(-127, 128, (rows, groups, 32))
        codes[..., 0] = torch.where(torch.rand(rows, groups) < 0.5, 127, -127)
        m = torch.zeros(1)
    codes = codes[..., torch.randperm(32)]
    return (d * codes + m).reshape(rows, cols), codes.reshape(rows, cols)


@quant_only
@pytest.mark.parametrize("bits", [4, 8])
def test_quantization_keeps_the_codes_and_weights_of_gguf_tensors(bits):
    w, codes = gguf_weight(48, 256, bits)
    if bits == 4:
        packed = cpu._q4(w)[0].reshape(48, 8, 16)
        got = torch.cat([packed & 0x0F, packed >> 4], dim=-1).reshape(48, 256)
    else:
        got = cpu._q8(w)[0]
    assert torch.equal(got.long(), codes)
    # the scales come back from the float32 weights within float32 rounding
    torch.testing.assert_close(cpu.dequantize(w, bits), w, rtol=1e-6, atol=1e-7)


@quant_only
@pytest.mark.parametrize("simd", [True, False])
@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("rows", [1, 2, 3, 4, 5, 16])
def test_quantized_gemms_compute_with_their_quantized_weights(rows, bits, simd):
    w = torch.randn(72, 192) * 0.05  # any weights: min-max (4 bits) or absmax (8 bits) groups
    w[5, 32:64] = 0.25  # a constant group: scale 0 in 4 bits
    w[6, 64:96] = 0.0  # an all-zero group: scale 0 in 8 bits
    x = torch.randn(rows, 192)
    parts = cpu._q4(w) if bits == 4 else cpu._q8(w)
    y = (cpu._C.q4_linear if bits == 4 else cpu._C.q8_linear)(x, *parts, simd=simd)
    dense = cpu.dequantize(w, bits)
    assert dense[5, 32:64].eq(0.25).all() and dense[6, 64:96].eq(0).all()
    expected = cpu.quantized_reference(x, w, bits).float()  # x's 16-bit codes times the weights' codes
    torch.testing.assert_close(y, expected, rtol=1e-5, atol=1e-5)  # float32 arithmetic: ulps apart
    assert not torch.allclose(y, x @ w.T, rtol=1e-3, atol=1e-3)  # 4 or 8 bits: not the dense product
    # from the float32 x's product: no further than each activation's rounding (half a step of its group's
    # scale, max|x| / 32767) times the weights' magnitudes, plus float32 ulps
    _, x_scale = cpu.quantize_activations(x)
    half_steps = (x_scale.repeat_interleave(32, dim=1) / 2).double()
    bound = half_steps @ dense.double().abs().T
    assert ((y.double() - x.double() @ dense.double().T).abs() <= bound + 1e-5).all()


def test_activation_codes_are_16_bit_and_round_half_to_even():
    x = torch.randn(3, 64)
    x[0, :32] = 0.0  # an all-zero group: scale 0, codes 0
    x[1, 0], x[1, 1] = 4.0, 2.5 * 4.0 / 32767  # the group's max -> 32767; 2.5 steps rounds to 2 (half to even)
    codes, scale = cpu.quantize_activations(x)
    assert codes.abs().max() <= 32767 and codes.eq(codes.round()).all()
    assert scale[0, 0] == 0 and codes[0, :32].eq(0).all()
    assert codes[1, 0] == 32767 and codes[1, 1] == 2
    torch.testing.assert_close((codes.reshape(3, 2, 32) * scale[..., None]).reshape(3, 64), x, rtol=0,
                               atol=float(x.abs().max()) / 32767)


@quant_only
def test_quantized_linear_leaves_odd_shapes_dense_and_follows_updates():
    x = torch.randn(2, 48)
    odd = torch.randn(16, 48)  # 48 input columns: not whole groups of 32
    torch.testing.assert_close(cpu.int4_linear(x, odd), x @ odd.T)
    x = torch.randn(3, 64)
    w, bias = torch.randn(20, 64) * 0.05, torch.randn(20)
    for linear, bits in ((cpu.int4_linear, 4), (cpu.int8_linear, 8)):
        expected = cpu.quantized_reference(x, w, bits).float() + bias
        torch.testing.assert_close(linear(x, w, bias), expected, rtol=1e-5, atol=1e-5)
    with torch.no_grad():
        w[:, :32] = torch.randn(20, 32)  # an update in place: quantized again
    torch.testing.assert_close(cpu.int4_linear(x, w), cpu.quantized_reference(x, w, 4).float(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(cpu.int4_linear(x.bfloat16(), w.bfloat16()).float(),  # a 16-bit model: float32
                               cpu.quantized_reference(x.bfloat16().float(), w.bfloat16(), 4).bfloat16().float())
    layer = torch.nn.Linear(64, 32)  # under autograd: F.linear on the dense weight
    cpu.int4_linear(x, layer.weight, layer.bias).sum().backward()
    assert layer.weight.grad is not None


# The CPU sampler: the reference's sampler with partial selections instead of sorts. It must keep the
# same tokens as the reference on every row, whether its candidates hold the nucleus or not.
SAMPLER_SETTINGS = [(1.0, 0, 0.9, 0.0), (0.6, 0, 0.95, 0.0), (0.8, 40, 0.9, 0.0), (1.0, 7, 1.0, 0.0),
                    (1.1, 0, 0.95, 0.02), (0.7, 1, 1.0, 0.0), (1.0, 500, 0.3, 0.0), (0.9, 0, 0.6, 0.1)]


def _mixed_rows(n, vocab, generator):
    """Per row: a setting of SAMPLER_SETTINGS, greedy now and then; a seed; the same params for both."""
    from elastic_decode.kernels import sampling_batch
    params, state = sampling_batch(n, seeds=range(100, 100 + n), generated=2)
    for row in range(n):
        t, k, p, m = SAMPLER_SETTINGS[int(torch.randint(len(SAMPLER_SETTINGS), (), generator=generator))]
        greedy = int(torch.randint(6, (), generator=generator)) == 0
        params.temperature[row], params.top_k[row], params.top_p[row], params.min_p[row] = 0.0 if greedy else t, k, p, m
    return params, state


def _states_equal(a, b):
    return all(torch.equal(getattr(a, f), getattr(b, f)) for f in a.__dataclass_fields__)


@pytest.mark.parametrize("candidates", [4, 64, cpu.SAMPLER_CANDIDATES])
@pytest.mark.parametrize("shape", ["peaked", "flat", "grid", "adjacent"])
def test_cpu_sampler_draws_what_the_reference_draws(monkeypatch, candidates, shape):
    """Tokens, logprobs and budget state equal to the reference's, bit for bit: peaked rows (the nucleus in
    the candidates), flat ones (past them: the sort fallback), logits on a coarse grid (the k-th value and
    the nucleus edge inside runs of ties) and adjacent float32 values (a threshold an ulp off keeps a wrong
    token), with a handful of candidates and with the engine's number."""
    monkeypatch.setattr(cpu, "SAMPLER_CANDIDATES", candidates)
    generator = torch.Generator().manual_seed(hash((candidates, shape)) % 2**31)
    n, vocab = 24, 3000
    if shape == "peaked":
        logits = torch.randn(n, vocab, generator=generator) * 6
    elif shape == "flat":
        logits = torch.randn(n, vocab, generator=generator) * 0.3
    elif shape == "grid":
        logits = torch.randint(-6, 7, (n, vocab), generator=generator).float() / 2
    else:
        ulps = torch.arange(vocab, dtype=torch.int32) + torch.tensor(1.0).view(torch.int32)
        logits = torch.stack([ulps[torch.randperm(vocab, generator=generator)] for _ in range(n)]).view(torch.float32)
    logits[0, :10] = float("-inf")  # suppressed tokens
    for step in range(3):
        p_ref, s_ref = _mixed_rows(n, vocab, torch.Generator().manual_seed(step))
        p_cpu, s_cpu = _mixed_rows(n, vocab, torch.Generator().manual_seed(step))
        expected, expected_logprobs = reference.sample_with_budget(logits, p_ref, s_ref)
        got, got_logprobs = cpu.sample_with_budget(logits, p_cpu, s_cpu)
        assert got.tolist() == expected.tolist(), (shape, step)
        assert torch.equal(got_logprobs, expected_logprobs)
        assert _states_equal(s_cpu, s_ref)
        kept = cpu.filtered_probs(logits, p_cpu) > 0
        assert torch.equal(kept, reference.filtered_probs(logits, p_ref) > 0)


def test_cpu_sampler_sorts_nothing_when_the_candidates_hold_the_nucleus(monkeypatch):
    """A model's peaked rows at the embedded vocabulary: top-k and top-p decided without a sort; a flat
    row (uniform logits: its nucleus is 95% of the vocabulary) sorts that row alone."""
    from elastic_decode.kernels import sampling_batch
    sorted_rows = []
    real_sort = torch.sort
    monkeypatch.setattr(torch, "sort", lambda x, *a, **k: sorted_rows.append(x.shape[0]) or real_sort(x, *a, **k))
    vocab = 49152
    logits = torch.randn(4, vocab, generator=torch.Generator().manual_seed(3)) * 5
    params, state = sampling_batch(4, 0.6, 50, 0.95, seeds=range(4))
    cpu.sample_with_budget(logits, params, state)
    assert sorted_rows == []
    logits[2] = 0.0
    params, state = sampling_batch(4, 0.6, 0, 0.95, seeds=range(4))
    cpu.sample_with_budget(logits, params, state)
    assert sorted_rows == [1]


def test_cpu_philox_is_bit_identical_to_the_reference():
    """Seeds over the whole non-negative int64 range (both key words), offsets over all of 32 bits."""
    generator = torch.Generator().manual_seed(11)
    seed = torch.randint(0, 2**63 - 1, (4096,), generator=generator)
    offset = torch.randint(0, 2**32, (4096,), generator=generator)
    seed[:4] = torch.tensor([0, 1, 2**32, 2**63 - 1])
    offset[:4] = torch.tensor([0, 2**32 - 1, 7, 2**31])
    assert torch.equal(cpu.philox_uniform(seed, offset), reference.philox_uniform(seed, offset))
    steps = (offset & 0x7FFFFFFF).to(torch.int32)  # the engine's offsets: BudgetState.generated, int32
    assert torch.equal(cpu.philox_uniform(seed, steps), reference.philox_uniform(seed, steps))
