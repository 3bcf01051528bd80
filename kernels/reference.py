"""Pure-torch reference of every kernel op (docs/architecture.md, "Kernel contracts and the reference shape").

These are the ground truth the Triton kernels are tested against and the CPU backend of
the engine, so they are written for clarity first and vectorised enough to run a small
model at a useful speed on a CPU. Attention math is done in float32 whatever the cache
dtype, as the Triton kernels do.

KV cache per layer: k_cache, v_cache [num_blocks, block_size, num_kv_heads, head_dim].
Slot of the token at position p of sequence i: block_tables[i, p // bs] * bs + p % bs.
"""
from __future__ import annotations

from collections.abc import Callable

import torch

from .budget_state import (
    CONF_K,
    DONE,
    FINISH_LENGTH,
    FINISH_NONFINITE,
    FINISH_STOP,
    FORCING,
    PAD_TOKEN,
    SOLVING,
    THINKING,
    BudgetState,
    SamplerParams,
)

# ---------------------------------------------------------------------------------------
# KV cache and attention
# ---------------------------------------------------------------------------------------


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """HF's rotate-half RoPE in x's dtype: x [num_tokens, heads, head_dim], cos/sin [num_tokens, 1, head_dim]."""
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos + rotated * sin


def rope_write_kv(
    q: torch.Tensor,  # [num_tokens, num_q_heads, head_dim]
    k: torch.Tensor,  # [num_tokens, num_kv_heads, head_dim]
    v: torch.Tensor,  # [num_tokens, num_kv_heads, head_dim]
    positions: torch.Tensor,  # int64 [num_tokens]
    cos_table: torch.Tensor,  # fp32 [max_positions, head_dim], rotate-half layout, rope scaling applied
    sin_table: torch.Tensor,  # fp32 [max_positions, head_dim]
    k_cache: torch.Tensor,  # [num_blocks, block_size, num_kv_heads, head_dim]
    v_cache: torch.Tensor,  # [num_blocks, block_size, num_kv_heads, head_dim]
    slot_mapping: torch.Tensor,  # int64 [num_tokens]; < 0 = skip the write
    q_norm: torch.Tensor | None = None,  # [head_dim]: Qwen3's RMSNorm of each head before RoPE
    k_norm: torch.Tensor | None = None,
    eps: float = 0.0,
) -> torch.Tensor:  # rotated q [num_tokens, num_q_heads, head_dim]
    """(Qwen3: RMSNorm each q and k head,) rotate q and k by their positions as HF does (cos/sin
    rounded to the model dtype), write the rotated k and v to the cache slots; returns q."""
    if q_norm is not None:
        q, k = rms_norm(q, q_norm, eps), rms_norm(k, k_norm, eps)
    cos = cos_table[positions].to(q.dtype)[:, None, :]
    sin = sin_table[positions].to(q.dtype)[:, None, :]
    q, k = _rotate(q, cos, sin), _rotate(k, cos, sin)
    keep = slot_mapping >= 0
    slots = slot_mapping[keep]
    num_kv_heads, head_dim = k_cache.shape[2], k_cache.shape[3]
    k_cache.view(-1, num_kv_heads, head_dim)[slots] = k[keep].to(k_cache.dtype)
    v_cache.view(-1, num_kv_heads, head_dim)[slots] = v[keep].to(v_cache.dtype)
    return q


def _gather_context(cache: torch.Tensor, block_table: torch.Tensor, length: int) -> torch.Tensor:
    """Rows 0..length-1 of one or more sequences' paged context.

    block_table: int32 [..., max_blocks]; returns [..., length, num_kv_heads, head_dim].
    """
    block_size = cache.shape[1]
    num_blocks = (length + block_size - 1) // block_size
    blocks = block_table[..., :num_blocks].long().clamp(0, cache.shape[0] - 1)
    gathered = cache[blocks]  # [..., num_blocks, block_size, num_kv_heads, head_dim]
    gathered = gathered.flatten(-4, -3)  # [..., num_blocks * block_size, num_kv_heads, head_dim]
    return gathered[..., :length, :, :]


def paged_decode_attention(
    q: torch.Tensor,  # [num_seqs, num_q_heads, head_dim]
    k_cache: torch.Tensor,  # [num_blocks, block_size, num_kv_heads, head_dim]
    v_cache: torch.Tensor,  # [num_blocks, block_size, num_kv_heads, head_dim]
    block_tables: torch.Tensor,  # int32 [num_seqs, max_blocks_per_seq]
    context_lens: torch.Tensor,  # int32 [num_seqs]; the query sits at position len - 1
    scale: float,
    out: torch.Tensor | None = None,  # [num_seqs, num_q_heads, head_dim]
    *,
    max_context_len: int | None = None,  # known on the host: avoids a device sync
    num_splits: int | None = None,  # accepted for signature parity; the reference never splits
) -> torch.Tensor:
    num_seqs, num_q_heads, head_dim = q.shape
    num_kv_heads = k_cache.shape[2]
    group = num_q_heads // num_kv_heads
    if max_context_len is not None:
        max_len = max_context_len
    else:
        max_len = int(context_lens.max().item()) if num_seqs else 0
    k = _gather_context(k_cache, block_tables, max_len).float()  # [num_seqs, max_len, num_kv_heads, head_dim]
    v = _gather_context(v_cache, block_tables, max_len).float()
    qg = q.float().view(num_seqs, num_kv_heads, group, head_dim)
    scores = torch.einsum("nhgd,nthd->nhgt", qg, k) * scale  # [num_seqs, num_kv_heads, group, max_len]
    pad = torch.arange(max_len, device=q.device)[None, :] >= context_lens[:, None].long()  # [num_seqs, max_len]
    scores = scores.masked_fill(pad[:, None, None, :], float("-inf"))
    probs = torch.softmax(scores, dim=-1)
    result = torch.einsum("nhgt,nthd->nhgd", probs, v).reshape(num_seqs, num_q_heads, head_dim)
    if out is None:
        return result.to(q.dtype)
    out.copy_(result)
    return out


def paged_prefill_attention(
    q: torch.Tensor,  # [num_tokens, num_q_heads, head_dim], packed new tokens
    k_cache: torch.Tensor,  # [num_blocks, block_size, num_kv_heads, head_dim]
    v_cache: torch.Tensor,  # [num_blocks, block_size, num_kv_heads, head_dim]
    block_tables: torch.Tensor,  # int32 [num_seqs, max_blocks_per_seq]
    cu_seqlens_q: torch.Tensor,  # int32 [num_seqs + 1]
    context_lens: torch.Tensor,  # int32 [num_seqs]; new tokens are the last rows of the context
    scale: float,
    out: torch.Tensor | None = None,  # [num_tokens, num_q_heads, head_dim]
    *,
    max_new_tokens: int | None = None,  # accepted for signature parity with the Triton launcher
) -> torch.Tensor:
    num_tokens, num_q_heads, head_dim = q.shape
    num_kv_heads = k_cache.shape[2]
    group = num_q_heads // num_kv_heads
    result = torch.empty(num_tokens, num_q_heads, head_dim, dtype=torch.float32, device=q.device)
    starts = cu_seqlens_q.tolist()
    lens = context_lens.tolist()
    for i, length in enumerate(lens):
        lo, hi = starts[i], starts[i + 1]
        n_new = hi - lo
        if n_new == 0:
            continue
        k = _gather_context(k_cache, block_tables[i], length).float()  # [length, num_kv_heads, head_dim]
        v = _gather_context(v_cache, block_tables[i], length).float()
        qi = q[lo:hi].float().view(n_new, num_kv_heads, group, head_dim)
        scores = torch.einsum("qhgd,thd->hgqt", qi, k) * scale  # [num_kv_heads, group, n_new, length]
        q_pos = torch.arange(length - n_new, length, device=q.device)
        causal = torch.arange(length, device=q.device)[None, :] > q_pos[:, None]  # [n_new, length]
        scores = scores.masked_fill(causal, float("-inf"))
        probs = torch.softmax(scores, dim=-1)
        oi = torch.einsum("hgqt,thd->qhgd", probs, v)  # [n_new, num_kv_heads, group, head_dim]
        result[lo:hi] = oi.reshape(n_new, num_q_heads, head_dim)
    if out is None:
        return result.to(q.dtype)
    out.copy_(result)
    return out


# ---------------------------------------------------------------------------------------
# Counter-based RNG: Philox4x32-10, bit-identical to triton.language.rand(seed, offset)
# ---------------------------------------------------------------------------------------

_MASK32 = 0xFFFFFFFF
_PHILOX_KEY_A, _PHILOX_KEY_B = 0x9E3779B9, 0xBB67AE85
_PHILOX_ROUND_A, _PHILOX_ROUND_B = 0xD2511F53, 0xCD9E8D57


def rms_norm(
    x: torch.Tensor,  # [..., hidden]
    weight: torch.Tensor,  # [hidden]
    eps: float,
    residual: torch.Tensor | None = None,  # like x: added to x first
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """HF's LlamaRMSNorm (fp32 statistics, rounded to x's dtype before the weight), optionally
    after the residual add in x's dtype; with a residual, also returns the sum (the new residual)."""
    if residual is not None:
        x = residual + x
    x32 = x.float()
    normed = weight * (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)
    return normed if residual is None else (normed, x)


def silu_mul(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:  # [num_rows, width] each
    """SwiGLU's product silu(gate) * up in the inputs' dtype."""
    return torch.nn.functional.silu(gate) * up


def philox_uniform(seed: torch.Tensor, offset: torch.Tensor) -> torch.Tensor:
    """Uniform float32 in [0, 1) for each (seed, offset), as `tl.rand(seed, offset)` gives it.

    seed: int64 [n] (non-negative); offset: int32/int64 [n] below 2**32. The arithmetic is
    done on int64 holding 32-bit values, so products of two 32-bit words stay exact.
    """
    seed = seed.long()
    c0 = offset.long() & _MASK32
    c1 = torch.zeros_like(c0)
    c2 = torch.zeros_like(c0)
    c3 = torch.zeros_like(c0)
    k0 = seed & _MASK32
    k1 = (seed >> 32) & _MASK32

    def mul_hi_lo(a: int, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        # a * b as a 64-bit product split into 32-bit words, without int64 overflow:
        # split b into 16-bit halves so every partial product fits in 63 bits.
        b_lo, b_hi = b & 0xFFFF, b >> 16
        lo_part = a * b_lo  # < 2**48
        hi_part = a * b_hi  # < 2**48
        low = (lo_part + ((hi_part & 0xFFFF) << 16)) & _MASK32
        high = (hi_part + (lo_part >> 16)) >> 16
        return high & _MASK32, low

    for _ in range(10):
        hi_b, lo_b = mul_hi_lo(_PHILOX_ROUND_B, c2)
        hi_a, lo_a = mul_hi_lo(_PHILOX_ROUND_A, c0)
        c0, c1, c2, c3 = hi_b ^ c1 ^ k0, lo_b, hi_a ^ c3 ^ k1, lo_a
        k0 = (k0 + _PHILOX_KEY_A) & _MASK32
        k1 = (k1 + _PHILOX_KEY_B) & _MASK32
    # uint_to_uniform_float: reinterpret as int32, fold negatives, scale by ~2**-31.
    x = torch.where(c0 >= 2**31, c0 - 2**32, c0)
    x = torch.where(x < 0, -x - 1, x)
    return x.to(torch.float32) * torch.tensor(4.6566127342e-10, dtype=torch.float32)


# ---------------------------------------------------------------------------------------
# Fused sampler + budget machine
# ---------------------------------------------------------------------------------------


def _is_stop(tokens: torch.Tensor, stop_ids: torch.Tensor) -> torch.Tensor:
    """tokens [n] in the -1-padded stop_ids [n, max_stop]: bool [n]."""
    return ((stop_ids == tokens[:, None]) & (stop_ids >= 0)).any(dim=-1)


def _marker_masks(params: SamplerParams) -> tuple[torch.Tensor, torch.Tensor]:
    """Which right-aligned marker columns are padding, and the column index of each E[j].

    Returns (pad [n, max_marker] bool, first_col [n] long: column of E[0]).
    """
    max_marker = params.marker.shape[1]
    cols = torch.arange(max_marker, device=params.marker.device)
    first_col = max_marker - params.marker_len.long()
    return cols[None, :] < first_col[:, None], first_col


def filtered_probs(logits: torch.Tensor, params: SamplerParams) -> torch.Tensor:
    """Probabilities after temperature, top-k, top-p and min-p, not renormalised.

    logits: float32 [n, vocab] (already with suppressed tokens at -inf). Returns [n, vocab]
    where dropped tokens are 0. Greedy rows are handled by the caller.

    Order as in HF / vLLM: top-k on the scaled logits, top-p over the renormalised top-k
    survivors, min-p relative to the most likely token. The top-p set is defined by a
    threshold (keep every token whose probability is at least the smallest one that the
    nucleus needs), so ties are kept or dropped together; a sort-free kernel that finds the
    threshold by an exact search over float keys selects exactly the same set.
    """
    vocab = logits.shape[1]
    temperature = torch.where(params.temperature > 0, params.temperature, torch.ones_like(params.temperature))
    scaled = logits / temperature[:, None]
    top_k = params.top_k.long()
    k = torch.where((top_k <= 0) | (top_k >= vocab), torch.full_like(top_k, vocab), top_k)
    if bool((k < vocab).any()):  # the sorts are skipped when no row needs them
        sorted_logits = torch.sort(scaled, dim=-1, descending=True).values
        kth = sorted_logits.gather(1, (k - 1)[:, None])  # [n, 1]
        scaled = scaled.masked_fill(scaled < kth, float("-inf"))
    probs = torch.softmax(scaled, dim=-1)  # [n, vocab]

    keep = torch.ones_like(probs, dtype=torch.bool)
    if bool((params.top_p < 1.0).any()):
        sorted_probs = torch.sort(probs, dim=-1, descending=True).values
        threshold = nucleus_threshold(sorted_probs, params.top_p)
        keep &= probs >= threshold[:, None]
    keep &= probs >= (params.min_p * probs.amax(dim=-1))[:, None]
    return probs * keep


def nucleus_threshold(sorted_probs: torch.Tensor, top_p: torch.Tensor) -> torch.Tensor:
    """The top-p threshold of each row from its probabilities sorted in descending order (all of
    them, or a leading part that holds the whole nucleus): the smallest probability whose exclusive
    prefix mass is below top_p; 0 where top_p >= 1. float32 [n]."""
    mass_above = torch.cumsum(sorted_probs, dim=-1) - sorted_probs  # exclusive prefix sum
    in_nucleus = mass_above < top_p[:, None]
    threshold = torch.where(in_nucleus, sorted_probs, torch.ones_like(sorted_probs)).amin(dim=-1)
    return torch.where(top_p >= 1.0, torch.zeros_like(threshold), threshold)


def sample_from_probs(probs: torch.Tensor, uniform: torch.Tensor) -> torch.Tensor:
    """Inverse-CDF draw in vocabulary order: first index whose running sum exceeds u * total.

    probs [n, vocab] (unnormalised, >= 0), uniform [n] -> int64 [n]. Never returns a zero
    probability token, even when rounding puts u * total at the very end.
    """
    cdf = torch.cumsum(probs, dim=-1)
    target = uniform * cdf[:, -1]
    idx = (cdf <= target[:, None]).sum(dim=-1)
    vocab_ids = torch.arange(probs.shape[1], device=probs.device)
    last_positive = torch.where(probs > 0, vocab_ids, torch.zeros_like(vocab_ids)).amax(dim=-1)
    return torch.minimum(idx, last_positive)


def token_confidence(logits: torch.Tensor) -> torch.Tensor:
    """DeepConf's token confidence of each row: minus the mean log-probability of its CONF_K most likely
    tokens under log_softmax(logits) (the raw distribution), float32 [num_seqs]."""
    raw = logits.float()
    top = raw.topk(min(CONF_K, raw.shape[1]), dim=-1).values
    return torch.logsumexp(raw, dim=-1) - top.mean(dim=-1)


def sample_with_budget(
    logits: torch.Tensor,  # [num_seqs, vocab], any float dtype
    params: SamplerParams,
    state: BudgetState,  # updated in place
    *,
    num_chunks: int | None = None,  # accepted for signature parity with the Triton launcher
    # the same results computed faster (kernels/cpu.py): the kept probabilities, the Philox uniforms
    filter_probs: Callable[[torch.Tensor, SamplerParams], torch.Tensor] = filtered_probs,
    uniform: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] = philox_uniform,
    confidence: bool = False,  # also write state.confidence (token_confidence of each row)
) -> tuple[torch.Tensor, torch.Tensor]:
    """One decode step of sampling + the budget machine for every row.

    Returns (next_tokens int64 [num_seqs], logprobs float32 [num_seqs]). The logprob is that
    of the emitted token (sampled or forced) under softmax(logits / T) (T = 1 for greedy)
    with suppressed tokens excluded: an honest number, never a distorted one. DONE rows
    emit PAD_TOKEN with logprob 0 and change nothing.
    """
    logits = logits.float()
    n, vocab = logits.shape
    rows = torch.arange(n, device=logits.device)
    marker_pad, first_col = _marker_masks(params)
    marker_len = params.marker_len.long()

    # A thinking row whose budget is spent forces the marker from its first token.
    spent = (state.phase == THINKING) & (state.think_count >= params.think_budget)
    state.phase[spent] = FORCING
    state.force_pos[spent] = 0

    # min_think: while the thinking would end with fewer than m thinking tokens, neither the
    # token completing the marker nor a stop token (which would force the marker) is allowed.
    thinking = state.phase == THINKING
    prefix_done = ((state.recent[:, 1:] == params.marker[:, :-1]) | marker_pad[:, :-1]).all(dim=-1)
    too_short_marker = thinking & prefix_done & (state.think_count - (marker_len - 1) < params.min_think)
    # min_tokens: no stop token before that many tokens of the request.
    too_short_stop = (thinking & (state.think_count < params.min_think)) | (state.generated < params.min_tokens)
    masked = logits.clone()
    masked[rows[too_short_marker], params.marker[too_short_marker, -1].long()] = float("-inf")
    stop_cols = params.stop_ids.long().clamp(min=0)
    stop_block = too_short_stop[:, None] & (params.stop_ids >= 0)
    masked[rows[:, None].expand_as(stop_cols)[stop_block], stop_cols[stop_block]] = float("-inf")
    # A NaN or +inf logit, or no finite one: the row samples nothing (FINISH_NONFINITE, below).
    nonfinite = torch.isnan(masked).any(-1) | (masked == float("inf")).any(-1) | (masked == float("-inf")).all(-1)

    # Sample every row (cheap in the reference; the Triton kernel skips rows that force).
    greedy = params.temperature <= 0
    argmax = masked.argmax(dim=-1)
    if bool(greedy.all()):
        sampled = argmax
    else:
        drawn = sample_from_probs(filter_probs(masked, params), uniform(params.seed, state.generated))
        sampled = torch.where(greedy, argmax, drawn)  # int64 [n]
    is_stop = _is_stop(sampled, params.stop_ids)

    phase = state.phase.clone()
    active = phase != DONE

    # THINKING rows that sampled a stop token: the marker replaces it (first token now).
    stop_in_thought = (phase == THINKING) & is_stop
    forcing = (phase == FORCING) | stop_in_thought
    force_pos = torch.where(stop_in_thought, torch.zeros_like(state.force_pos), state.force_pos)
    think_tok = (phase == THINKING) & ~is_stop
    solve_tok = phase == SOLVING

    tokens = torch.full((n,), PAD_TOKEN, dtype=torch.long, device=logits.device)
    # E[force_pos]; the column is clamped because rows that are not forcing may hold any pos.
    col = (first_col + force_pos.long()).clamp(max=params.marker.shape[1] - 1)
    tokens = torch.where(forcing, params.marker.gather(1, col[:, None]).squeeze(1).long(), tokens)
    tokens = torch.where(think_tok | solve_tok, sampled, tokens)

    # Forced marker tokens.
    new_force_pos = force_pos + 1
    state.force_pos.copy_(torch.where(forcing, new_force_pos, state.force_pos))
    state.forced.copy_(forcing.int())
    state.forced_end.copy_(torch.where(forcing, torch.ones_like(state.forced_end), state.forced_end))
    marker_out = forcing & (new_force_pos >= params.marker_len)
    new_phase = torch.where(forcing, torch.full_like(phase, FORCING), phase)

    # Sampled thinking tokens: count, slide the window, detect a completed marker.
    window = torch.cat([state.recent[:, 1:], sampled[:, None].int()], dim=1)
    state.recent.copy_(torch.where(think_tok[:, None], window, state.recent))
    completed = think_tok & ((window == params.marker) | marker_pad).all(dim=-1)
    count = state.think_count + think_tok.int()
    state.think_count.copy_(torch.where(completed, count - params.marker_len, count))
    marker_out |= completed

    new_phase = torch.where(marker_out, torch.full_like(phase, SOLVING), new_phase)
    solution_full = marker_out & (params.solution_budget <= 0)

    # Sampled solution tokens.
    state.solution_count.add_(solve_tok.int())
    finish_stop = solve_tok & is_stop
    finish_len = solution_full | (solve_tok & ~is_stop & (state.solution_count >= params.solution_budget))

    state.generated.add_(active.int())
    finish_len |= active & ~finish_stop & (state.generated >= params.max_new_tokens)
    done = finish_stop | finish_len
    new_phase = torch.where(done, torch.full_like(phase, DONE), new_phase)
    state.finish.copy_(
        torch.where(finish_stop, torch.full_like(state.finish, FINISH_STOP), state.finish)
    )
    state.finish.copy_(
        torch.where(finish_len & ~finish_stop, torch.full_like(state.finish, FINISH_LENGTH), state.finish)
    )
    state.phase.copy_(new_phase)

    temperature = torch.where(greedy, torch.ones_like(params.temperature), params.temperature)
    logp = torch.log_softmax(masked / temperature[:, None], dim=-1)
    logprobs = logp.gather(1, tokens.clamp(min=0)[:, None]).squeeze(1)
    logprobs = torch.where(active & ~nonfinite, logprobs, torch.zeros_like(logprobs))
    bad = active & nonfinite
    if confidence:
        state.confidence.copy_(torch.where(active & ~nonfinite, token_confidence(logits), torch.zeros_like(logprobs)))
    state.phase.copy_(torch.where(bad, torch.full_like(state.phase, DONE), state.phase))
    state.finish.copy_(torch.where(bad, torch.full_like(state.finish, FINISH_NONFINITE), state.finish))
    return torch.where(bad, torch.full_like(tokens, PAD_TOKEN), tokens), logprobs
