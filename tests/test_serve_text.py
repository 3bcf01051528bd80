"""Streamed text of a completion (elastic_decode.serve.text): deltas of random sizes over real
token ids with multi-byte characters split across tokens, a multi-token marker, stop strings that
span deltas. What is streamed must add up to what the whole ids decode to, and never be taken back."""
from __future__ import annotations

import random

import pytest
from transformers import AutoTokenizer

from elastic_decode.engine.loop import CompletionDelta
from elastic_decode.serve.text import CompletionText

THINK = "Let me think: 17 × 23 = 391 🙂 — 三百九十一, ok."
SOLUTION = "The answer is 391 ✅. Done; répondu: 三九一 ###END### trailing 🙂🙂"
MARKER = "\n</think>\n\n"


@pytest.fixture(scope="module")
def tok(embedded_path):
    return AutoTokenizer.from_pretrained(embedded_path)


def _deltas(think, marker, solution, rng, finish="length"):
    """The deltas the engine loop would send for thinking + marker + solution tokens."""
    ids = think + marker + solution
    at, out = 0, []
    while at < len(ids):
        step = rng.randint(1, 4)
        end = min(len(ids), at + step)
        thinking = end < len(think) + len(marker)
        # think_count counts partial marker tokens until the marker completes
        think_count = end if thinking else len(think)
        out.append(CompletionDelta(
            index=0, token_ids=ids[at:end], logprobs=[-0.5] * (end - at), forced_mask=[0] * (end - at),
            num_tokens=end, think_tokens=think_count, solution_tokens=max(0, end - len(think) - len(marker)),
            thinking=thinking, forcing=False, marker_len=len(marker), forced_end=False,
            finish_reason=finish if end == len(ids) else None, output_think=think_count, output_marker=len(marker),
            prompt_solution=0))
        at = end
    return out


@pytest.mark.parametrize("seed", range(8))
def test_streamed_text_adds_up_to_the_whole(tok, seed):
    rng = random.Random(seed)
    decode = lambda ids: tok.decode(ids, skip_special_tokens=True)  # noqa: E731
    think = tok(THINK, add_special_tokens=False)["input_ids"]
    marker = tok(MARKER, add_special_tokens=False)["input_ids"]
    solution = tok(SOLUTION, add_special_tokens=False)["input_ids"]
    assert len(marker) > 1
    text = CompletionText(decode, thinks=True)
    got = {"reasoning": "", "marker": "", "content": ""}
    for d in _deltas(think, marker, solution, rng):
        piece = text.feed(d)
        assert not (piece.content and not got["marker"] and not piece.marker)
        for part in got:
            got[part] += getattr(piece, part)
        assert not got["reasoning"].endswith("\ufffd") and not got["content"].endswith("\ufffd")
    assert got == {"reasoning": decode(think), "marker": decode(marker), "content": decode(solution)}
    assert text.full_text() == (decode(think), decode(marker), decode(solution))
    assert text.token_ids == think + marker + solution and text.finish_reason == "length"


@pytest.mark.parametrize("seed", range(8))
@pytest.mark.parametrize("stop", ["###END###", "répondu", "✅", "🙂🙂"])
def test_stop_strings_end_the_completion_at_their_token(tok, seed, stop):
    rng = random.Random(seed)
    decode = lambda ids: tok.decode(ids, skip_special_tokens=True)  # noqa: E731
    think = tok(THINK, add_special_tokens=False)["input_ids"]
    marker = tok(MARKER, add_special_tokens=False)["input_ids"]
    solution = tok(SOLUTION, add_special_tokens=False)["input_ids"]
    for stream in (True, False):
        text = CompletionText(decode, thinks=True, stop=[stop, "never there"], stream=stream)
        content = ""
        for d in _deltas(think, marker, solution, rng):
            content += text.feed(d).content
        whole = decode(solution)
        cut = whole[: whole.index(stop)]
        # the fewest solution tokens whose text holds the stop string
        need = next(k for k in range(1, len(solution) + 1) if stop in decode(solution[:k]))
        assert text.finish_reason == "stop"
        assert text.token_ids == think + marker + solution[:need]
        assert text.full_text()[2] == cut
        if stream:
            assert content == cut
