"""The Triton `sample_with_budget` kernel: budget contract, filters, distribution, seeding.

Runs in Triton's interpreter on CPU. Tokens, forced flags, counts and phases must equal the
contract exactly; logprobs equal the reference's up to float summation order.

Tests that compare sampled tokens one for one with the reference at a temperature (or under top-p) rely
on the kernel's arithmetic being the reference's: logits / temperature is correctly rounded in the kernel
(tl.div_rn) on hardware too, but exp and log are approximate there (ex2.approx, lg2.approx: kernels/aot.py
EXACT_ON_GPU), so on a GPU a draw that lands within a few ulp of a CDF boundary, or a top-p threshold
between two adjacent floats, may pick the neighbouring token. The interpreter computes exp exactly as
numpy does, which is what makes those tests exact here; greedy tokens are exact on both.
"""
from __future__ import annotations

import pytest
import torch
import triton
import triton.language as tl
from hypothesis import given, settings
from hypothesis import strategies as st

from budget_harness import EOS, FALLBACK, drive
from budget_model import run_contract
from load_counter import count_loads
from elastic_decode.kernels import reference, sampling_batch
from elastic_decode.kernels.sample_with_budget import _draw_from_tiles, sample_with_budget
from test_budget_contract import budget_rows, check_invariants
from test_sampling import allowed_set

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@settings(max_examples=120, deadline=None)
@given(st.lists(budget_rows(), min_size=1, max_size=4))
def test_kernel_follows_the_contract(batch):
    rows = [r for r, _ in batch]
    wishes = [w for _, w in batch]
    got = drive(sample_with_budget, rows, wishes, device=DEVICE)
    ref = drive(reference.sample_with_budget, rows, wishes)
    for row, w, g, r in zip(rows, wishes, got, ref):
        exp = run_contract(w, row["t"], row["s"], row["marker"], row["m"], {EOS}, row["max_new"], FALLBACK,
                           row["min_tokens"])
        assert (g["tokens"], g["forced"]) == (exp.tokens, exp.forced), (row, w)
        assert (g["think_tokens"], g["solution_tokens"], g["forced_end"], g["finish"]) == (
            exp.think_tokens, exp.solution_tokens, exp.forced_end, exp.finish)
        assert torch.allclose(torch.tensor(g["logprobs"]), torch.tensor(r["logprobs"]), atol=1e-5, rtol=1e-5)
        check_invariants(row, g)


def test_marker_wider_than_a_power_of_two():
    """Marker width 5 (SmolLM2's "\\n</think>\\n\\n") is padded by the launcher, state kept."""
    rows = [dict(t=3, s=2, marker=[4, 5, 6, 7, 8], m=0, max_new=20), dict(t=9, s=2, marker=[1, 2], m=0, max_new=20)]
    wishes = [[9] * 20, [3, 1, 2, 9, 9, 9, 9]]
    got = drive(sample_with_budget, rows, wishes, device=DEVICE)
    assert got[0]["tokens"] == [9, 9, 9, 4, 5, 6, 7, 8, 9, 9] and got[0]["forced_end"]
    assert got[1]["tokens"] == [3, 1, 2, 9, 9] and got[1]["think_tokens"] == 1 and not got[1]["forced_end"]


def test_greedy_is_argmax_and_logprob_is_log_softmax():
    torch.manual_seed(0)
    logits = torch.randn(13, 3001)  # three vocabulary tiles, the last one partial
    params, state = sampling_batch(13, temperature=0.0, device=DEVICE)
    tokens, logprobs = sample_with_budget(logits.to(DEVICE), params, state)
    assert torch.equal(tokens.cpu(), logits.argmax(-1))
    assert torch.allclose(logprobs.cpu(), torch.log_softmax(logits, -1).max(-1).values, atol=1e-5)


def test_draws_equal_the_reference_draws():
    """Same Philox uniform, same kept set, same inverse-CDF scan: the same tokens (exact exp: see the
    module docstring for what holds on hardware)."""
    torch.manual_seed(4)
    vocab, n = 2500, 24
    logits = torch.randn(n, vocab) * 3
    for temperature, top_k, top_p, min_p in [(1.0, 0, 1.0, 0.0), (0.8, 40, 0.9, 0.0), (1.1, 0, 0.95, 0.02)]:
        p1, s1 = sampling_batch(n, temperature, top_k, top_p, min_p, seeds=range(50, 50 + n), generated=3)
        p2, s2 = sampling_batch(n, temperature, top_k, top_p, min_p, seeds=range(50, 50 + n), generated=3, device=DEVICE)
        expected, _ = reference.sample_with_budget(logits, p1, s1)
        got, _ = sample_with_budget(logits.to(DEVICE), p2, s2)
        assert got.cpu().tolist() == expected.tolist()


def test_thresholds_among_ties_and_adjacent_floats_keep_what_the_reference_keeps():
    """Two hard cases for the radix search: logits on a coarse grid, so the k-th largest value
    and the nucleus edge fall inside runs of equal values (ties kept together); and logits that
    are adjacent float32 values, so a threshold off by a single ulp keeps a wrong token. (Exact here because
    the interpreter's exp is the reference's; on a GPU, ex2.approx may move the adjacent-float case.)"""
    torch.manual_seed(5)
    vocab, n = 3000, 16
    grid = torch.randint(-6, 7, (n, vocab)).float() / 2  # 13 distinct values, ~230 copies each
    ulps = torch.arange(vocab, dtype=torch.int32) + torch.tensor(1.0).view(torch.int32)
    adjacent = torch.stack([ulps[torch.randperm(vocab)] for _ in range(n)]).view(torch.float32)  # 1, 1 + 2^-23, ...
    for logits in (grid, adjacent):
        for temperature, top_k, top_p in [(1.0, 7, 1.0), (0.9, 0, 0.6), (1.0, 500, 0.3), (0.7, 1, 1.0)]:
            p1, s1 = sampling_batch(n, temperature, top_k, top_p, seeds=range(80, 80 + n), generated=1)
            p2, s2 = sampling_batch(n, temperature, top_k, top_p, seeds=range(80, 80 + n), generated=1, device=DEVICE)
            expected, _ = reference.sample_with_budget(logits, p1, s1)
            got, _ = sample_with_budget(logits.to(DEVICE), p2, s2)
            assert got.cpu().tolist() == expected.tolist(), (temperature, top_k, top_p)
            for row, tok in enumerate(got.tolist()):
                assert tok in allowed_set(logits[row], temperature, top_k, top_p, 0.0)


@triton.jit
def _rand_kernel(seed_ptr, offset_ptr, out_ptr, N: tl.constexpr):
    i = tl.arange(0, N)
    seed = tl.load(seed_ptr)
    tl.store(out_ptr + i, tl.rand(seed, tl.load(offset_ptr + i)))


@pytest.mark.parametrize("seed", [0, 1, 123456789, 2**40 + 17, 2**63 - 1])
def test_reference_philox_is_bit_identical_to_tl_rand(seed):
    offsets = torch.tensor(list(range(60)) + [2**31 - 1, 2**20, 999999, 7], dtype=torch.int32)
    out = torch.empty(64, dtype=torch.float32, device=DEVICE)
    _rand_kernel[(1,)](torch.tensor([seed], dtype=torch.long, device=DEVICE), offsets.to(DEVICE), out, N=64)
    expected = reference.philox_uniform(torch.full((64,), seed, dtype=torch.long), offsets)
    assert torch.equal(out.cpu(), expected)


# -- the one-pass design: candidates, chunks, the fallback, bytes read --------------------------

def reads_per_row(logits, settings, seeds, num_chunks=None):
    """Tokens drawn row by row, and how many times each row's bytes were loaded: counted in the
    interpreter; None on a GPU (the tokens are still checked there)."""
    tokens, reads = [], []
    for i, seed in enumerate(seeds):
        row = logits[i : i + 1].contiguous().to(DEVICE)
        params, state = sampling_batch(1, *settings, seeds=[seed], generated=2, device=DEVICE)
        with count_loads(row) as loaded:
            tok, _ = sample_with_budget(row, params, state, num_chunks=num_chunks)
        tokens.append(int(tok))
        reads.append(loaded[0] / (row.numel() * row.element_size()))
    return tokens, (reads if DEVICE == "cpu" else None)


def reference_tokens(logits, settings, seeds):
    params, state = sampling_batch(len(seeds), *settings, seeds=seeds, generated=2)
    return reference.sample_with_budget(logits.float(), params, state)[0].tolist()


@pytest.mark.parametrize("settings", [(0.7, 50, 0.95, 0.0), (0.6, 0, 0.95, 0.0), (1.0, 0, 1.0, 0.05),
                                      (1.0, 0, 1.0, 0.0), (0.8, 20, 1.0, 0.0)])
def test_peaked_rows_are_read_about_once(settings):
    """Logits shaped like a language model's (a few likely tokens over a Gaussian bulk): every row
    is decided from its candidate buffer, read once (plus one tile for an unfiltered draw)."""
    torch.manual_seed(6)
    vocab, n = 20000, 4
    logits = torch.randn(n, vocab) * 2
    logits[:, torch.randint(0, vocab, (12,))] += 9 * torch.rand(12)
    seeds = list(range(300, 300 + n))
    tokens, reads = reads_per_row(logits, settings, seeds)
    assert tokens == reference_tokens(logits, settings, seeds)
    assert reads is None or max(reads) <= 1.06, reads


def test_the_bench_rows_are_read_once_with_several_chunks():
    """bench_kernels' sampler rows (randn * 3 at the reference vocabulary, temperature 0.7, top-k 50,
    top-p 0.95), split across 1 and 4 programs: one read (and the emitted token's logit for its
    logprob), the reference's tokens."""
    torch.manual_seed(7)
    logits = (torch.randn(2, 151936) * 3).to(torch.float16)
    settings = (0.7, 50, 0.95, 0.0)
    for chunks in (1, 4):
        tokens, reads = reads_per_row(logits, settings, [11, 12], num_chunks=chunks)
        assert tokens == reference_tokens(logits, settings, [11, 12])
        assert reads is None or max(reads) < 1.0001, reads


@pytest.mark.parametrize("settings", [
    (1.0, 0, 0.999, 0.0),  # top-p near 1 on a flat row: the nucleus is most of the row
    (1.0, 5000, 1.0, 0.0),  # top-k larger than the candidate buffer
])
def test_rows_the_buffer_cannot_decide_take_the_exact_fallback(settings):
    torch.manual_seed(8)
    logits = torch.randn(2, 9000) * 0.3
    seeds = [21, 22]
    tokens, reads = reads_per_row(logits, settings, seeds)
    assert tokens == reference_tokens(logits, settings, seeds)
    assert reads is None or min(reads) > 2  # the fallback's passes over the row ran


@pytest.mark.parametrize("vocab", [3000, 9000])
def test_top_k_above_the_column_bound_is_decided_by_the_buffer(vocab):
    """No column bound for k > COLUMNS: every token is a candidate, and a full buffer is compacted
    to its exact k-th largest value, so the row is still read once."""
    torch.manual_seed(9)
    logits = torch.randn(3, vocab) * 0.3
    settings, seeds = (0.9, 300, 0.8, 0.0), [31, 32, 33]
    tokens, reads = reads_per_row(logits, settings, seeds)
    assert tokens == reference_tokens(logits, settings, seeds)
    assert reads is None or max(reads) < 1.001, reads


@pytest.mark.parametrize("vocab, chunks", [(2500, 2), (3001, 3), (20481, 4)])
def test_chunks_and_ragged_vocabularies_draw_what_the_reference_draws(vocab, chunks):
    """Rows split across programs, vocabularies that are not multiples of the tile; every
    filter combination, and the tied/adjacent-float rows of the threshold test."""
    torch.manual_seed(10)
    n = 6
    logits = torch.randn(n, vocab) * 3
    logits[1] = torch.randint(-6, 7, (vocab,)).float() / 2  # long runs of ties
    for settings in [(1.0, 0, 1.0, 0.0), (0.8, 40, 0.9, 0.0), (1.1, 0, 0.95, 0.02), (0.7, 7, 1.0, 0.0),
                     (0.0, 0, 1.0, 0.0)]:
        seeds = list(range(40, 40 + n))
        params, state = sampling_batch(n, *settings, seeds=seeds, generated=2, device=DEVICE)
        got, logprobs = sample_with_budget(logits.to(DEVICE), params, state, num_chunks=chunks)
        p2, s2 = sampling_batch(n, *settings, seeds=seeds, generated=2)
        expected, expected_logprobs = reference.sample_with_budget(logits, p2, s2)
        assert got.cpu().tolist() == expected.tolist(), settings
        assert torch.allclose(logprobs.cpu(), expected_logprobs, atol=1e-5)


def test_markers_up_to_the_widest_the_engine_accepts():
    """A 40-token marker (Qwen3's "Considering the limited time..." is about 25): forced whole."""
    marker = [1 + i % 8 for i in range(40)]  # ids of the harness's 16-token vocabulary, never the sampled 9
    rows = [dict(t=2, s=1, marker=marker, m=0, max_new=60), dict(t=5, s=1, marker=[3], m=0, max_new=60)]
    got = drive(sample_with_budget, rows, [[9] * 60, [9] * 60], device=DEVICE)
    assert got[0]["tokens"][2:42] == marker and got[0]["forced"][2:42] == [1] * 40
    assert got[1]["tokens"][5] == 3


def test_rows_with_non_finite_logits_finish_flagged_and_sample_nothing():
    """NaN or +inf anywhere in a row, or no finite logit: the row emits PAD, finishes with
    FINISH_NONFINITE (the engine reports it), and the other rows are untouched; the reference too."""
    from elastic_decode.kernels import DONE, FINISH_NONFINITE, PAD_TOKEN

    torch.manual_seed(11)
    logits = torch.randn(5, 3000)
    logits[1, 17] = float("nan")
    logits[2, 2999] = float("inf")
    logits[3] = float("-inf")
    for settings in [(0.0, 0, 1.0, 0.0), (0.8, 20, 0.9, 0.0), (1.0, 0, 1.0, 0.0)]:
        results = []
        for fn, device in ((sample_with_budget, DEVICE), (reference.sample_with_budget, "cpu")):
            params, state = sampling_batch(5, *settings, seeds=range(5), device=device)
            tokens, logprobs = fn(logits.to(device), params, state)
            results.append((tokens.cpu().tolist(), state.finish.cpu().tolist(), state.phase.cpu().tolist()))
            assert [tokens[i].item() for i in (1, 2, 3)] == [PAD_TOKEN] * 3
            assert [state.finish[i].item() for i in (1, 2, 3)] == [FINISH_NONFINITE] * 3
            assert [state.phase[i].item() for i in (1, 2, 3)] == [DONE] * 3
            assert torch.isfinite(logprobs).all()
            assert state.finish[0].item() != FINISH_NONFINITE and tokens[0].item() >= 0
        assert results[0] == results[1], settings


@triton.jit
def _tiles_draw_kernel(logits_ptr, vocab, tile_ptr, num_tiles, m_ptr, target_ptr, out_ptr, BLOCK_V: tl.constexpr,
                       MAX_TILES: tl.constexpr):
    token = _draw_from_tiles(logits_ptr, 0, vocab, num_tiles, tile_ptr, -1, False, out_ptr, 0, 1.0, tl.load(m_ptr),
                             tl.load(target_ptr), BLOCK_V, MAX_TILES)
    tl.store(out_ptr, token)


def _draw_from_tiles_at(logits: torch.Tensor, target_share: float, block: int) -> int:
    """The unfiltered draw of _finish_kernel (_draw_from_tiles) for one row at target = share x the
    tiles' total mass, with the tile sums the scan would store (relative to the row's max here)."""
    m = logits.max()
    e = torch.exp(logits - m)
    tiles = torch.stack([torch.full((len(e) // block,), float(m)), e.view(-1, block).sum(-1)], -1).contiguous()
    out = torch.zeros(1, dtype=torch.long)
    _tiles_draw_kernel[(1,)](logits, len(logits), tiles, tiles.shape[0], m.view(1), (tiles[:, 1].sum() * target_share).view(1),
                             out, BLOCK_V=block, MAX_TILES=4)
    return int(out)


def test_a_target_past_the_total_draws_the_last_token_with_mass_never_one_without():
    """Rounding can put u * z at or past the tiles' total (u < 1, but the sums round). The draw must
    then be the last token with mass: the first token of the last tile has none here, and the old
    branch (`before = inf`) returned it (logprob -inf, a NaN importance ratio in an RL loss)."""
    block = 16
    logits = torch.randn(3 * block, generator=torch.Generator().manual_seed(3))
    logits[2 * block] = float("-inf")  # the last tile's first token: no mass
    logits[-3:] = float("-inf")  # and the row's last tokens: the last one with mass is at -4
    for share in (1.0, 1.0 + 1e-6, 1.5):
        token = _draw_from_tiles_at(logits, share, block)
        assert token == 3 * block - 4, (share, token)
    # Inside the total, the usual inverse CDF over the row (tokens with no mass never drawn).
    e = torch.exp(logits - logits.max())
    cdf = torch.cumsum(e, 0) / e.sum()
    for share in (0.0, 0.3, 0.9, 0.999):
        token = _draw_from_tiles_at(logits, share, block)
        assert e[token] > 0 and token == int(torch.searchsorted(cdf, torch.tensor(share), right=True)), share
