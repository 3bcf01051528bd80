"""Majority voting (self-consistency) on crafted completions, through the API and the CLI."""
from __future__ import annotations

import json

import pytest

from elastic_decode import CompletionOutput, RequestOutput, majority_vote
from elastic_decode.utils.answers import vote_on_texts

from test_cli import assert_clean_error, run_cli


def test_the_largest_group_wins_and_equivalent_answers_pool():
    # "0.5", "\frac{1}{2}" and "1/2" are one answer; "3" has two votes, the halves three.
    vote = majority_vote(["3", "0.5", "\\frac{1}{2}", "3", "1/2"])
    assert vote.answer == "0.5"  # the group's first answer stands for it
    assert (vote.votes, vote.answered, vote.total, vote.index, vote.tie) == (3, 5, 5, 1, False)
    assert vote.share == pytest.approx(0.6)


def test_a_tie_goes_to_the_group_answered_first():
    vote = majority_vote(["7", "8", "8", "7"])
    assert vote.answer == "7" and vote.votes == 2 and vote.tie and vote.index == 0
    vote = majority_vote(["8", "7", "7", "8"])
    assert vote.answer == "8" and vote.tie


def test_missing_answers_do_not_vote():
    vote = majority_vote([None, "5", None, "", "6", "5"])
    assert vote.answer == "5" and vote.votes == 2 and vote.answered == 3 and vote.total == 6 and vote.index == 1
    assert vote.answers == (None, "5", None, "", "6", "5")


def test_no_answer_at_all():
    vote = majority_vote([None, None])
    assert vote.answer is None and vote.votes == 0 and vote.index is None and not vote.tie
    assert vote.share == 0.0
    assert majority_vote([]).total == 0


def test_malformed_boxes_are_missing_answers():
    texts = [
        "so \\boxed{12",  # cut off by the solution budget: no answer
        "the answer is 12",  # not boxed
        "\\boxed{}",  # empty box
        "first \\boxed{11} then \\boxed{13}",  # the last box counts
        "\\boxed{13}.",
        "\\boxed{ 12 }",
    ]
    vote = vote_on_texts(texts)
    assert vote.answers == (None, None, "", "13", "13", "12")
    assert vote.answer == "13" and vote.votes == 2 and vote.answered == 3 and vote.index == 3


def test_untrusted_answers_vote_as_strings():
    vote = majority_vote(["__import__('os')", "__import__('os')", "9^{9^{9^{9}}}"])
    assert vote.answer == "__import__('os')" and vote.votes == 2


def _completion(index: int, solution: str) -> CompletionOutput:
    return CompletionOutput(index=index, text="think" + solution, thinking_text="think \\boxed{99}",
                            solution_text=solution, token_ids=[1], logprobs=[0.0], forced_mask=[0],
                            think_tokens=1, solution_tokens=1, forced_end=False, finish_reason="stop")


def test_request_output_votes_on_solutions_only():
    # Every thinking text holds \boxed{99}; only what comes after the marker votes.
    out = RequestOutput(0, None, [1], [_completion(i, s) for i, s in enumerate(["\\boxed{4}", "x", "\\boxed{4.0}"])])
    vote = out.vote()
    assert vote.answer == "4" and vote.votes == 2 and vote.answered == 2


def test_cli_vote_writes_the_vote(tiny_llama, tmp_path):
    prompts = tmp_path / "in.jsonl"
    prompts.write_text(json.dumps({"prompt": "2 + 2 ="}) + "\n")
    out = tmp_path / "out.jsonl"
    result = run_cli("--model", tiny_llama, "--prompts-file", prompts, "--output", out, "-n", "3", "--vote",
                     "--think-budget", "4", "--solution-budget", "6", "--seed", "0")
    assert result.returncode == 0, result.stderr
    (row,) = [json.loads(line) for line in out.read_text().splitlines()]
    vote = row["vote"]
    # The vote is recomputed from the completions it was written next to.
    expected = vote_on_texts([c["solution_text"] for c in row["completions"]])
    assert vote["answers"] == list(expected.answers) and vote["answer"] == expected.answer
    assert vote["total"] == 3


def test_cli_vote_prints_the_vote(tiny_llama):
    result = run_cli("--model", tiny_llama, "--prompt", "1 + 1 =", "-n", "2", "--vote",
                     "--think-budget", "3", "--solution-budget", "4", "--seed", "0")
    assert result.returncode == 0, result.stderr
    assert "[majority vote:" in result.stdout


def test_cli_vote_needs_several_completions(tiny_llama):
    assert_clean_error(run_cli("--model", tiny_llama, "--prompt", "hi", "--vote"), "--vote needs -n 2")
