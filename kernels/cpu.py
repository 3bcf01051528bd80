"""The C++ CPU kernels (csrc/cpu_attention.cpp, in elastic_decode._C) under the op contracts.

Paged decode and prefill attention for CPU tensors: one work item per (sequence, kv head) for decode
and per (sequence, tile of 16 new tokens, kv head) for prefill, each reading a K/V block once for
every query head of its GQA group, an online softmax in fp32, threads from torch's intra-op pool,
AVX-512 / AVX2 / baseline code chosen at load time. The CPU backend (backend.py) selects the decode
kernel; the prefill kernel is tested and measured (`make microbench`) but so far slower than the
reference's batched GEMMs, so the reference keeps prefill and every other op, and stays the oracle.

Plus `linear`: the model's GEMMs on weights that oneDNN has packed once into its blocked layout, which
this CPU BLAS path runs 1.2-2.5x faster than `F.linear` at decode shapes (`make microbench`); and
`sample_with_budget`: the reference's sampler with partial selections instead of sorts and the Philox
numbers from C++: the reference's tokens in about a third of its time at 1 and 16 rows (`make microbench`).
"""
from __future__ import annotations

import os
import weakref

import torch
import torch.nn.functional as F

from . import reference

try:
    from elastic_decode import _C

    HAVE_CPU_KERNELS = all(hasattr(_C, op) for op in ("paged_decode_attention", "philox_uniform", "rope_write_kv"))
except ImportError:  # the extension is not built (an uninstalled checkout)
    HAVE_CPU_KERNELS = False


# The x86 flags (AVX512-BF16, AMX-BF16) of a CPU that computes bfloat16 dot products in hardware, as
# Linux's /proc/cpuinfo spells them. (ARM's BF16 is left out: unmeasured with torch's CPU build.)
NATIVE_BF16_FLAGS = frozenset({"avx512_bf16", "amx_bf16"})


def native_bf16(cpuinfo: str | None = None) -> bool:
    """Whether this CPU computes bfloat16 natively, from the flags its kernel reports (Linux). Not
    guessed from the vendor or the AVX level: without these instructions oneDNN emulates bf16, and a
    batch of 16 decodes at about a quarter of fp32's rate on an AVX2 EPYC (RESULTS.md; batch 1, bound
    by bytes, is faster in bf16 even there). False where unknown. ELASTIC_DECODE_NATIVE_BF16=1 (or 0)
    overrides the reading: the test suite runs once as a CPU with native bf16 would (dtype "auto" is
    then bfloat16), to find the tests that depend on the machine."""
    forced = os.environ.get("ELASTIC_DECODE_NATIVE_BF16")
    if cpuinfo is None and forced in ("0", "1"):
        return forced == "1"
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
_packed: dict[tuple[str, int], tuple[weakref.ref, int, object]] = {}


def _cached(kind: str, weight: torch.Tensor, make):
    """make(weight), kept per (kind, weight tensor) while the weight lives and is not changed in place."""
    key, version = (kind, id(weight)), weight._version
    entry = _packed.get(key)
    if entry is not None and entry[0]() is weight and entry[1] == version:
        return entry[2]
    value = make(weight.detach())
    _packed[key] = (weakref.ref(weight, lambda _, key=key: _packed.pop(key, None)), version, value)
    return value


def _reorder(weight: torch.Tensor) -> torch.Tensor | None:
    try:
        return torch.ops.mkldnn._reorder_linear_weight(weight, _PACK_BATCH_HINT)
    except RuntimeError:  # a dtype or build oneDNN does not pack: plain F.linear for this weight
        return None


def _pack(weight: torch.Tensor) -> torch.Tensor | None:
    return _cached("onednn", weight, _reorder)


def _versioned(t: torch.Tensor) -> bool:
    # Not tensors made under torch.inference_mode (an LLM built inside one): they have no version counter,
    # so an update in place could not be seen.
    return t.device.type == "cpu" and not t.is_inference()


def _cacheable(weight: torch.Tensor) -> bool:
    return weight.dim() == 2 and _versioned(weight)


def _packable(weight: torch.Tensor) -> bool:
    return HAVE_PACKED_LINEAR and _cacheable(weight)


def _no_autograd(weight: torch.Tensor) -> bool:
    return not (torch.is_grad_enabled() and weight.requires_grad)


def prepare_linear(weights, logits_weights=()) -> None:
    """Pack these weights now (at load, after an update) rather than in the first request that uses them:
    about 1.6 s for SmolLM2-135M in fp32 on 2 cores."""
    for weight in [*weights, *logits_weights]:
        if _packable(weight):
            _pack(weight)


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """F.linear's contract (x [rows, in], weight [out, in], bias [out]) on the packed weight."""
    packed = None
    if x.dim() == 2 and x.device.type == "cpu" and x.dtype == weight.dtype and _packable(weight) \
            and _no_autograd(weight):  # autograd: F.linear
        packed = _pack(weight)
    if packed is None:
        return F.linear(x, weight, bias)
    return torch.ops.mkldnn._linear_pointwise(x.contiguous(), packed, bias, "none", [], "")


# int4: weight-only quantization (opt-in, LLM(quantization="int4")) on the C++ GEMMs of csrc/cpu_quant.cpp,
# in the layouts of GGUF's Q4_1 and Q8_0: groups of 32 input columns, float32 scales. The decoder layers'
# weights in 4 bits (w = scale * code + low, code 0..15, each group's min and max as Q4_1's quantizer), the
# LM head in 8 bits (w = scale * code, code -127..127, each group's largest magnitude as Q8_0's):
# quantizing the head to 4 bits too costs far more accuracy than all the layers do
# (benchmarks/quant_agreement.py). Quantized from the loaded weights; a Q4_1/Q8_0 GGUF's weights (the
# embedded model's) come back with their own codes, so its model runs with the file's exact weights. The
# GEMMs take the activations per group of 32 as 16-bit codes (quantize_activations: a rounding of 2^-16 of
# the group's largest magnitude, no argmax token of the embedded model moved by it) and multiply integers;
# the outputs, scales and the low term's sums are float32. A weight whose input width is not a multiple of
# 32 stays dense.
INT4_GROUP = 32
HAVE_QUANTIZED_LINEAR = HAVE_CPU_KERNELS and hasattr(_C, "q4_linear")
HAVE_INT4_DECODER = HAVE_QUANTIZED_LINEAR and hasattr(_C, "Int4Decoder")


def _groups(weight: torch.Tensor) -> torch.Tensor | None:
    rows, cols = weight.shape
    return None if cols % INT4_GROUP else weight.detach().float().reshape(rows, cols // INT4_GROUP, INT4_GROUP)


def _q4(weight: torch.Tensor):
    """(codes uint8 [out, in / 2] in Q4_1's nibble order, scale, low float32 [out, in / 32]), or None."""
    w = _groups(weight)
    if w is None:
        return None
    low = w.amin(-1)
    scale = (w.amax(-1) - low) / 15
    codes = torch.round((w - low[..., None]) / torch.where(scale > 0, scale, 1.0)[..., None]).clamp(0, 15)
    codes = codes.to(torch.uint8)  # byte j of a group: column j low, column j + 16 high
    packed = (codes[..., :16] | (codes[..., 16:] << 4)).reshape(weight.shape[0], -1).contiguous()
    return packed, scale.contiguous(), low.contiguous()


def _q8(weight: torch.Tensor):
    """(codes int8 [out, in], scale float32 [out, in / 32]), or None."""
    w = _groups(weight)
    if w is None:
        return None
    scale = w.abs().amax(-1) / 127
    codes = torch.round(w / torch.where(scale > 0, scale, 1.0)[..., None]).clamp(-127, 127)
    return codes.to(torch.int8).reshape(weight.shape).contiguous(), scale.contiguous()


# bits -> (cache kind, quantizer, name of the _C GEMM)
_QUANTIZERS = {4: ("q4", _q4, "q4_linear"), 8: ("q8", _q8, "q8_linear")}


ACTIVATION_CODE_MAX = 32767


def quantize_activations(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """What the GEMMs compute with in place of float32 x [rows, in]: (its 16-bit codes as float32, one scale per
    group of 32), x ~ codes * scale, the rounding csrc/cpu_quant.cpp does (scale = max|x| / 32767, codes
    rounded half to even). For tests and measurements."""
    groups = x.float().reshape(x.shape[0], -1, INT4_GROUP)
    scale = groups.abs().amax(-1) / ACTIVATION_CODE_MAX
    inverse = torch.where(scale > 0, 1 / scale, torch.zeros_like(scale))
    codes = torch.round(groups * inverse[..., None]).clamp(-ACTIVATION_CODE_MAX, ACTIVATION_CODE_MAX)
    return codes.reshape(x.shape), scale


def dequantize(weight: torch.Tensor, bits: int) -> torch.Tensor:
    """The float32 weights the 4-bit (layers) or 8-bit (LM head) GEMM computes with, for tests and for
    measuring the quantization error."""
    parts = _QUANTIZERS[bits][1](weight)
    if parts is None:
        return weight.detach().float()
    if bits == 8:
        codes, scale = parts
        return (codes.float().reshape(*scale.shape, INT4_GROUP) * scale[..., None]).reshape(weight.shape)
    packed, scale, low = parts
    nibbles = packed.reshape(*scale.shape, 16)
    codes = torch.cat([nibbles & 0x0F, nibbles >> 4], dim=-1).float()
    return (codes * scale[..., None] + low[..., None]).reshape(weight.shape)


def _quantized_linear(bits: int, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None):
    if x.dim() == 2 and x.device.type == "cpu" and _cacheable(weight) and _no_autograd(weight):
        kind, quantize, op = _QUANTIZERS[bits]
        parts = _cached(kind, weight, quantize)
        if parts is not None:
            y = getattr(_C, op)(x.float().contiguous(), *parts).to(x.dtype)
            return y if bias is None else y + bias
    return linear(x, weight, bias)


def int4_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """F.linear's contract on the weight's 4-bit copy (dense `linear` where it has none, and under
    autograd)."""
    return _quantized_linear(4, x, weight, bias)


def int8_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """F.linear's contract on the weight's 8-bit copy (the LM head under quantization="int4")."""
    return _quantized_linear(8, x, weight, bias)


def quantized_reference(x: torch.Tensor, weight: torch.Tensor, bits: int) -> torch.Tensor:
    """The product the 4-bit (layers) or 8-bit (LM head) GEMM computes, in float64 torch: x's 16-bit codes
    times the weights' codes, scaled, plus (4 bits) the low term on x's own group sums."""
    codes, x_scale = quantize_activations(x)
    x_hat = (codes.reshape(*x_scale.shape, INT4_GROUP) * x_scale[..., None]).reshape(x.shape).double()
    if bits == 8:
        return x_hat @ dequantize(weight, 8).double().T
    low = _q4(weight)[2]
    steps = (dequantize(weight, 4) - low.repeat_interleave(INT4_GROUP, dim=1)).double()  # scale * code
    sums = x.double().reshape(x.shape[0], -1, INT4_GROUP).sum(-1)
    return x_hat @ steps.T + sums @ low.double().T


def prepare_int4_linear(weights, logits_weights=()) -> None:
    """Quantize now (at load, after an update): the layers' weights to 4 bits, the LM head to 8; a shape the
    GEMMs do not take is packed dense."""
    for bits, group in ((4, weights), (8, logits_weights)):
        kind, quantize, _ = _QUANTIZERS[bits]
        for weight in group:
            if _cacheable(weight) and _cached(kind, weight, quantize) is None:
                prepare_linear([weight])


# sample_with_budget: the reference's sampler and budget machine, with its two full sorts of the
# vocabulary (top-k's k-th value, top-p's threshold) replaced by a partial selection of the most likely
# tokens (torch.topk: about 20x cheaper than a sort of 49152 columns here, `make microbench`), the
# candidate-buffer idea of the Triton sampler (kernels/sample_with_budget.py). Exact: the leading values
# of a descending sort are the top-k values, and their prefix sums are the same floats (torch's CPU
# cumsum accumulates in double, in order); a row whose candidates miss part of its nucleus takes the sort.
SAMPLER_CANDIDATES = 256
# A row is decided by its candidates when they hold top_p plus this much mass: far above the rounding of
# the prefix sums (an ulp of 1.0 is 1.2e-7), so the first token past them is outside the nucleus as the
# reference's own arithmetic computes it.
_NUCLEUS_MARGIN = 1e-5


def _kth_largest(scaled: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """The k-th largest value of each row ([n, 1]); -inf where k keeps the whole row."""
    vocab = scaled.shape[1]
    limited = k < vocab
    largest = int(k[limited].max())
    kth = torch.topk(scaled, largest, dim=-1).values.gather(1, (k.clamp(max=largest) - 1)[:, None])
    return torch.where(limited[:, None], kth, torch.full_like(kth, float("-inf")))


def _nucleus_threshold(probs: torch.Tensor, top_p: torch.Tensor) -> torch.Tensor:
    vocab = probs.shape[1]
    width = min(SAMPLER_CANDIDATES, vocab)
    top = torch.topk(probs, width, dim=-1).values  # descending
    threshold = reference.nucleus_threshold(top, top_p)
    if width < vocab:
        undecided = (top.sum(dim=-1) < top_p + _NUCLEUS_MARGIN) & (top_p < 1.0)
        if bool(undecided.any()):  # a flat distribution: the nucleus reaches past the candidates
            rows = probs[undecided]
            threshold[undecided] = reference.nucleus_threshold(torch.sort(rows, dim=-1, descending=True).values,
                                                               top_p[undecided])
    return threshold


def filtered_probs(logits: torch.Tensor, params: reference.SamplerParams) -> torch.Tensor:
    """reference.filtered_probs (the same tokens kept, the same values) without sorting the vocabulary."""
    vocab = logits.shape[1]
    temperature = torch.where(params.temperature > 0, params.temperature, torch.ones_like(params.temperature))
    scaled = logits / temperature[:, None]
    top_k = params.top_k.long()
    k = torch.where((top_k <= 0) | (top_k >= vocab), torch.full_like(top_k, vocab), top_k)
    if bool((k < vocab).any()):
        scaled = scaled.masked_fill(scaled < _kth_largest(scaled, k), float("-inf"))
    probs = torch.softmax(scaled, dim=-1)
    keep = torch.ones_like(probs, dtype=torch.bool)
    if bool((params.top_p < 1.0).any()):
        keep &= probs >= _nucleus_threshold(probs, params.top_p)[:, None]
    keep &= probs >= (params.min_p * probs.amax(dim=-1))[:, None]
    return probs * keep


def sample_with_budget(logits: torch.Tensor, params: reference.SamplerParams, state: reference.BudgetState, *,
                       num_chunks: int | None = None, confidence: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    return reference.sample_with_budget(logits, params, state, filter_probs=filtered_probs, uniform=philox_uniform,
                                        confidence=confidence)


def philox_uniform(seed: torch.Tensor, offset: torch.Tensor) -> torch.Tensor:
    """reference.philox_uniform (tl.rand's numbers, bit for bit) as one C++ loop instead of ~200 tensor ops."""
    return _C.philox_uniform(seed, offset)


# The fused elementwise ops (csrc/cpu_ops.cpp): one pass per row for what the reference does in 6 (RMSNorm)
# and about 25 (RoPE + the cache write) tensor ops, the reference's roundings in its order. Inputs the C++
# ops do not take (mixed dtypes, a cache in another dtype, odd strides) go to the reference.


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None = None):
    if x.dim() != 2 or x.stride(-1) != 1 or weight.dtype != x.dtype or not weight.is_contiguous() or \
            (residual is not None and (residual.dtype != x.dtype or residual.stride(-1) != 1)):
        return reference.rms_norm(x, weight, eps, residual)
    normed, total = _C.rms_norm(x, weight, eps, residual)
    return normed if residual is None else (normed, total)


def rope_write_kv(q, k, v, positions, cos_table, sin_table, k_cache, v_cache, slot_mapping, q_norm=None, k_norm=None,
                  eps: float = 0.0) -> torch.Tensor:
    same = q.dtype == k.dtype == v.dtype == k_cache.dtype == v_cache.dtype and cos_table.dtype == torch.float32 \
        and (q_norm is None or q_norm.dtype == k_norm.dtype == q.dtype) and q.shape[-1] % 2 == 0 \
        and k_cache.is_contiguous() and v_cache.is_contiguous()
    if not same:
        return reference.rope_write_kv(q, k, v, positions, cos_table, sin_table, k_cache, v_cache, slot_mapping,
                                       q_norm, k_norm, eps)
    q, k, v = (_heads_contiguous(t) for t in (q, k, v))
    return _C.rope_write_kv(q, k, v, positions.long().contiguous(), cos_table.contiguous(), sin_table.contiguous(),
                            k_cache, v_cache, slot_mapping.long().contiguous(), q_norm, k_norm, eps)


# The decode step's decoder layers in one C++ call under int4 (csrc/cpu_decoder.cpp): the C++ ops the
# per-op forward of models/llama.py calls through this module, in its order and on the same tensors, so the
# same numbers, without the Python between them, which was half of a batch-1 step (RESULTS.md). Built per
# model from its layers (this is the CPU backend of models/llama.py's decoder) and built again when any of
# their tensors changes in place; where a layer would not take the int4 GEMMs (a width not whole groups,
# autograd, bfloat16, tensor parallelism, inference-mode weights), None: the per-op forward runs.
_decoders: dict[int, tuple] = {}


def _decoder_tensors(model) -> list[torch.Tensor]:
    tensors = []
    for layer in model.model.layers:
        attn, mlp = layer.self_attn, layer.mlp
        tensors += [layer.input_layernorm.weight, layer.post_attention_layernorm.weight]
        if attn.spec.qk_norm:
            tensors += [attn.q_norm.weight, attn.k_norm.weight]
        for linear in (attn.qkv_proj, attn.o_proj, mlp.gate_up_proj, mlp.down_proj):
            tensors += [linear.weight] if linear.bias is None else [linear.weight, linear.bias]
    return tensors


def _build_decoder(model, tensors: list[torch.Tensor]):
    if not HAVE_INT4_DECODER or model.tp is not None or model.spec.head_dim % 2 or not tensors \
            or any(t.dtype != torch.float32 or not _versioned(t) for t in tensors):
        return None
    layers = model.model.layers
    first = layers[0].self_attn
    decoder = _C.Int4Decoder(first.num_q_heads, first.num_kv_heads, first.spec.head_dim, layers[0].mlp.sections[0],
                             first.scale)
    for layer in layers:
        attn, mlp, norm_in, norm_post = layer.self_attn, layer.mlp, layer.input_layernorm, layer.post_attention_layernorm
        parts = []
        for linear in (attn.qkv_proj, attn.o_proj, mlp.gate_up_proj, mlp.down_proj):
            q4 = _cached("q4", linear.weight, _q4)
            if q4 is None:
                return None
            parts.append((*q4, None if linear.bias is None else linear.bias.detach()))
        if norm_post.eps != norm_in.eps:
            return None
        norms = (attn.q_norm.weight.detach(), attn.k_norm.weight.detach(), attn.q_norm.eps) if attn.spec.qk_norm \
            else (None, None, 0.0)
        decoder.add_layer(norm_in.weight.detach(), norm_post.weight.detach(), norm_in.eps, *norms, *parts)
    return decoder


def int4_decode_layers(model, x, positions, rope, kv_caches, batch):
    """(the last layer's MLP output, the residual before it) of a decode step, or None (the per-op forward)."""
    if batch.is_prefill or x.dtype != torch.float32 or x.device.type != "cpu":
        return None
    entry = _decoders.get(id(model))
    if entry is None or entry[0]() is not model or [t._version for t in entry[1]] != entry[2]:
        tensors = _decoder_tensors(model)
        entry = (weakref.ref(model, lambda _, key=id(model): _decoders.pop(key, None)), tensors,
                 [t._version for t in tensors], _build_decoder(model, tensors))
        _decoders[id(model)] = entry
    decoder = entry[3]
    if decoder is None or (torch.is_grad_enabled() and any(t.requires_grad for t in entry[1])):
        return None
    k_caches, v_caches = zip(*kv_caches)
    if any(c.dtype != torch.float32 or not c.is_contiguous() for c in (*k_caches, *v_caches)):
        return None
    return decoder.forward(x, positions, rope[0], rope[1], list(k_caches), list(v_caches), batch.slot_mapping,
                           batch.block_tables, batch.context_lens)
