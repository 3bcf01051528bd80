"""sample_with_budget: fused sampling + Elastic Reasoning budget machine, one program per row.

Per row, in one launch: suppression for min_think, greedy / temperature sampling with top-k,
top-p and min-p, the logprob of the emitted token, and the phase machine of DESIGN.md
(THINKING -> FORCING -> SOLVING -> DONE) updated in place. DONE rows return at once and emit
PAD_TOKEN; FORCING rows skip the sampling passes.

No sort of the vocabulary: the top-k and top-p thresholds are found by a radix search over
the bit patterns of float32 values (monotone for the order-preserving integer key), the idea of
FlashInfer's sorting-free samplers. Each pass over the row tests RADIX candidate thresholds at
once and narrows the interval RADIX-fold, so a 32-bit key is pinned in 8 passes instead of the
32 of a bisection. Because the threshold is searched exactly, the kept set is the one the
reference's threshold definition gives (ties kept together). The draw is an inverse-CDF scan
in vocabulary order with u = tl.rand(seed, step) (Philox), which reference.philox_uniform
reproduces bit for bit, so a row samples what the reference samples up to float summation
order.

Passes over the row: max/argmax and the softmax sum (2); top-k when on (8, its passes also
give the survivors' mass); top-p when on (8, which also give the nucleus mass); the kept mass
only when min-p is on (1); the draw (1). So 3 passes for plain temperature sampling, 19 for
top-k + top-p and 20 with min-p too (69 with the bisection this replaced). Greedy and forcing
rows stop after the first two.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .budget_state import (
    DONE,
    FINISH_LENGTH,
    FINISH_STOP,
    FORCING,
    PAD_TOKEN,
    SOLVING,
    THINKING,
    BudgetState,
    SamplerParams,
)

# The budget machine's codes as constexprs: a kernel may read module globals only if they are
# tl.constexpr (the interpreter does not enforce it; the compiler raises NameError).
_THINKING = tl.constexpr(THINKING)
_FORCING = tl.constexpr(FORCING)
_SOLVING = tl.constexpr(SOLVING)
_DONE = tl.constexpr(DONE)
_FINISH_STOP = tl.constexpr(FINISH_STOP)
_FINISH_LENGTH = tl.constexpr(FINISH_LENGTH)
_PAD_TOKEN = tl.constexpr(PAD_TOKEN)

BLOCK_V = 1024  # vocabulary tile
RADIX = 16  # candidate thresholds tested per pass: a [BLOCK_V, RADIX] compare tile
SEARCH_PASSES = 8  # RADIX ** 8 = 2 ** 32: enough to pin any 32-bit key exactly


@triton.jit
def _order_key(x):
    """int32 key with the order of the float32 values x (negative floats flipped)."""
    bits = x.to(tl.int32, bitcast=True)
    return tl.where(bits >= 0, bits, bits ^ 0x7FFFFFFF)


@triton.jit
def _masked_logits(logits_ptr, row_off, idx, vocab, sup_tok, sup_stop, stop_ptr, MAX_STOP: tl.constexpr):
    """A tile of fp32 logits with min_think suppression applied (-inf) and -inf past the vocab."""
    x = tl.load(logits_ptr + row_off + idx, mask=idx < vocab, other=float("-inf")).to(tl.float32)
    x = tl.where(idx == sup_tok, float("-inf"), x)
    if sup_stop:
        s = tl.arange(0, MAX_STOP)
        stops = tl.load(stop_ptr + s)  # [MAX_STOP], -1 padded
        hit = tl.sum(((idx[:, None] == stops[None, :]) & (stops[None, :] >= 0)).to(tl.int32), axis=1) > 0
        x = tl.where(hit, float("-inf"), x)
    return x


@triton.jit
def _candidates(lo, hi, RADIX: tl.constexpr):
    """RADIX thresholds lo, lo + step, ... splitting the int64 interval [lo, hi]; and the step.

    Returns (cand int64 [RADIX], the same clamped to hi as int32 [RADIX], step): the search
    bounds need int64 arithmetic, the [BLOCK_V, RADIX] compares over the row only int32 (keys
    are int32; a candidate past hi is ignored by _narrow, so clamping it changes nothing)."""
    step = (hi - lo + RADIX) // RADIX  # ceil((hi - lo + 1) / RADIX) >= 1
    cand = lo + tl.arange(0, RADIX).to(tl.int64) * step
    return cand, tl.minimum(cand, hi).to(tl.int32), step


@triton.jit
def _narrow(lo, hi, cand, step, ok, RADIX: tl.constexpr):
    """Keep the sub-interval starting at the largest candidate where the monotone predicate
    `ok` holds (candidate 0 is lo, which holds by the search's invariant)."""
    r = tl.arange(0, RADIX)
    pick = tl.max(tl.where(ok & (cand <= hi), r, 0), axis=0)
    new_lo = lo + pick.to(tl.int64) * step
    return new_lo, tl.minimum(hi, new_lo + step - 1), pick


@triton.jit
def _sample_with_budget_kernel(
    logits_ptr,  # [num_seqs, vocab], any float dtype
    logits_stride,
    vocab,
    tokens_ptr,  # int64 [num_seqs] out
    logprobs_ptr,  # fp32 [num_seqs] out
    temperature_ptr, top_k_ptr, top_p_ptr, min_p_ptr, seed_ptr,  # [num_seqs]
    think_budget_ptr, solution_budget_ptr, max_new_ptr, min_think_ptr,  # int32 [num_seqs]
    marker_ptr,  # int32 [num_seqs, MAX_MARKER], right-aligned
    marker_len_ptr,  # int32 [num_seqs]
    stop_ids_ptr,  # int32 [num_seqs, MAX_STOP], -1 padded
    phase_ptr, think_ptr, solution_ptr, generated_ptr, force_pos_ptr,  # int32 [num_seqs], in place
    recent_ptr,  # int32 [num_seqs, MAX_MARKER], in place
    forced_end_ptr, forced_ptr, finish_ptr,  # int32 [num_seqs], in place
    MAX_MARKER: tl.constexpr,
    MAX_STOP: tl.constexpr,
    BLOCK_V: tl.constexpr,
    RADIX: tl.constexpr,
    SEARCH_PASSES: tl.constexpr,
):
    row = tl.program_id(0)
    phase = tl.load(phase_ptr + row)
    if phase == _DONE:
        tl.store(tokens_ptr + row, _PAD_TOKEN)
        tl.store(logprobs_ptr + row, 0.0)
        tl.store(forced_ptr + row, 0)
        return

    think = tl.load(think_ptr + row)
    k_len = tl.load(marker_len_ptr + row)
    min_think = tl.load(min_think_ptr + row)
    spent = (phase == _THINKING) & (think >= tl.load(think_budget_ptr + row))
    phase = tl.where(spent, _FORCING, phase)
    force_pos = tl.where(spent, 0, tl.load(force_pos_ptr + row))

    j = tl.arange(0, MAX_MARKER)
    marker = tl.load(marker_ptr + row * MAX_MARKER + j)  # [MAX_MARKER]
    pad = j < MAX_MARKER - k_len  # [MAX_MARKER] columns before E[0]
    recent = tl.load(recent_ptr + row * MAX_MARKER + j)
    shifted = tl.load(recent_ptr + row * MAX_MARKER + j + 1, mask=j < MAX_MARKER - 1, other=-1)  # recent[j + 1]
    stop_row = stop_ids_ptr + row * MAX_STOP

    # min_think: no closing token and no stop token while thinking would end too short.
    thinking = phase == _THINKING
    prefix_ok = tl.sum(tl.where(j < MAX_MARKER - 1, ((shifted == marker) | pad).to(tl.int32), 1), axis=0) == MAX_MARKER
    last_marker = tl.sum(tl.where(j == MAX_MARKER - 1, marker, 0), axis=0)
    sup_tok = tl.where(thinking & prefix_ok & (think - (k_len - 1) < min_think), last_marker, -1)
    sup_stop = thinking & (think < min_think)

    temperature = tl.load(temperature_ptr + row)
    greedy = temperature <= 0.0
    t_eff = tl.where(greedy, 1.0, temperature)
    row_off = row.to(tl.int64) * logits_stride
    offs = tl.arange(0, BLOCK_V)

    # Pass 1: max and first argmax of the masked logits.
    best = float("-inf")
    best_idx = 0
    for start in range(0, vocab, BLOCK_V):
        x = _masked_logits(logits_ptr, row_off, start + offs, vocab, sup_tok, sup_stop, stop_row, MAX_STOP)
        tile_max = tl.max(x, axis=0)
        tile_idx = tl.min(tl.where(x == tile_max, start + offs, 2147483647), axis=0)
        if tile_max > best:
            best = tile_max
            best_idx = tile_idx
    # Pass 2: softmax normaliser at temperature t_eff, written as exp(s - s_max) like the
    # filter passes, so that z is also the unfiltered mass they start from.
    s_max = best / t_eff
    z = 0.0
    for start in range(0, vocab, BLOCK_V):
        x = _masked_logits(logits_ptr, row_off, start + offs, vocab, sup_tok, sup_stop, stop_row, MAX_STOP)
        z += tl.sum(tl.exp(x / t_eff - s_max), axis=0)

    sampled = best_idx
    if (phase != _FORCING) & (temperature > 0.0):
        r = tl.arange(0, RADIX)
        # top-k: the largest key K with count(key(s) >= K) >= k. Invariant: count(key >= lo) >= k.
        # Each pass also sums the mass above every candidate, so the survivors' mass comes free.
        top_k = tl.load(top_k_ptr + row)
        k_lo = tl.full([], -2147483647, tl.int32)  # below every key, -inf included: keep all
        mass = z
        if (top_k > 0) & (top_k < vocab):
            lo = tl.full([], -2147483647, tl.int64)
            hi = _order_key(s_max).to(tl.int64)
            for _ in range(SEARCH_PASSES):
                cand, cand32, step = _candidates(lo, hi, RADIX)  # [RADIX]
                count = tl.zeros([RADIX], tl.int32)
                part = tl.zeros([RADIX], tl.float32)
                for start in range(0, vocab, BLOCK_V):
                    x = _masked_logits(logits_ptr, row_off, start + offs, vocab, sup_tok, sup_stop, stop_row, MAX_STOP)
                    s = x / temperature
                    above = _order_key(s)[:, None] >= cand32[None, :]  # [BLOCK_V, RADIX]
                    count += tl.sum(above.to(tl.int32), axis=0)
                    part += tl.sum(tl.where(above, tl.exp(s - s_max)[:, None], 0.0), axis=0)
                lo, hi, pick = _narrow(lo, hi, cand, step, count >= top_k, RADIX)
                mass = tl.sum(tl.where(r == pick, part, 0.0), axis=0)  # mass(key >= lo)
            k_lo = lo.to(tl.int32)
        # top-p: the largest probability key P with mass(e >= P) >= top_p * mass, where
        # e = exp(s - s_max) <= 1 over the top-k survivors; the nucleus mass comes free too.
        top_p = tl.load(top_p_ptr + row)
        p_lo = tl.full([], 0, tl.int32)
        kept = mass
        if top_p < 1.0:
            lo = tl.zeros([], tl.int64)
            hi = tl.full([], 0x3F800000, tl.int64)  # the bits of 1.0, the largest e
            goal = top_p * mass
            for _ in range(SEARCH_PASSES):
                cand, cand32, step = _candidates(lo, hi, RADIX)  # [RADIX]
                part = tl.zeros([RADIX], tl.float32)
                for start in range(0, vocab, BLOCK_V):
                    x = _masked_logits(logits_ptr, row_off, start + offs, vocab, sup_tok, sup_stop, stop_row, MAX_STOP)
                    s = x / temperature
                    e = tl.where(_order_key(s) >= k_lo, tl.exp(s - s_max), 0.0)  # [BLOCK_V]
                    above = e.to(tl.int32, bitcast=True)[:, None] >= cand32[None, :]  # [BLOCK_V, RADIX]
                    part += tl.sum(tl.where(above, e[:, None], 0.0), axis=0)
                lo, hi, pick = _narrow(lo, hi, cand, step, part >= goal, RADIX)
                kept = tl.sum(tl.where(r == pick, part, 0.0), axis=0)  # mass(e >= lo)
            p_lo = lo.to(tl.int32)
        min_e = tl.load(min_p_ptr + row)  # min_p * max e, and max e = 1
        if min_e > 0.0:  # min-p drops more: sum what is kept
            kept = 0.0
            for start in range(0, vocab, BLOCK_V):
                x = _masked_logits(logits_ptr, row_off, start + offs, vocab, sup_tok, sup_stop, stop_row, MAX_STOP)
                s = x / temperature
                e = tl.where(_order_key(s) >= k_lo, tl.exp(s - s_max), 0.0)
                e = tl.where((e.to(tl.int32, bitcast=True) >= p_lo) & (e >= min_e), e, 0.0)
                kept += tl.sum(e, axis=0)
        # The inverse-CDF draw in vocabulary order.
        seed = tl.load(seed_ptr + row)
        draw_step = tl.load(generated_ptr + row)
        u = tl.max(tl.rand(seed, tl.full([1], 0, tl.int32) + draw_step), axis=0)
        target = u * kept
        running = 0.0
        found = -1
        last_kept = best_idx
        for start in range(0, vocab, BLOCK_V):
            x = _masked_logits(logits_ptr, row_off, start + offs, vocab, sup_tok, sup_stop, stop_row, MAX_STOP)
            s = x / temperature
            e = tl.where(_order_key(s) >= k_lo, tl.exp(s - s_max), 0.0)
            e = tl.where((e.to(tl.int32, bitcast=True) >= p_lo) & (e >= min_e), e, 0.0)
            cdf = running + tl.cumsum(e, axis=0)
            first = tl.min(tl.where(cdf > target, start + offs, 2147483647), axis=0)
            if (found < 0) & (first < 2147483647):
                found = first
            last_kept = tl.maximum(last_kept, tl.max(tl.where(e > 0, start + offs, -1), axis=0))
            running += tl.sum(e, axis=0)
        sampled = tl.where(found >= 0, found, last_kept)

    # -- the budget machine (DESIGN.md), scalar per row ------------------------------
    is_stop = tl.sum(((tl.load(stop_row + tl.arange(0, MAX_STOP)) == sampled)).to(tl.int32), axis=0) > 0
    stop_in_thought = thinking & is_stop
    forcing = (phase == _FORCING) | stop_in_thought
    force_pos = tl.where(stop_in_thought, 0, force_pos)
    think_tok = thinking & (is_stop == 0)
    solve_tok = phase == _SOLVING
    marker_tok = tl.sum(tl.where(j == MAX_MARKER - k_len + force_pos, marker, 0), axis=0)
    token = tl.where(forcing, marker_tok, sampled)
    tl.store(force_pos_ptr + row, tl.where(forcing, force_pos + 1, force_pos))
    tl.store(forced_end_ptr + row, tl.where(forcing, 1, tl.load(forced_end_ptr + row)))
    tl.store(forced_ptr + row, forcing.to(tl.int32))
    # Sampled thinking tokens slide into the window; a window ending in E closes the thought.
    window = tl.where(j == MAX_MARKER - 1, sampled.to(tl.int32), shifted)
    completed = think_tok & (tl.sum(((window == marker) | pad).to(tl.int32), axis=0) == MAX_MARKER)
    tl.store(recent_ptr + row * MAX_MARKER + j, tl.where(think_tok, window, recent))
    tl.store(think_ptr + row, think + think_tok.to(tl.int32) - tl.where(completed, k_len, 0))
    marker_out = (forcing & (force_pos + 1 >= k_len)) | completed
    new_phase = tl.where(forcing, _FORCING, phase)
    new_phase = tl.where(marker_out, _SOLVING, new_phase)
    solution = tl.load(solution_ptr + row) + solve_tok.to(tl.int32)
    tl.store(solution_ptr + row, solution)
    s_budget = tl.load(solution_budget_ptr + row)
    finish_stop = solve_tok & is_stop
    finish_len = (marker_out & (s_budget <= 0)) | (solve_tok & (is_stop == 0) & (solution >= s_budget))
    generated = tl.load(generated_ptr + row) + 1
    tl.store(generated_ptr + row, generated)
    finish_len = finish_len | ((finish_stop == 0) & (generated >= tl.load(max_new_ptr + row)))
    finish = tl.where(finish_stop, _FINISH_STOP, tl.where(finish_len, _FINISH_LENGTH, tl.load(finish_ptr + row)))
    tl.store(finish_ptr + row, finish)
    tl.store(phase_ptr + row, tl.where(finish_stop | finish_len, _DONE, new_phase))
    tl.store(tokens_ptr + row, token.to(tl.int64))
    # Honest logprob of the emitted token (forced ones too) under softmax(masked / t_eff).
    x_tok = tl.load(logits_ptr + row_off + token).to(tl.float32)
    x_tok = tl.where(token == sup_tok, float("-inf"), x_tok)
    tl.store(logprobs_ptr + row, x_tok / t_eff - s_max - tl.log(z))


def _pad_left(t: torch.Tensor, width: int, fill: int) -> torch.Tensor:
    if t.shape[1] == width:
        return t
    return torch.cat([torch.full((t.shape[0], width - t.shape[1]), fill, dtype=t.dtype, device=t.device), t], dim=1)


def sample_with_budget(
    logits: torch.Tensor,  # [num_seqs, vocab]
    params: SamplerParams,
    state: BudgetState,  # updated in place
) -> tuple[torch.Tensor, torch.Tensor]:
    num_seqs, vocab = logits.shape
    if logits.stride(1) != 1:
        logits = logits.contiguous()
    for name, t in [("marker", params.marker), ("stop_ids", params.stop_ids), ("recent", state.recent)]:
        if t.dtype != torch.int32:
            raise ValueError(f"{name} must be int32")
    width = params.marker.shape[1]
    if state.recent.shape[1] != width:
        raise ValueError("state.recent and params.marker must have the same width")
    # Tiles must be powers of two: pad the right-aligned marker/window on the left (columns
    # before E[0] are ignored) and the stop list on the right.
    marker_width = triton.next_power_of_2(width)
    marker = _pad_left(params.marker, marker_width, -2).contiguous()
    recent = _pad_left(state.recent, marker_width, -1).contiguous()
    stop_width = triton.next_power_of_2(max(1, params.stop_ids.shape[1]))
    stop_ids = params.stop_ids
    if stop_ids.shape[1] != stop_width:
        stop_ids = torch.cat([stop_ids, torch.full((num_seqs, stop_width - stop_ids.shape[1]), -1,
                                                   dtype=torch.int32, device=stop_ids.device)], dim=1)
    stop_ids = stop_ids.contiguous()
    tokens = torch.empty(num_seqs, dtype=torch.long, device=logits.device)
    logprobs = torch.empty(num_seqs, dtype=torch.float32, device=logits.device)
    if num_seqs == 0:
        return tokens, logprobs
    _sample_with_budget_kernel[(num_seqs,)](
        logits, logits.stride(0), vocab, tokens, logprobs,
        params.temperature, params.top_k, params.top_p, params.min_p, params.seed,
        params.think_budget, params.solution_budget, params.max_new_tokens, params.min_think,
        marker, params.marker_len, stop_ids,
        state.phase, state.think_count, state.solution_count, state.generated, state.force_pos,
        recent, state.forced_end, state.forced, state.finish,
        MAX_MARKER=marker_width, MAX_STOP=stop_width, BLOCK_V=BLOCK_V, RADIX=RADIX, SEARCH_PASSES=SEARCH_PASSES,
    )
    if recent.data_ptr() != state.recent.data_ptr():
        state.recent.copy_(recent[:, marker_width - width :])
    return tokens, logprobs
