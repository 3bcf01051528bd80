"""sample_with_budget: fused sampling + Elastic Reasoning budget machine, reading each row once.

Per row: min_think suppression, greedy / temperature sampling with top-k, top-p and min-p, the
logprob of the emitted token, and the phase machine of docs/architecture.md (THINKING -> FORCING ->
SOLVING -> DONE) updated in place. DONE rows cost nothing; FORCING and greedy rows need only
the row's max and softmax sum.

Two launches per step:
1. `_scan_kernel`, grid (rows, chunks): the one streaming pass over the logits. Each program
   reads its chunk of the row once and keeps the running max, first argmax and softmax sum
   (online, as flash-attention does), a (max, sum) pair per vocabulary tile, and gathers into
   a small per-chunk buffer every token that may survive the row's filters, with a gather
   threshold that rises as the pass goes (vLLM's Triton top-k/top-p path and FlashInfer's
   sorting-free samplers collect such candidates too; the bounds here are exact, not
   statistical):
   - top-k (k <= COLUMNS): the tile is viewed as COLUMNS columns; the columns' running maxima
     are k distinct tokens once grouped into >= k groups, so the smallest group maximum is a
     lower bound of the row's k-th largest value;
   - top-p without top-k: a token whose probability p_i satisfies vocab * p_i <= (1 - top_p)
     can never be in the nucleus (all tokens at or below it weigh at most 1 - top_p), and the
     running sum is a lower bound of the final one;
   - min-p: below min_p times the running max.
   When the buffer fills, it is compacted in place and gathering goes on above the new bound:
   for top-k its exact k-th largest value; for top-p the probability below which the buffered
   and left-out tokens carry half of the (1 - top_p) tail seen so far (a heuristic: the rest
   of the row could still need them, which the check below catches).
2. `_finish_kernel`, grid (rows,): merges the chunks, finds the exact thresholds by a radix
   search over the buffer only (16 candidate thresholds per pass over the float bit patterns:
   ties kept together, as the reference's threshold definitions do), and draws by inverse CDF
   in vocabulary order over the kept tokens. Whether the buffer suffices is checked, not
   assumed: every token left out of it must lie strictly below a threshold that was computed
   exactly. A row where that fails (a candidate overflow, e.g. top-p near 1 on a flat row, or
   top-k above COLUMNS) takes the exact fallback: the radix search over the whole row (up to
   19 more passes). Rows with no filter draw from the tile sums and re-read one tile.

So the common rows read their logits once, plus one tile for unfiltered draws; the draw uses
u = tl.rand(seed, step) (Philox), which reference.philox_uniform reproduces bit for bit, and a
row samples what the reference samples up to float summation order, whatever its batch.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .budget_state import (
    CONF_K,
    DONE,
    FINISH_LENGTH,
    FINISH_NONFINITE,
    FINISH_STOP,
    FORCING,
    MARKER_PAD,
    MAX_MARKER_TOKENS,
    PAD_TOKEN,
    RECENT_PAD,
    SOLVING,
    STOP_PAD,
    THINKING,
    BudgetState,
    SamplerParams,
)
from .device_guard import on_tensor_device
from .launch_policy import choose_num_chunks, num_sms

# The budget machine's codes as constexprs: a kernel may read module globals only if they are
# tl.constexpr (the interpreter does not enforce it; the compiler raises NameError).
_THINKING = tl.constexpr(THINKING)
_FORCING = tl.constexpr(FORCING)
_SOLVING = tl.constexpr(SOLVING)
_DONE = tl.constexpr(DONE)
_FINISH_STOP = tl.constexpr(FINISH_STOP)
_FINISH_LENGTH = tl.constexpr(FINISH_LENGTH)
_FINISH_NONFINITE = tl.constexpr(FINISH_NONFINITE)
_PAD_TOKEN = tl.constexpr(PAD_TOKEN)
_MARKER_PAD = tl.constexpr(MARKER_PAD)
_RECENT_PAD = tl.constexpr(RECENT_PAD)
_STOP_PAD = tl.constexpr(STOP_PAD)
_MIN_KEY = tl.constexpr(-2147483647)  # below the order key of every float, -inf included
_NO_INDEX = tl.constexpr(2147483647)
_TOPK = tl.constexpr(0)  # radix search modes
_TOPP = tl.constexpr(1)
_TAIL = tl.constexpr(2)

BLOCK_V = 1024  # vocabulary tile of the scan: 4 values per thread at 8 warps (8 spill registers)
COLUMNS = 128  # top-k column bound: exact for k <= COLUMNS
CAPACITY = 4096  # candidate buffer per chunk (int32 index + fp32 value: 32 KB, L2-resident)
TAIL_SHARE = 0.5  # top-p compaction drops the bottom TAIL_SHARE of the (1 - top_p) tail seen so far
SEARCH_BLOCK = 128  # buffer entries per search step: a [SEARCH_BLOCK, RADIX] compare tile
RADIX = 16  # candidate thresholds tested per search pass
SEARCH_PASSES = 8  # RADIX ** 8 = 2 ** 32: enough to pin any 32-bit key exactly
STOP_BLOCK = 16  # stop ids compared per step
MAX_TILES = 256  # tile sums merged per step of the unfiltered draw
CONF_CAPACITY = 256  # raw values per chunk that may be among the row's CONF_K largest (fp32: 1 KB)
SCAN_WARPS = 8
FINISH_WARPS = 8  # with 4, ptxas spills the search tiles
# Left to itself ptxas holds the finish kernel to 64 registers and spills; 128 still lets two
# programs (16 warps) share an SM, and the kernel is one program per row.
FINISH_REGISTERS = 128


# -- shared pieces ----------------------------------------------------------------------------


@triton.jit
def _order_key(x):
    """int32 key with the order of the float32 values x (negative floats flipped)."""
    bits = x.to(tl.int32, bitcast=True)
    return tl.where(bits >= 0, bits, bits ^ 0x7FFFFFFF)


@triton.jit
def _key_value(key):
    """The float32 whose order key is `key` (the map is its own inverse)."""
    return tl.where(key >= 0, key, key ^ 0x7FFFFFFF).to(tl.float32, bitcast=True)


@triton.jit
def _candidates(lo, hi, RADIX: tl.constexpr):
    """RADIX thresholds lo, lo + step, ... splitting the int64 interval [lo, hi]; and the step.

    Returns (cand int64 [RADIX], the same clamped to hi as int32 [RADIX], step): the search
    bounds need int64 arithmetic, the compares only int32 (a candidate past hi is ignored by
    _narrow, so clamping it changes nothing)."""
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
def _row_setup(row, phase_ptr, think_ptr, think_budget_ptr, min_think_ptr, min_tokens_ptr, generated_ptr, marker_ptr,
               marker_len_ptr, recent_ptr, marker_width, MAX_MARKER: tl.constexpr):
    """The row's phase after a spent budget turns THINKING into FORCING, and what min_think and
    min_tokens suppress: the token completing the marker (or -1) and whether stop ids are suppressed.

    marker and recent rows are right-aligned [marker_width]; in registers they are right-aligned
    in MAX_MARKER columns (columns before the row's marker are padding)."""
    phase = tl.load(phase_ptr + row)
    think = tl.load(think_ptr + row)
    spent = (phase == _THINKING) & (think >= tl.load(think_budget_ptr + row))
    phase = tl.where(spent, _FORCING, phase)
    k_len = tl.load(marker_len_ptr + row)
    j = tl.arange(0, MAX_MARKER)
    col = j - (MAX_MARKER - marker_width)  # [MAX_MARKER] column in the stored rows
    stored = col >= 0
    base = row.to(tl.int64) * marker_width
    marker = tl.load(marker_ptr + base + col, mask=stored, other=_MARKER_PAD)  # [MAX_MARKER]
    recent = tl.load(recent_ptr + base + col, mask=stored, other=_RECENT_PAD)
    shifted = tl.load(recent_ptr + base + col + 1, mask=stored & (j < MAX_MARKER - 1), other=_RECENT_PAD)  # recent[j + 1]
    pad = j < MAX_MARKER - k_len  # columns before E[0]
    thinking = phase == _THINKING
    min_think = tl.load(min_think_ptr + row)
    prefix_ok = tl.sum(tl.where(j < MAX_MARKER - 1, ((shifted == marker) | pad).to(tl.int32), 1), axis=0) == MAX_MARKER
    last_marker = tl.sum(tl.where(j == MAX_MARKER - 1, marker, 0), axis=0)
    sup_tok = tl.where(thinking & prefix_ok & (think - (k_len - 1) < min_think), last_marker, -1)
    sup_stop = (thinking & (think < min_think)) | (tl.load(generated_ptr + row) < tl.load(min_tokens_ptr + row))
    return phase, think, k_len, j, marker, recent, shifted, pad, sup_tok, sup_stop


@triton.jit
def _masked_logits(logits_ptr, row_off, idx, end, sup_tok, sup_stop, stop_ptr, num_stop):
    """fp32 logits at idx (any shape) with min_think suppression (-inf) and -inf from `end` on."""
    x = tl.load(logits_ptr + row_off + idx, mask=idx < end, other=float("-inf"))
    return _suppress(x, idx, sup_tok, sup_stop, stop_ptr, num_stop)


@triton.jit
def _suppress(x, idx, sup_tok, sup_stop, stop_ptr, num_stop):
    """x (logits at idx, any float dtype) as fp32, with min_think's and min_tokens' suppressed tokens at -inf."""
    x = tl.where(idx == sup_tok, float("-inf"), x.to(tl.float32))
    if sup_stop:  # rare (early thinking under min_think, or before min_tokens): one compare per stop id
        for i in range(0, num_stop):
            stop = tl.load(stop_ptr + i)
            x = tl.where((idx == stop) & (stop >= 0), float("-inf"), x)
    return x


@triton.jit
def _segment_sums(val_ptr, count, cand32, m, k_lo, MODE: tl.constexpr, RADIX: tl.constexpr,
                  BLOCK: tl.constexpr):
    """Per candidate threshold, over `count` buffered values s (fp32):
    _TOPK: (#{key(s) >= c}, sum exp(s - m) over them);
    _TOPP: (0, sum of e = exp(s - m) over key(s) >= k_lo with bits(e) >= c);
    _TAIL: (0, sum of e over bits(e) <= c)."""
    cnt = tl.zeros([RADIX], tl.int32)
    mass = tl.zeros([RADIX], tl.float32)
    for t0 in range(0, count, BLOCK):
        o = t0 + tl.arange(0, BLOCK)
        valid = o < count
        s = tl.load(val_ptr + o, mask=valid, other=float("-inf"))  # [BLOCK]
        e = tl.exp(s - m)  # 0 past the count
        if MODE == _TOPK:
            above = (_order_key(s)[:, None] >= cand32[None, :]) & valid[:, None]  # [BLOCK, RADIX]
            cnt += tl.sum(above.to(tl.int32), axis=0)
            mass += tl.sum(tl.where(above, e[:, None], 0.0), axis=0)
        elif MODE == _TOPP:
            e = tl.where(_order_key(s) >= k_lo, e, 0.0)
            above = e.to(tl.int32, bitcast=True)[:, None] >= cand32[None, :]  # [BLOCK, RADIX]
            mass += tl.sum(tl.where(above, e[:, None], 0.0), axis=0)
        else:
            below = e.to(tl.int32, bitcast=True)[:, None] <= cand32[None, :]  # [BLOCK, RADIX]
            mass += tl.sum(tl.where(below, e[:, None], 0.0), axis=0)
    return cnt, mass


@triton.jit
def _buffer_search(val_ptr, cnt_ptr, num_chunks, chunk_stride, lo, hi, m, k_lo, goal, extra, slope,
                   MODE: tl.constexpr, RADIX: tl.constexpr, SEARCH_PASSES: tl.constexpr, BLOCK: tl.constexpr):
    """Radix search over the buffered values of `num_chunks` chunks (chunk c: values at
    val_ptr + c * chunk_stride, its count at cnt_ptr + c * 4): the largest key in [lo, hi] where
    _TOPK: count(key >= K) >= goal;  _TOPP: mass(e >= K) >= goal;
    _TAIL: mass(e <= K) + extra + slope * value(K) <= goal.
    Returns (key, the mass at it: above it for _TOPK/_TOPP, at or below it for _TAIL)."""
    r = tl.arange(0, RADIX)
    mass_at = 0.0
    for _ in range(SEARCH_PASSES):
        cand, cand32, step = _candidates(lo, hi, RADIX)
        cnt = tl.zeros([RADIX], tl.int32)
        mass = tl.zeros([RADIX], tl.float32)
        for c in range(0, num_chunks):
            count = tl.load(cnt_ptr + c * 4)
            dc, dm = _segment_sums(val_ptr + c * chunk_stride, count, cand32, m, k_lo, MODE, RADIX, BLOCK)
            cnt += dc
            mass += dm
        if MODE == _TOPK:
            ok = cnt >= goal
        elif MODE == _TOPP:
            ok = mass >= goal
        else:
            ok = mass + extra + slope * cand32.to(tl.float32, bitcast=True) <= goal
        lo, hi, pick = _narrow(lo, hi, cand, step, ok, RADIX)
        mass_at = tl.sum(tl.where(r == pick, mass, 0.0), axis=0)
    return lo, mass_at


@triton.jit
def _compact(buf_val, buf_idx, cnt_ptr, count, g, m, z, z_out, s_out, top_k, top_p, topk_on, topp_on,
             RADIX: tl.constexpr, SEARCH_PASSES: tl.constexpr, BLOCK: tl.constexpr, TAIL_SHARE: tl.constexpr):
    """Compact a full candidate buffer in place above a bound computed over its own contents;
    returns (count, the bound in s, s_out, z_out) with the dropped values added to what is out.
    Not inlined: it runs rarely, and its tiles need not share registers with the scan's."""
    tl.debug_barrier()  # this program's buffer stores are visible to all its threads
    drop_s = g
    drop_e = -1.0
    if topk_on:
        kk, _ = _buffer_search(buf_val, cnt_ptr, 1, 0, tl.full([], _MIN_KEY, tl.int64), _order_key(m).to(tl.int64),
                               m, _MIN_KEY, top_k, 0.0, 0.0, _TOPK, RADIX, SEARCH_PASSES, BLOCK)
        drop_s = tl.maximum(drop_s, _key_value(kk.to(tl.int32)))
    elif topp_on:
        # The largest probability v such that the buffered tokens at or below v and the seen
        # tokens left out weigh at most TAIL_SHARE of the (1 - top_p) tail of what this chunk has
        # seen. A heuristic (the unseen rest of the row could prove it wrong), so the finish
        # kernel checks that the nucleus stays above v.
        kv, _ = _buffer_search(buf_val, cnt_ptr, 1, 0, tl.zeros([], tl.int64), tl.full([], 0x3F800000, tl.int64),
                               m, _MIN_KEY, TAIL_SHARE * (1.0 - top_p) * z, z_out, 0.0, _TAIL, RADIX,
                               SEARCH_PASSES, BLOCK)
        drop_e = kv.to(tl.int32).to(tl.float32, bitcast=True)
        drop_s = tl.maximum(drop_s, m + tl.log(drop_e))
    kept = 0
    for t0 in range(0, count, BLOCK):
        o = t0 + tl.arange(0, BLOCK)
        valid = o < count
        bv = tl.load(buf_val + o, mask=valid, other=float("-inf"))
        bi = tl.load(buf_idx + o, mask=valid, other=0)
        be = tl.exp(bv - m)
        stay = valid & (bv >= drop_s) & (be > drop_e)
        gone = valid & (stay == 0)
        s_out = tl.maximum(s_out, tl.max(tl.where(gone, bv, float("-inf")), axis=0))
        z_out += tl.sum(tl.where(gone, be, 0.0), axis=0)
        pos = kept + tl.cumsum(stay.to(tl.int32), axis=0) - 1
        tl.debug_barrier()  # every thread has read this block before any writes into it
        tl.store(buf_val + pos, bv, mask=stay)
        tl.store(buf_idx + pos, bi, mask=stay)
        kept += tl.sum(stay.to(tl.int32), axis=0)
    tl.store(cnt_ptr, kept)
    tl.debug_barrier()
    return kept, drop_s, s_out, z_out


@triton.jit
def _append(buf_idx, buf_val, cnt_ptr, count, idx, s, g, g_first, m, s_out, z_out, CAPACITY: tl.constexpr):
    """Append a tile's values s >= g (idx, s: [R, COLUMNS]) to the buffer in vocabulary order.
    Values in [g_first, g) were candidates before a compaction raised the bound: they join what
    is left out. Returns (count, overflowed, s_out, z_out); an overflowing tile appends nothing."""
    keep = (s >= g) & (s > float("-inf"))
    late = (keep == 0) & (s >= g_first) & (s > float("-inf"))
    s_out = tl.maximum(s_out, tl.max(tl.max(tl.where(late, s, float("-inf")), axis=1), axis=0))
    z_out += tl.sum(tl.sum(tl.where(late, tl.exp(s - m), 0.0), axis=1), axis=0)
    n_new = tl.sum(tl.sum(keep.to(tl.int32), axis=1), axis=0)
    overflow = (count + n_new > CAPACITY).to(tl.int32)
    if overflow == 0:
        in_row = tl.cumsum(keep.to(tl.int32), axis=1)  # [R, COLUMNS] rank within a tile row
        row_n = tl.sum(keep.to(tl.int32), axis=1)  # [R]
        pos = count + (tl.cumsum(row_n, axis=0) - row_n)[:, None] + in_row - 1
        tl.store(buf_idx + pos, idx, mask=keep)
        tl.store(buf_val + pos, s, mask=keep)
        count += n_new
        tl.store(cnt_ptr, count)
    return count, overflow, s_out, z_out


@triton.jit
def _conf_compact(buf, cnt_ptr, count, tau, m, CONF_K: tl.constexpr, RADIX: tl.constexpr,
                  SEARCH_PASSES: tl.constexpr, BLOCK: tl.constexpr):
    """A full confidence buffer (raw values > tau) cut to the values above its own CONF_K-th largest, which
    becomes the new tau (fewer than CONF_K values stay). Returns (count, tau)."""
    tl.store(cnt_ptr, count)
    tl.debug_barrier()  # this program's buffer stores and count are visible to all its threads
    kk, _ = _buffer_search(buf, cnt_ptr, 1, 0, _order_key(tau).to(tl.int64), _order_key(m).to(tl.int64), m, _MIN_KEY,
                           CONF_K, 0.0, 0.0, _TOPK, RADIX, SEARCH_PASSES, BLOCK)
    tau = tl.maximum(tau, _key_value(kk.to(tl.int32)))
    kept = 0
    for t0 in range(0, count, BLOCK):
        o = t0 + tl.arange(0, BLOCK)
        v = tl.load(buf + o, mask=o < count, other=float("-inf"))
        stay = (o < count) & (v > tau)
        pos = kept + tl.cumsum(stay.to(tl.int32), axis=0) - 1
        tl.debug_barrier()  # every thread has read this block before any writes into it
        tl.store(buf + pos, v, mask=stay)
        kept += tl.sum(stay.to(tl.int32), axis=0)
    tl.debug_barrier()
    return kept, tau


@triton.jit
def _conf_sum(val_ptr, cnt_ptr, num_chunks, chunk_stride, key, BLOCK: tl.constexpr):
    """(count, sum) of the buffered raw values whose order key is above `key`, over every chunk."""
    cnt = 0
    total = 0.0
    for c in range(0, num_chunks):
        count = tl.load(cnt_ptr + c * 4)
        for t0 in range(0, count, BLOCK):
            o = t0 + tl.arange(0, BLOCK)
            v = tl.load(val_ptr + c * chunk_stride + o, mask=o < count, other=float("-inf"))
            above = (o < count) & (_order_key(v) > key)
            cnt += tl.sum(above.to(tl.int32), axis=0)
            total += tl.sum(tl.where(above, v, 0.0), axis=0)
    return cnt, total


@triton.jit
def _conf_from_row(logits_ptr, row_off, vocab, m, k, RADIX: tl.constexpr, SEARCH_PASSES: tl.constexpr,
                   BLOCK: tl.constexpr):
    """The fallback of a chunk whose confidence buffer overflowed (a row ordered against the scan): the k-th
    largest raw value's key by radix search over the whole row, and (count, sum) of the values above it."""
    offs = tl.arange(0, BLOCK)
    lo = tl.full([], _MIN_KEY, tl.int64)
    hi = _order_key(m).to(tl.int64)
    for _ in range(SEARCH_PASSES):
        cand, cand32, step = _candidates(lo, hi, RADIX)
        count = tl.zeros([RADIX], tl.int32)
        for start in range(0, vocab, BLOCK):
            x = tl.load(logits_ptr + row_off + start + offs, mask=start + offs < vocab, other=float("-inf"))
            above = _order_key(x.to(tl.float32))[:, None] >= cand32[None, :]  # [BLOCK, RADIX]
            count += tl.sum(above.to(tl.int32), axis=0)
        lo, hi, _ = _narrow(lo, hi, cand, step, count >= k, RADIX)
    key = lo.to(tl.int32)
    cnt = 0
    total = 0.0
    for start in range(0, vocab, BLOCK):
        x = tl.load(logits_ptr + row_off + start + offs, mask=start + offs < vocab, other=float("-inf")).to(tl.float32)
        above = (start + offs < vocab) & (_order_key(x) > key)
        cnt += tl.sum(above.to(tl.int32), axis=0)
        total += tl.sum(tl.where(above, x, 0.0), axis=0)
    return key, cnt, total


# -- kernel 1: the streaming pass --------------------------------------------------------------


# Runtime values that vary with the batch are not specialised on (a value of 1 or a multiple of
# 16 would otherwise compile another variant mid-run).
@triton.jit(do_not_specialize=["chunk_tiles", "marker_width", "num_stop"])
def _scan_kernel(
    logits_ptr,  # [num_seqs, vocab], any float dtype
    logits_stride,
    vocab,
    chunk_tiles,  # tiles of BLOCK_V tokens per chunk (so the compiler knows chunks start tile-aligned)
    temperature_ptr, top_k_ptr, top_p_ptr, min_p_ptr,  # [num_seqs]
    think_budget_ptr, min_think_ptr, min_tokens_ptr,  # int32 [num_seqs]
    marker_ptr,  # int32 [num_seqs, marker_width], right-aligned
    marker_len_ptr,  # int32 [num_seqs]
    marker_width,
    stop_ids_ptr,  # int32 [num_seqs, num_stop], STOP_PAD padded
    num_stop,
    phase_ptr, think_ptr, generated_ptr,  # int32 [num_seqs]
    recent_ptr,  # int32 [num_seqs, marker_width]
    tile_ptr,  # fp32 [num_seqs, num_tiles, 2] out: each tile's (max s, sum exp(s - max))
    num_tiles,
    stat_ptr,  # fp32 [num_seqs, num_chunks, 4] out: (max s, sum exp(s - max), max s left out of the buffer, -)
    count_ptr,  # int32 [num_seqs, num_chunks, 4] out: (first argmax, buffered, overflowed, confidence buffered)
    buf_idx_ptr,  # int32 [num_seqs, num_chunks, CAPACITY] out: token ids of the candidates
    buf_val_ptr,  # fp32 [num_seqs, num_chunks, CAPACITY] out: their s = logit / temperature
    conf_stat_ptr,  # fp32 [num_seqs, num_chunks, 4] out: raw (max, sum exp(x - max), tau, -) for the confidence
    conf_buf_ptr,  # fp32 [num_seqs, num_chunks, CONF_CAPACITY] out: raw values > tau (count at count_ptr's 4th)
    BLOCK_V: tl.constexpr,
    COLUMNS: tl.constexpr,
    CAPACITY: tl.constexpr,
    CONF_K: tl.constexpr,
    CONF_CAPACITY: tl.constexpr,
    CONFIDENCE: tl.constexpr,  # compute the token confidence (a variant of its own: it costs registers)
    MAX_MARKER: tl.constexpr,
    RADIX: tl.constexpr,
    SEARCH_PASSES: tl.constexpr,
    SEARCH_BLOCK: tl.constexpr,
    TAIL_SHARE: tl.constexpr,
):
    row = tl.program_id(0)
    chunk = tl.program_id(1)
    num_chunks = tl.num_programs(1)
    if tl.load(phase_ptr + row) == _DONE:
        return
    phase, think, k_len, j, marker, recent, shifted, pad, sup_tok, sup_stop = _row_setup(
        row, phase_ptr, think_ptr, think_budget_ptr, min_think_ptr, min_tokens_ptr, generated_ptr, marker_ptr,
        marker_len_ptr, recent_ptr, marker_width, MAX_MARKER)
    temperature = tl.load(temperature_ptr + row)
    t_eff = tl.where(temperature > 0.0, temperature, 1.0)
    sampling = (phase != _FORCING) & (temperature > 0.0)
    top_k = tl.load(top_k_ptr + row)
    top_p = tl.load(top_p_ptr + row)
    min_p = tl.load(min_p_ptr + row)
    topk_on = sampling & (top_k > 0) & (top_k < vocab)
    topp_on = sampling & (top_p < 1.0)
    minp_on = sampling & (min_p > 0.0)
    gathering = (topk_on | topp_on | minp_on).to(tl.int32)
    # log of the top-p tail bound's factor (1 - top_p) / vocab: only without top-k, whose
    # survivors' sum is not the row's.
    tail_log = tl.log(tl.maximum(1.0 - top_p, 1e-30) / vocab.to(tl.float32))
    min_p_log = tl.log(tl.maximum(min_p, 1e-30))

    row64 = row.to(tl.int64)
    row_off = row64 * logits_stride
    stop_row = stop_ids_ptr + row64 * num_stop
    slot = row64 * num_chunks + chunk
    buf_idx = buf_idx_ptr + slot * CAPACITY
    buf_val = buf_val_ptr + slot * CAPACITY
    lo = chunk * chunk_tiles * BLOCK_V
    end = tl.minimum(lo + chunk_tiles * BLOCK_V, vocab)

    R: tl.constexpr = BLOCK_V // COLUMNS
    rr = tl.arange(0, R)
    cc = tl.arange(0, COLUMNS)
    flat = rr[:, None] * COLUMNS + cc[None, :]  # [R, COLUMNS]: the tile in row-major order
    m = float("-inf")
    z = 0.0  # sum of exp(s - m) over the chunk so far
    arg = 0
    s_out = float("-inf")  # the largest s seen and not in the buffer
    z_out = 0.0  # sum of exp(s - m) over those
    count = 0
    overflow = 0
    floor = float("-inf")  # gather bound left by compactions
    colmax = tl.full([COLUMNS], float("-inf"), tl.float32)
    # The token confidence's raw statistics: max, softmax sum, a lower bound tau of the row's CONF_K-th largest
    # value (the smallest maximum of COLUMNS // 4 groups of columns: that many distinct tokens lie at or above
    # it), and the buffered values above tau (-1: the buffer overflowed; the finish kernel re-reads the row).
    mr = float("-inf")
    zr = 0.0
    ctau = float("-inf")
    ccount = 0
    ccol = tl.full([COLUMNS], float("-inf"), tl.float32)
    cbuf = conf_buf_ptr + slot * CONF_CAPACITY
    row_ptr = logits_ptr + row_off
    # Tiles never straddle a chunk (chunks are whole tiles), so `idx < vocab` is the
    # only mask: constant over aligned runs when vocab is a multiple of 16, so loads vectorise.
    ahead = tl.load(row_ptr + lo + flat, mask=lo + flat < vocab, other=float("-inf"))  # [R, COLUMNS]
    for start in range(lo, end, BLOCK_V):
        # 0. The raw tile (as loaded, 16-bit stays 16-bit), and the next one requested already
        # (software prefetch: two tiles in flight per program).
        raw = ahead
        nxt = tl.where(start + BLOCK_V < end, start + BLOCK_V, vocab)  # past the chunk: nothing to load
        ahead = tl.load(row_ptr + nxt + flat, mask=nxt + flat < vocab, other=float("-inf"))
        # 1. The tile's max, argmax and softmax sum; the gather bound g and how many pass it.
        idx = start + flat  # [R, COLUMNS]
        s = tl.div_rn(_suppress(raw, idx, sup_tok, sup_stop, stop_row, num_stop), t_eff)
        t_max = tl.max(tl.max(s, axis=1), axis=0)
        if t_max > m:  # a new max: its first position (rare once the pass is under way)
            arg = tl.min(tl.min(tl.where(s == t_max, idx, _NO_INDEX), axis=1), axis=0)
        m_new = tl.maximum(m, t_max)
        m_safe = tl.where(m_new > float("-inf"), m_new, 0.0)
        rescale = tl.exp(m - m_safe)
        t_sum = tl.sum(tl.sum(tl.exp(s - m_safe), axis=1), axis=0)
        z = z * rescale + t_sum
        z_out = z_out * rescale
        m = m_new
        tile = row64 * num_tiles + start // BLOCK_V
        tl.store(tile_ptr + tile * 2, m_safe)  # the tile's sum is relative to the running max
        tl.store(tile_ptr + tile * 2 + 1, t_sum)
        if CONFIDENCE:  # the confidence's statistics of the raw tile (before suppression and temperature)
            xr = raw.to(tl.float32)
            mr_new = tl.maximum(mr, tl.max(tl.max(xr, axis=1), axis=0))
            mr_safe = tl.where(mr_new > float("-inf"), mr_new, 0.0)
            zr = zr * tl.exp(mr - mr_safe) + tl.sum(tl.sum(tl.exp(xr - mr_safe), axis=1), axis=0)
            mr = mr_new
            ccol = tl.maximum(ccol, tl.max(xr, axis=0))
            ctau = tl.maximum(ctau, tl.min(tl.max(tl.reshape(ccol, [COLUMNS // 4, 4]), axis=1), axis=0))
            c_new = tl.sum(tl.sum((xr > ctau).to(tl.int32), axis=1), axis=0)
            if (ccount >= 0) & (c_new > 0):
                if ccount + c_new > CONF_CAPACITY:
                    ccount, ctau = _conf_compact(cbuf, count_ptr + slot * 4 + 3, ccount, ctau, mr_safe, CONF_K, RADIX,
                                                 SEARCH_PASSES, SEARCH_BLOCK)
                    c_new = tl.sum(tl.sum((xr > ctau).to(tl.int32), axis=1), axis=0)
                if ccount + c_new > CONF_CAPACITY:
                    ccount = -1
                else:
                    ckeep = xr > ctau
                    in_row = tl.cumsum(ckeep.to(tl.int32), axis=1)  # [R, COLUMNS]
                    row_n = tl.sum(ckeep.to(tl.int32), axis=1)  # [R]
                    pos = ccount + (tl.cumsum(row_n, axis=0) - row_n)[:, None] + in_row - 1
                    tl.store(cbuf + pos, xr, mask=ckeep)
                    ccount += c_new
        if gathering != 0:
            g = floor
            if topk_on:
                if top_k <= COLUMNS:
                    # Groups of columns: >= top_k groups each holding a seen token >= the group's
                    # max, so the smallest group max is <= the row's k-th largest value.
                    colmax = tl.maximum(colmax, tl.max(s, axis=0))
                    c1 = tl.max(tl.reshape(colmax, [COLUMNS // 2, 2]), axis=1)
                    c2 = tl.max(tl.reshape(c1, [COLUMNS // 4, 2]), axis=1)
                    c3 = tl.max(tl.reshape(c2, [COLUMNS // 8, 2]), axis=1)
                    tau = tl.min(colmax, axis=0)
                    tau = tl.where(top_k * 2 <= COLUMNS, tl.min(c1, axis=0), tau)
                    tau = tl.where(top_k * 4 <= COLUMNS, tl.min(c2, axis=0), tau)
                    tau = tl.where(top_k * 8 <= COLUMNS, tl.min(c3, axis=0), tau)
                    tau = tl.where(top_k == 1, m, tau)
                    g = tl.maximum(g, tau)
            elif topp_on:
                g = tl.maximum(g, m + tl.log(z) + tail_log)
            if minp_on:
                g = tl.maximum(g, m + min_p_log)
            g_first = g
            keep = (s >= g) & (s > float("-inf"))  # [R, COLUMNS]
            n_new = tl.sum(tl.sum(keep.to(tl.int32), axis=1), axis=0)
            # What stays out of the buffer at this bound (a compaction may leave out more below);
            # its mass matters only to the top-p compaction.
            left = (keep == 0) & (s > float("-inf"))
            s_out = tl.maximum(s_out, tl.max(tl.max(tl.where(left, s, float("-inf")), axis=1), axis=0))
            if topp_on & (topk_on == 0):
                z_out += tl.sum(tl.sum(tl.where(left, tl.exp(s - m_safe), 0.0), axis=1), axis=0)
            # 2. A full buffer is compacted above a bound computed over its own contents.
            if count + n_new > CAPACITY:
                count, drop_s, s_out, z_out = _compact(
                    buf_val, buf_idx, count_ptr + slot * 4 + 1, count, g, m, z, z_out, s_out, top_k, top_p, topk_on,
                    topp_on, RADIX, SEARCH_PASSES, SEARCH_BLOCK, TAIL_SHARE)
                floor = drop_s
                g = tl.maximum(g, drop_s)
            # 3. Append the tile's candidates (recomputed from the raw tile, which is what stays
            # in registers through steps 1 and 2).
            if n_new > 0:
                s = tl.div_rn(_suppress(raw, idx, sup_tok, sup_stop, stop_row, num_stop), t_eff)
                count, overflow, s_out, z_out = _append(buf_idx, buf_val, count_ptr + slot * 4 + 1, count, idx, s,
                                                        g, g_first, m_safe, s_out, z_out, CAPACITY)
                gathering = 1 - overflow
    tl.store(stat_ptr + slot * 4, m)
    tl.store(stat_ptr + slot * 4 + 1, z)
    tl.store(stat_ptr + slot * 4 + 2, s_out)
    tl.store(count_ptr + slot * 4, arg)
    tl.store(count_ptr + slot * 4 + 1, count)
    tl.store(count_ptr + slot * 4 + 2, overflow)
    if CONFIDENCE:
        tl.store(count_ptr + slot * 4 + 3, ccount)
        tl.store(conf_stat_ptr + slot * 4, mr)
        tl.store(conf_stat_ptr + slot * 4 + 1, zr)
        tl.store(conf_stat_ptr + slot * 4 + 2, ctau)


# -- kernel 2: thresholds, draw and the budget machine -------------------------------------------


@triton.jit
def _draw_from_tiles(logits_ptr, row_off, vocab, num_tiles, tile_row, sup_tok, sup_stop, stop_row, num_stop, t_eff,
                     m, target, BLOCK_V: tl.constexpr, MAX_TILES: tl.constexpr):
    """Inverse-CDF draw over the whole row from the scan's tile sums: find the tile where the
    running mass passes `target`, then re-read that one tile."""
    running = 0.0
    found_tile = -1
    before = 0.0  # mass before the found tile
    last_tile = 0
    for t0 in range(0, num_tiles, MAX_TILES):
        t = t0 + tl.arange(0, MAX_TILES)
        valid = t < num_tiles
        t_ref = tl.load(tile_row + t * 2, mask=valid, other=0.0)  # the running max the sum is relative to
        t_sum = tl.load(tile_row + t * 2 + 1, mask=valid, other=0.0)
        mass = tl.where(t_sum > 0.0, t_sum * tl.exp(t_ref - m), 0.0)  # [MAX_TILES]
        cum = running + tl.cumsum(mass, axis=0)
        first = tl.min(tl.where(cum > target, t, _NO_INDEX), axis=0)
        if (found_tile < 0) & (first < _NO_INDEX):
            found_tile = first
            before = tl.sum(tl.where(t < first, mass, 0.0), axis=0) + running
        last_tile = tl.maximum(last_tile, tl.max(tl.where(mass > 0.0, t, 0), axis=0))
        running += tl.sum(mass, axis=0)
    # Rounding can put the target at or past the total: no tile is found. The draw is then the
    # last token with mass (the last tile with mass, searched to its end). Every token of that
    # tile must not pass the test below: a token with no mass is never drawn.
    at_end = found_tile < 0
    if at_end:
        found_tile = last_tile
    idx = found_tile * BLOCK_V + tl.arange(0, BLOCK_V)
    x = _masked_logits(logits_ptr, row_off, idx, vocab, sup_tok, sup_stop, stop_row, num_stop)
    e = tl.exp(tl.div_rn(x, t_eff) - m)
    cdf = before + tl.cumsum(e, axis=0)
    first = tl.min(tl.where((cdf > target) & (e > 0.0) & (at_end == 0), idx, _NO_INDEX), axis=0)
    last = tl.max(tl.where(e > 0.0, idx, -1), axis=0)
    return tl.where(first < _NO_INDEX, first, last)


@triton.jit
def _kept(s, m, k_lo, p_lo, min_e):
    """e = exp(s - m) where s survives top-k (key >= k_lo), top-p (bits(e) >= p_lo) and min-p, else 0."""
    e = tl.exp(s - m)
    return tl.where((_order_key(s) >= k_lo) & (e.to(tl.int32, bitcast=True) >= p_lo) & (e >= min_e), e, 0.0)


@triton.jit
def _buffer_mass(val_ptr, cnt_ptr, num_chunks, chunk_stride, m, k_lo, p_lo, min_e, BLOCK: tl.constexpr):
    """The kept candidates' mass, summed in vocabulary order as the draw sums it."""
    running = 0.0
    for c in range(0, num_chunks):
        count = tl.load(cnt_ptr + c * 4)
        for t0 in range(0, count, BLOCK):
            o = t0 + tl.arange(0, BLOCK)
            s = tl.load(val_ptr + c * chunk_stride + o, mask=o < count, other=float("-inf"))
            running += tl.sum(_kept(s, m, k_lo, p_lo, min_e), axis=0)
    return running


@triton.jit
def _buffer_draw(val_ptr, idx_ptr, cnt_ptr, num_chunks, chunk_stride, m, k_lo, p_lo, min_e, target,
                 BLOCK: tl.constexpr):
    """Inverse-CDF draw at `target` over the kept candidates, in vocabulary order (the buffer
    holds them in that order, chunk after chunk)."""
    running = 0.0
    found = -1
    last = -1
    for c in range(0, num_chunks):
        count = tl.load(cnt_ptr + c * 4)
        for t0 in range(0, count, BLOCK):
            o = t0 + tl.arange(0, BLOCK)
            valid = o < count
            s = tl.load(val_ptr + c * chunk_stride + o, mask=valid, other=float("-inf"))
            tok = tl.load(idx_ptr + c * chunk_stride + o, mask=valid, other=-1)
            e = _kept(s, m, k_lo, p_lo, min_e)
            cdf = running + tl.cumsum(e, axis=0)
            first = tl.min(tl.where(cdf > target, o, _NO_INDEX), axis=0)
            if (found < 0) & (first < _NO_INDEX):
                found = tl.sum(tl.where(o == first, tok, 0), axis=0)
            last = tl.maximum(last, tl.max(tl.where(e > 0.0, tok, -1), axis=0))
            running += tl.sum(e, axis=0)
    return tl.where(found >= 0, found, last)


@triton.jit
def _draw_from_row(logits_ptr, row_off, vocab, sup_tok, sup_stop, stop_row, num_stop, temperature, m, z, top_k,
                   top_p, min_e, u, RADIX: tl.constexpr, SEARCH_PASSES: tl.constexpr, BLOCK: tl.constexpr):
    """The exact fallback: thresholds by radix search over the whole row (8 passes each for top-k
    and top-p), the kept mass when min-p is on, then the draw: up to 19 passes."""
    offs = tl.arange(0, BLOCK)
    r = tl.arange(0, RADIX)
    k_lo = tl.full([], _MIN_KEY, tl.int32)
    mass = z
    if (top_k > 0) & (top_k < vocab):
        lo = tl.full([], _MIN_KEY, tl.int64)
        hi = _order_key(m).to(tl.int64)
        for _ in range(SEARCH_PASSES):
            cand, cand32, step = _candidates(lo, hi, RADIX)  # [RADIX]
            count = tl.zeros([RADIX], tl.int32)
            part = tl.zeros([RADIX], tl.float32)
            for start in range(0, vocab, BLOCK):
                x = _masked_logits(logits_ptr, row_off, start + offs, vocab, sup_tok, sup_stop, stop_row, num_stop)
                s = tl.div_rn(x, temperature)
                above = _order_key(s)[:, None] >= cand32[None, :]  # [BLOCK, RADIX]
                count += tl.sum(above.to(tl.int32), axis=0)
                part += tl.sum(tl.where(above, tl.exp(s - m)[:, None], 0.0), axis=0)
            lo, hi, pick = _narrow(lo, hi, cand, step, count >= top_k, RADIX)
            mass = tl.sum(tl.where(r == pick, part, 0.0), axis=0)
        k_lo = lo.to(tl.int32)
    p_lo = tl.full([], 0, tl.int32)
    if top_p < 1.0:
        lo = tl.zeros([], tl.int64)
        hi = tl.full([], 0x3F800000, tl.int64)  # the bits of 1.0, the largest e
        goal = top_p * mass
        for _ in range(SEARCH_PASSES):
            cand, cand32, step = _candidates(lo, hi, RADIX)
            part = tl.zeros([RADIX], tl.float32)
            for start in range(0, vocab, BLOCK):
                x = _masked_logits(logits_ptr, row_off, start + offs, vocab, sup_tok, sup_stop, stop_row, num_stop)
                s = tl.div_rn(x, temperature)
                e = tl.where(_order_key(s) >= k_lo, tl.exp(s - m), 0.0)  # [BLOCK]
                above = e.to(tl.int32, bitcast=True)[:, None] >= cand32[None, :]  # [BLOCK, RADIX]
                part += tl.sum(tl.where(above, e[:, None], 0.0), axis=0)
            lo, hi, pick = _narrow(lo, hi, cand, step, part >= goal, RADIX)
        p_lo = lo.to(tl.int32)
    kept = 0.0
    for start in range(0, vocab, BLOCK):
        x = _masked_logits(logits_ptr, row_off, start + offs, vocab, sup_tok, sup_stop, stop_row, num_stop)
        kept += tl.sum(_kept(tl.div_rn(x, temperature), m, k_lo, p_lo, min_e), axis=0)
    target = u * kept
    running = 0.0
    found = -1
    last = -1
    for start in range(0, vocab, BLOCK):
        x = _masked_logits(logits_ptr, row_off, start + offs, vocab, sup_tok, sup_stop, stop_row, num_stop)
        e = _kept(tl.div_rn(x, temperature), m, k_lo, p_lo, min_e)
        cdf = running + tl.cumsum(e, axis=0)
        first = tl.min(tl.where(cdf > target, start + offs, _NO_INDEX), axis=0)
        if (found < 0) & (first < _NO_INDEX):
            found = first
        last = tl.maximum(last, tl.max(tl.where(e > 0.0, start + offs, -1), axis=0))
        running += tl.sum(e, axis=0)
    return tl.where(found >= 0, found, last)


@triton.jit(do_not_specialize=["marker_width", "num_stop", "num_chunks"])
def _finish_kernel(
    logits_ptr,  # [num_seqs, vocab], any float dtype
    logits_stride,
    vocab,
    tokens_ptr,  # int64 [num_seqs] out
    logprobs_ptr,  # fp32 [num_seqs] out
    confidence_ptr,  # fp32 [num_seqs] out: the token confidence of the step (BudgetState.confidence)
    temperature_ptr, top_k_ptr, top_p_ptr, min_p_ptr, seed_ptr,  # [num_seqs]
    think_budget_ptr, solution_budget_ptr, max_new_ptr, min_think_ptr, min_tokens_ptr,  # int32 [num_seqs]
    marker_ptr,  # int32 [num_seqs, marker_width], right-aligned
    marker_len_ptr,  # int32 [num_seqs]
    marker_width,
    stop_ids_ptr,  # int32 [num_seqs, num_stop], STOP_PAD padded
    num_stop,
    phase_ptr, think_ptr, solution_ptr, generated_ptr, force_pos_ptr,  # int32 [num_seqs], in place
    recent_ptr,  # int32 [num_seqs, marker_width], in place
    forced_end_ptr, forced_ptr, finish_ptr,  # int32 [num_seqs], in place
    tile_ptr,  # fp32 [num_seqs, num_tiles, 2] from the scan
    num_tiles,
    stat_ptr,  # fp32 [num_seqs, num_chunks, 4] from the scan
    count_ptr,  # int32 [num_seqs, num_chunks, 4] from the scan
    buf_idx_ptr,  # int32 [num_seqs, num_chunks, CAPACITY] from the scan
    buf_val_ptr,  # fp32 [num_seqs, num_chunks, CAPACITY] from the scan
    conf_stat_ptr,  # fp32 [num_seqs, num_chunks, 4] from the scan
    conf_buf_ptr,  # fp32 [num_seqs, num_chunks, CONF_CAPACITY] from the scan
    num_chunks,
    BLOCK_V: tl.constexpr,
    CAPACITY: tl.constexpr,
    CONF_K: tl.constexpr,
    CONF_CAPACITY: tl.constexpr,
    CONFIDENCE: tl.constexpr,
    MAX_MARKER: tl.constexpr,
    STOP_BLOCK: tl.constexpr,
    MAX_TILES: tl.constexpr,
    RADIX: tl.constexpr,
    SEARCH_PASSES: tl.constexpr,
    SEARCH_BLOCK: tl.constexpr,
):
    row = tl.program_id(0)
    if tl.load(phase_ptr + row) == _DONE:
        tl.store(tokens_ptr + row, _PAD_TOKEN)
        tl.store(logprobs_ptr + row, 0.0)
        tl.store(forced_ptr + row, 0)
        if CONFIDENCE:
            tl.store(confidence_ptr + row, 0.0)
        return
    phase_in = tl.load(phase_ptr + row)
    phase, think, k_len, j, marker, recent, shifted, pad, sup_tok, sup_stop = _row_setup(
        row, phase_ptr, think_ptr, think_budget_ptr, min_think_ptr, min_tokens_ptr, generated_ptr, marker_ptr,
        marker_len_ptr, recent_ptr, marker_width, MAX_MARKER)
    spent = (phase_in == _THINKING) & (phase == _FORCING)
    force_pos = tl.where(spent, 0, tl.load(force_pos_ptr + row))
    thinking = phase == _THINKING
    row64 = row.to(tl.int64)
    row_off = row64 * logits_stride
    stop_row = stop_ids_ptr + row64 * num_stop

    # The row's max, first argmax and softmax sum from its chunks.
    m = float("-inf")
    z = 0.0
    best_idx = 0
    s_out = float("-inf")
    total = 0
    overflow = 0
    mr = float("-inf")  # the confidence's: raw max, softmax sum, CONF_K-th value bound, a buffer overflowed
    zr = 0.0
    ctau = float("-inf")
    c_over = 0
    first_slot = row64 * num_chunks
    for c in range(0, num_chunks):
        slot = first_slot + c
        if CONFIDENCE:
            mr_c = tl.load(conf_stat_ptr + slot * 4)
            mr_new = tl.maximum(mr, mr_c)
            mr_safe = tl.where(mr_new > float("-inf"), mr_new, 0.0)
            zr = zr * tl.exp(mr - mr_safe) + tl.load(conf_stat_ptr + slot * 4 + 1) * tl.exp(mr_c - mr_safe)
            mr = mr_new
            ctau = tl.maximum(ctau, tl.load(conf_stat_ptr + slot * 4 + 2))
            c_over |= (tl.load(count_ptr + slot * 4 + 3) < 0).to(tl.int32)
        m_c = tl.load(stat_ptr + slot * 4)
        if m_c > m:
            best_idx = tl.load(count_ptr + slot * 4)
        m_new = tl.maximum(m, m_c)
        m_safe = tl.where(m_new > float("-inf"), m_new, 0.0)
        z = z * tl.exp(m - m_safe) + tl.load(stat_ptr + slot * 4 + 1) * tl.exp(m_c - m_safe)
        m = m_new
        s_out = tl.maximum(s_out, tl.load(stat_ptr + slot * 4 + 2))
        total += tl.load(count_ptr + slot * 4 + 1)
        overflow |= tl.load(count_ptr + slot * 4 + 2)

    temperature = tl.load(temperature_ptr + row)
    t_eff = tl.where(temperature > 0.0, temperature, 1.0)
    # A NaN or +inf logit makes the sum NaN; no finite logit makes it 0. Such a row samples
    # nothing and finishes with FINISH_NONFINITE, which the engine reports (it reads finish back
    # anyway, so the check costs nothing).
    nonfinite = (z != z) | (z <= 0.0) | (z == float("inf"))
    sampled = best_idx
    if (phase != _FORCING) & (temperature > 0.0) & (nonfinite == 0):
        u = tl.max(tl.rand(tl.load(seed_ptr + row), tl.full([1], 0, tl.int32) + tl.load(generated_ptr + row)), axis=0)
        top_k = tl.load(top_k_ptr + row)
        top_p = tl.load(top_p_ptr + row)
        min_e = tl.load(min_p_ptr + row)  # min_p * max e, and max e = 1
        topk_on = (top_k > 0) & (top_k < vocab)
        topp_on = top_p < 1.0
        minp_on = min_e > 0.0
        if (topk_on | topp_on | minp_on) == 0:
            sampled = _draw_from_tiles(logits_ptr, row_off, vocab, num_tiles, tile_ptr + row64 * num_tiles * 2,
                                       sup_tok, sup_stop, stop_row, num_stop, t_eff, m, u * z, BLOCK_V, MAX_TILES)
        else:
            # Exact thresholds over the buffered candidates, if every token left out of the
            # buffer lies strictly below one of them; else the fallback over the whole row.
            val_base = buf_val_ptr + first_slot * CAPACITY
            idx_base = buf_idx_ptr + first_slot * CAPACITY
            cnt_base = count_ptr + first_slot * 4 + 1
            none_out = s_out == float("-inf")
            e_out = tl.exp(s_out - m).to(tl.int32, bitcast=True)  # bits of the largest e left out
            exact = overflow == 0
            k_lo = tl.full([], _MIN_KEY, tl.int32)
            mass = z
            if topk_on:
                exact = exact & (total >= top_k)
                if exact:
                    kk, kmass = _buffer_search(val_base, cnt_base, num_chunks, CAPACITY, tl.full([], _MIN_KEY, tl.int64),
                                               _order_key(m).to(tl.int64), m, _MIN_KEY, top_k, 0.0, 0.0, _TOPK,
                                               RADIX, SEARCH_PASSES, SEARCH_BLOCK)
                    k_lo = kk.to(tl.int32)
                    mass = kmass
                    exact = exact & (none_out | (k_lo > _order_key(s_out)))
            excluded = none_out | (topk_on & exact)
            p_lo = tl.full([], 0, tl.int32)
            if exact & topp_on:
                pk, _ = _buffer_search(val_base, cnt_base, num_chunks, CAPACITY, tl.zeros([], tl.int64),
                                       tl.full([], 0x3F800000, tl.int64), m, k_lo, top_p * mass, 0.0, 0.0, _TOPP,
                                       RADIX, SEARCH_PASSES, SEARCH_BLOCK)
                p_lo = pk.to(tl.int32)
                # Without top-k the nucleus must itself leave out every token not buffered.
                exact = exact & (topk_on | excluded | (p_lo > e_out))
                excluded = excluded | (p_lo > e_out)
            if minp_on:
                excluded = excluded | (min_e > tl.exp(s_out - m))
            if exact & excluded:
                kept = _buffer_mass(val_base, cnt_base, num_chunks, CAPACITY, m, k_lo, p_lo, min_e, SEARCH_BLOCK)
                sampled = _buffer_draw(val_base, idx_base, cnt_base, num_chunks, CAPACITY, m, k_lo, p_lo, min_e,
                                       u * kept, SEARCH_BLOCK)
            else:
                sampled = _draw_from_row(logits_ptr, row_off, vocab, sup_tok, sup_stop, stop_row, num_stop, temperature,
                                         m, z, top_k, top_p, min_e, u, RADIX, SEARCH_PASSES, SEARCH_BLOCK)

    # Token confidence: lse(x) - mean of the CONF_K largest raw values x. Every value above the largest
    # chunk's tau is buffered, and at least CONF_K values lie at or above it, so the CONF_K largest are the
    # buffered ones above the CONF_K-th largest key kc, then copies of kc's value.
    if CONFIDENCE:
        k_conf = tl.minimum(vocab, CONF_K)
        if c_over != 0:
            kc, c_above, s_above = _conf_from_row(logits_ptr, row_off, vocab, mr, k_conf, RADIX, SEARCH_PASSES,
                                                  SEARCH_BLOCK)
        else:
            cbuf_base = conf_buf_ptr + first_slot * CONF_CAPACITY
            ccnt_base = count_ptr + first_slot * 4 + 3
            kk, _ = _buffer_search(cbuf_base, ccnt_base, num_chunks, CONF_CAPACITY, _order_key(ctau).to(tl.int64),
                                   _order_key(mr).to(tl.int64), tl.where(mr > float("-inf"), mr, 0.0), _MIN_KEY, k_conf,
                                   0.0, 0.0, _TOPK, RADIX, SEARCH_PASSES, SEARCH_BLOCK)
            kc = kk.to(tl.int32)
            c_above, s_above = _conf_sum(cbuf_base, ccnt_base, num_chunks, CONF_CAPACITY, kc, SEARCH_BLOCK)
        fill = tl.where(c_above < k_conf, (k_conf - c_above).to(tl.float32) * _key_value(kc), 0.0)
        confidence = mr + tl.log(zr) - (s_above + fill) / k_conf.to(tl.float32)
        tl.store(confidence_ptr + row, tl.where(nonfinite, 0.0, confidence))

    # -- the budget machine (docs/architecture.md), scalar per row ------------------------------
    is_stop = 0
    for s0 in range(0, num_stop):
        s = s0 + tl.arange(0, STOP_BLOCK)
        stops = tl.load(stop_row + s, mask=s < num_stop, other=_STOP_PAD)
        is_stop |= (tl.sum(((stops == sampled) & (stops >= 0)).to(tl.int32), axis=0) > 0).to(tl.int32)
    stop_in_thought = thinking & (is_stop != 0)
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
    col = j - (MAX_MARKER - marker_width)
    tl.store(recent_ptr + row64 * marker_width + col, tl.where(think_tok, window, recent), mask=col >= 0)
    tl.store(think_ptr + row, think + think_tok.to(tl.int32) - tl.where(completed, k_len, 0))
    marker_out = (forcing & (force_pos + 1 >= k_len)) | completed
    new_phase = tl.where(forcing, _FORCING, phase)
    new_phase = tl.where(marker_out, _SOLVING, new_phase)
    solution = tl.load(solution_ptr + row) + solve_tok.to(tl.int32)
    tl.store(solution_ptr + row, solution)
    s_budget = tl.load(solution_budget_ptr + row)
    finish_stop = solve_tok & (is_stop != 0)
    finish_len = (marker_out & (s_budget <= 0)) | (solve_tok & (is_stop == 0) & (solution >= s_budget))
    generated = tl.load(generated_ptr + row) + 1
    tl.store(generated_ptr + row, generated)
    finish_len = finish_len | ((finish_stop == 0) & (generated >= tl.load(max_new_ptr + row)))
    finish = tl.where(finish_stop, _FINISH_STOP, tl.where(finish_len, _FINISH_LENGTH, tl.load(finish_ptr + row)))
    tl.store(finish_ptr + row, tl.where(nonfinite, _FINISH_NONFINITE, finish))
    tl.store(phase_ptr + row, tl.where(finish_stop | finish_len | nonfinite, _DONE, new_phase))
    tl.store(tokens_ptr + row, tl.where(nonfinite, _PAD_TOKEN, token.to(tl.int64)))
    # Honest logprob of the emitted token (forced ones too) under softmax(masked / t_eff).
    x_tok = tl.load(logits_ptr + row_off + token).to(tl.float32)
    x_tok = tl.where(token == sup_tok, float("-inf"), x_tok)
    tl.store(logprobs_ptr + row, tl.where(nonfinite, 0.0, tl.div_rn(x_tok, t_eff) - m - tl.log(z)))


# -- launcher ----------------------------------------------------------------------------------


@on_tensor_device
def sample_with_budget(
    logits: torch.Tensor,  # [num_seqs, vocab]
    params: SamplerParams,
    state: BudgetState,  # updated in place
    *,
    num_chunks: int | None = None,  # programs per row; None: chosen from the batch size and the GPU
    confidence: bool = False,  # also write state.confidence (a kernel variant of its own: it costs registers)
) -> tuple[torch.Tensor, torch.Tensor]:
    num_seqs, vocab = logits.shape
    if logits.stride(1) != 1:
        logits = logits.contiguous()
    for name, t in [("marker", params.marker), ("stop_ids", params.stop_ids), ("recent", state.recent)]:
        if t.dtype != torch.int32 or not t.is_contiguous():
            raise ValueError(f"{name} must be a contiguous int32 tensor")
    marker_width = params.marker.shape[1]
    if state.recent.shape[1] != marker_width:
        raise ValueError("state.recent and params.marker must have the same width")
    if not 1 <= marker_width <= MAX_MARKER_TOKENS:
        raise ValueError(f"markers of 1 to {MAX_MARKER_TOKENS} tokens are supported, got a width of {marker_width}")
    device = logits.device
    tokens = torch.empty(num_seqs, dtype=torch.long, device=device)
    logprobs = torch.empty(num_seqs, dtype=torch.float32, device=device)
    if num_seqs == 0:
        return tokens, logprobs
    if num_chunks is None:
        num_chunks = choose_num_chunks(num_seqs, vocab, num_sms(logits))
    chunk_len = triton.cdiv(triton.cdiv(vocab, num_chunks), BLOCK_V) * BLOCK_V
    num_chunks = triton.cdiv(vocab, chunk_len)  # no empty chunk
    num_tiles = triton.cdiv(vocab, BLOCK_V)
    tile_stats = torch.empty(num_seqs, num_tiles, 2, dtype=torch.float32, device=device)
    stats = torch.empty(num_seqs, num_chunks, 4, dtype=torch.float32, device=device)
    counts = torch.empty(num_seqs, num_chunks, 4, dtype=torch.int32, device=device)
    buf_idx = torch.empty(num_seqs, num_chunks, CAPACITY, dtype=torch.int32, device=device)
    buf_val = torch.empty(num_seqs, num_chunks, CAPACITY, dtype=torch.float32, device=device)
    conf_stats = torch.empty(num_seqs if confidence else 1, num_chunks, 4, dtype=torch.float32, device=device)
    conf_buf = torch.empty(num_seqs if confidence else 1, num_chunks, CONF_CAPACITY if confidence else 1,
                           dtype=torch.float32, device=device)
    num_stop = params.stop_ids.shape[1]
    common = dict(
        logits_ptr=logits, logits_stride=logits.stride(0), vocab=vocab,
        temperature_ptr=params.temperature, top_k_ptr=params.top_k, top_p_ptr=params.top_p, min_p_ptr=params.min_p,
        think_budget_ptr=params.think_budget, min_think_ptr=params.min_think, min_tokens_ptr=params.min_tokens,
        marker_ptr=params.marker, marker_len_ptr=params.marker_len, marker_width=marker_width,
        stop_ids_ptr=params.stop_ids, num_stop=num_stop, phase_ptr=state.phase, think_ptr=state.think_count,
        generated_ptr=state.generated,
        recent_ptr=state.recent, tile_ptr=tile_stats, num_tiles=num_tiles, conf_stat_ptr=conf_stats,
        conf_buf_ptr=conf_buf, CONF_K=CONF_K, CONF_CAPACITY=CONF_CAPACITY, CONFIDENCE=confidence,
        BLOCK_V=BLOCK_V, CAPACITY=CAPACITY, MAX_MARKER=MAX_MARKER_TOKENS, RADIX=RADIX,  # the marker window in registers
        SEARCH_PASSES=SEARCH_PASSES, SEARCH_BLOCK=SEARCH_BLOCK,
    )
    _scan_kernel[(num_seqs, num_chunks)](
        chunk_tiles=chunk_len // BLOCK_V, stat_ptr=stats, count_ptr=counts, buf_idx_ptr=buf_idx, buf_val_ptr=buf_val,
        COLUMNS=COLUMNS, TAIL_SHARE=TAIL_SHARE, num_warps=SCAN_WARPS, **common,
    )
    _finish_kernel[(num_seqs,)](
        tokens_ptr=tokens, logprobs_ptr=logprobs, confidence_ptr=state.confidence, seed_ptr=params.seed,
        solution_budget_ptr=params.solution_budget, max_new_ptr=params.max_new_tokens,
        solution_ptr=state.solution_count, force_pos_ptr=state.force_pos,
        forced_end_ptr=state.forced_end, forced_ptr=state.forced, finish_ptr=state.finish,
        stat_ptr=stats, count_ptr=counts, buf_idx_ptr=buf_idx, buf_val_ptr=buf_val, num_chunks=num_chunks,
        MAX_TILES=MAX_TILES, STOP_BLOCK=STOP_BLOCK, num_warps=FINISH_WARPS, maxnreg=FINISH_REGISTERS, **common,
    )
    return tokens, logprobs
