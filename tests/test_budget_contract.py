"""The budget machine of `sample_with_budget` against the contract, as properties."""
from __future__ import annotations

import math

from hypothesis import given, settings
from hypothesis import strategies as st

from budget_harness import EOS, FALLBACK, drive
from budget_model import run_contract
from elastic_decode.kernels import reference


@st.composite
def budget_rows(draw):
    k = draw(st.integers(1, 4))
    # Marker tokens from a small range so the scripted model hits them (and partial markers) often.
    marker = draw(st.lists(st.integers(0, 5), min_size=k, max_size=k))
    t = draw(st.one_of(st.none(), st.integers(0, 10)))
    s = draw(st.one_of(st.none(), st.integers(0 if t is not None else 1, 8)))
    m = draw(st.integers(0, t)) if t is not None and draw(st.booleans()) else 0
    max_new = draw(st.integers(1, 30))
    min_tokens = draw(st.integers(0, max_new)) if draw(st.booleans()) else 0
    # Wishes drawn mostly from the marker tokens, plus EOS and other tokens.
    pool = st.one_of(st.sampled_from(marker), st.integers(0, 13), st.just(EOS))
    wishes = draw(st.lists(pool, min_size=max_new, max_size=max_new))
    if draw(st.booleans()):  # the model writes the whole marker at a random point
        at = draw(st.integers(0, max_new - 1))
        wishes[at : at + k] = marker[: max_new - at]
    return dict(t=t, s=s, marker=marker, m=m, max_new=max_new, min_tokens=min_tokens), wishes


@settings(max_examples=300, deadline=None)
@given(st.lists(budget_rows(), min_size=1, max_size=5))
def test_reference_follows_the_contract(batch):
    rows = [r for r, _ in batch]
    wishes = [w for _, w in batch]
    got = drive(reference.sample_with_budget, rows, wishes)
    for row, w, g in zip(rows, wishes, got):
        exp = run_contract(w, row["t"], row["s"], row["marker"], row["m"], {EOS}, row["max_new"], FALLBACK,
                           row.get("min_tokens", 0))
        assert g["tokens"] == exp.tokens, (row, w)
        assert g["forced"] == exp.forced
        assert g["think_tokens"] == exp.think_tokens
        assert g["solution_tokens"] == exp.solution_tokens
        assert g["forced_end"] == exp.forced_end
        assert g["finish"] == exp.finish
        check_invariants(row, g)


def check_invariants(row, g):
    """Facts the budget contract (docs/architecture.md) states about every completion, independent of the script."""
    t, s, marker, k = row["t"], row["s"], row["marker"], len(row["marker"])
    n = len(g["tokens"])
    assert n <= row["max_new"]
    if t is None:
        assert not any(g["forced"]) and g["think_tokens"] == 0 and g["solution_tokens"] == n
        return
    if g["forced_end"]:
        assert g["think_tokens"] <= t
        # The forced tokens are exactly (a prefix of) E, right after the thinking tokens.
        start = g["think_tokens"]
        forced_at = [i for i, f in enumerate(g["forced"]) if f]
        assert forced_at == list(range(start, start + len(forced_at)))
        assert [g["tokens"][i] for i in forced_at] == marker[: len(forced_at)]
    marker_out = n >= g["think_tokens"] + k and g["tokens"][g["think_tokens"] : g["think_tokens"] + k] == marker
    if marker_out:
        assert n == g["think_tokens"] + k + g["solution_tokens"]
        if s is not None:
            assert n <= t + k + s
    if g["think_tokens"] + k <= n and not marker_out:
        raise AssertionError("tokens after the thinking phase that are not the marker")


def test_zero_budget_forces_marker_first():
    rows = [dict(t=0, s=3, marker=[4, 5, 6], m=0, max_new=20)]
    got = drive(reference.sample_with_budget, rows, [[1] * 20])[0]
    assert got["tokens"][:3] == [4, 5, 6] and got["forced"][:3] == [1, 1, 1]
    assert got["think_tokens"] == 0 and got["solution_tokens"] == 3 and got["forced_end"]


def test_model_closing_its_thought_is_not_forced():
    rows = [dict(t=10, s=2, marker=[4, 5], m=0, max_new=20)]
    got = drive(reference.sample_with_budget, rows, [[1, 2, 4, 5, 7, 8, 9]])[0]
    assert got["tokens"] == [1, 2, 4, 5, 7, 8]
    assert got["forced"] == [0] * 6 and not got["forced_end"]
    assert got["think_tokens"] == 2 and got["solution_tokens"] == 2 and got["finish"] == "length"


def test_partial_marker_is_not_resumed():
    # The model writes E[0] as its last budgeted token: it stays a thinking token and the
    # whole marker is forced after it.
    rows = [dict(t=3, s=1, marker=[4, 5], m=0, max_new=20)]
    got = drive(reference.sample_with_budget, rows, [[1, 2, 4, 9, 9, 9, 9]])[0]
    assert got["tokens"] == [1, 2, 4, 4, 5, 9]
    assert got["forced"] == [0, 0, 0, 1, 1, 0]
    assert got["think_tokens"] == 3


def test_eos_while_thinking_becomes_the_marker():
    rows = [dict(t=10, s=5, marker=[4, 5], m=0, max_new=20)]
    # Wishes are per generation step: step 2 (the forced E[1]) ignores its wish.
    got = drive(reference.sample_with_budget, rows, [[1, EOS, 7, 7, 7, 7, EOS]])[0]
    assert got["tokens"] == [1, 4, 5, 7, 7, 7, EOS]
    assert got["forced"][:3] == [0, 1, 1] and got["think_tokens"] == 1 and got["forced_end"]
    assert got["finish"] == "stop"


def test_min_think_suppresses_the_closing_token():
    rows = [dict(t=10, s=1, marker=[4], m=3, max_new=20)]
    got = drive(reference.sample_with_budget, rows, [[4, EOS, 4, 4, 9, 9]])[0]
    # Steps 0-2: closing (or stopping) would leave fewer than 3 thinking tokens, so the
    # model's second choice is used; at step 3 it may close.
    assert got["tokens"] == [FALLBACK, FALLBACK, FALLBACK, 4, 9]
    assert got["think_tokens"] == 3 and not got["forced_end"]


def test_min_tokens_suppresses_stop_tokens_in_both_phases():
    """vLLM's min_tokens (SkyRL sends 1): no stop token before that many tokens, thinking or solving."""
    rows = [dict(t=10, s=5, marker=[4], m=0, max_new=20, min_tokens=2),
            dict(t=None, s=None, marker=[4], m=0, max_new=20, min_tokens=3)]
    got = drive(reference.sample_with_budget, rows, [[EOS, EOS, EOS, 9], [EOS, 9, EOS, EOS]])
    # Row 0: the first two stops become the second choice; the third, allowed, closes the thought.
    assert got[0]["tokens"] == [FALLBACK, FALLBACK, 4, 9, 9, 9, 9, 9]
    assert got[0]["forced"] == [0, 0, 1, 0, 0, 0, 0, 0] and got[0]["think_tokens"] == 2
    assert got[1]["tokens"] == [FALLBACK, 9, FALLBACK, EOS] and got[1]["finish"] == "stop"


def test_logprobs_are_honest_for_sampled_and_forced_tokens():
    rows = [dict(t=1, s=1, marker=[4], m=0, max_new=5)]
    got = drive(reference.sample_with_budget, rows, [[1, 1, 1]])[0]
    # Scripted logits: 10 for the favourite, 5 for FALLBACK, 0 for the 14 others.
    z = math.exp(10) + math.exp(5) + 14
    assert got["tokens"] == [1, 4, 1]
    assert abs(got["logprobs"][0] - (10 - math.log(z))) < 1e-5
    assert abs(got["logprobs"][1] - (0 - math.log(z))) < 1e-5  # the forced marker: its real logprob
    assert got["forced"] == [0, 1, 0]


def test_done_rows_emit_padding_and_do_not_change():
    rows = [dict(t=None, s=1, marker=[4], m=0, max_new=5), dict(t=None, s=4, marker=[4], m=0, max_new=5)]
    got = drive(reference.sample_with_budget, rows, [[1] * 5, [2] * 5])
    assert got[0]["tokens"] == [1] and got[1]["tokens"] == [2, 2, 2, 2]


def test_step_needs_no_per_sequence_python_loop():
    """The reference op is batched: 1000 rows in one call."""
    rows = [dict(t=i % 7, s=3, marker=[4, 5][: 1 + i % 2], m=0, max_new=12) for i in range(1000)]
    wishes = [[(i + j) % 13 for j in range(12)] for i in range(1000)]
    got = drive(reference.sample_with_budget, rows, wishes)
    for row, w, g in zip(rows, wishes, got):
        exp = run_contract(w, row["t"], row["s"], row["marker"], row["m"], {EOS}, row["max_new"], FALLBACK,
                           row.get("min_tokens", 0))
        assert g["tokens"] == exp.tokens
