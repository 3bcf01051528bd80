"""Answer extraction, answer equivalence, task generation and dataset errors."""
from __future__ import annotations

import json
import random
import re
import time

import pytest

from elastic_decode.train.rewards import answers_match, extract_boxed, score_math
from elastic_decode.train.tasks import ArithmeticTask, CountdownTask, countdown_correct, make_task


@pytest.mark.parametrize(
    "text, expected",
    [
        ("so \\boxed{42}.", "42"),
        ("\\boxed{1} then \\boxed{ 2 }", "2"),  # the last one counts
        ("\\boxed{\\frac{1}{2}}", "\\frac{1}{2}"),  # nested braces
        ("\\fbox{7}", "7"),
        ("\\boxed{12", None),  # cut off by the budget
        ("the answer is 12", None),
    ],
)
def test_extract_boxed(text, expected):
    assert extract_boxed(text) == expected


@pytest.mark.parametrize(
    "predicted, gold",
    [
        ("42", "42"),
        ("$42$", "42"),
        ("1,000", "1000"),
        ("\\frac{1}{2}", "0.5"),
        ("\\dfrac{3}{6}", "1/2"),
        ("2*\\sqrt{2}", "\\sqrt{8}"),
        ("x^2+1", "1 + x^{2}"),
        ("-7", "-7.0"),
        ("\\text{12}", "12"),
        ("50\\%", "50"),
    ],
)
def test_answers_that_match(predicted, gold):
    assert answers_match(predicted, gold)


@pytest.mark.parametrize(
    "predicted, gold",
    [("41", "42"), (None, "42"), ("", "42"), ("\\frac{1}{3}", "0.33"), ("x+1", "x+2"), ("abc", "42")],
)
def test_answers_that_do_not_match(predicted, gold):
    assert not answers_match(predicted, gold)


def test_untrusted_answers_are_not_evaluated():
    start = time.perf_counter()
    assert not answers_match("9^{9^{9^{9}}}", "1")  # a huge power is refused, not computed
    assert not answers_match("__import__('os').getcwd()", "1")
    assert not answers_match("(" * 300 + "1" + ")" * 300, "1")  # over the length bound
    assert time.perf_counter() - start < 5


def test_score_reads_only_the_solution_and_adds_the_format_weight():
    right = score_math("The sum is \\boxed{12}.", "12", format_weight=0.25)
    wrong = score_math("The sum is \\boxed{13}.", "12", format_weight=0.25)
    missing = score_math("The sum is 12.", "12", format_weight=0.25)
    assert (right.reward, right.correct, right.formatted) == (1.25, True, True)
    assert (wrong.reward, wrong.correct, wrong.formatted) == (0.25, False, True)
    assert (missing.reward, missing.correct, missing.formatted) == (0.0, False, False)


def test_arithmetic_answers_are_right_and_reproducible():
    task = ArithmeticTask(digits=2)
    a = task.sample(random.Random(3), 50)
    assert a == task.sample(random.Random(3), 50)
    for ex in a:
        x, op, y = re.search(r"What is (\d+) ([-+*]) (\d+)\?", ex.messages[0]["content"]).groups()
        assert 10 <= int(x) <= 99 and 10 <= int(y) <= 99
        value = {"+": int(x) + int(y), "-": int(x) - int(y), "*": int(x) * int(y)}[op]
        assert ex.answer == str(value)
        assert task.score(f"\\boxed{{{value}}}", ex, 0.1).correct


def test_countdown_targets_are_reachable_and_checked():
    task = CountdownTask(3)
    for ex in task.sample(random.Random(0), 30):
        assert len(ex.numbers) == 3 and 0 < int(ex.answer) <= 1000
        assert task.score("\\boxed{" + "+".join(map(str, ex.numbers)) + "}", ex, 0.0).correct == (
            sum(ex.numbers) == int(ex.answer))
    assert countdown_correct("(3 + 5) * 2", (2, 3, 5), 16)
    assert countdown_correct("3 \\times 5 + 2 = 17", (2, 3, 5), 17)
    assert not countdown_correct("3 * 5 + 2", (2, 3, 5), 18)  # wrong value
    assert not countdown_correct("5 * 5 - 9", (2, 3, 5), 16)  # 5 used twice, 9 not given
    assert not countdown_correct("5 / (3 - 3)", (3, 3, 5), 1)  # division by zero
    assert not countdown_correct("2 ** 4", (2, 4), 16)  # only + - * /


def write_jsonl(path, rows):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return str(path)


def test_jsonl_task_reads_prompts_and_messages(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [
        {"prompt": "What is 2+2?", "answer": 4},
        {"messages": [{"role": "user", "content": "1+1?"}], "answer": "2"},
    ])
    task = make_task(path)
    seen = task.sample(random.Random(0), 4)
    assert sorted(ex.answer for ex in seen) == ["2", "2", "4", "4"]  # an epoch before repeating
    assert {ex.messages[0]["content"] for ex in seen} == {"What is 2+2?", "1+1?"}


@pytest.mark.parametrize(
    "rows, message",
    [
        ([], "is empty"),
        ([{"prompt": "2+2?"}], 'no "answer"'),
        (["{not json"], "not valid JSON"),
        ([{"answer": "4"}], 'needs a non-empty "prompt"'),
        ([{"messages": [{"content": "x"}], "answer": "1"}], 'a conversation must be a non-empty list'),
    ],
)
def test_bad_datasets_name_the_line(tmp_path, rows, message):
    path = write_jsonl(tmp_path / "bad.jsonl", rows)
    with pytest.raises(ValueError, match=re.escape(message)):
        make_task(path)


def test_arithmetic_answers_must_be_numbers():
    task = ArithmeticTask(digits=2)
    (example,) = task.sample(random.Random(0), 1)
    a, op, b = re.search(r"What is (\d+) (.) (\d+)\?", example.messages[0]["content"]).groups()
    restated = task.score(f"\\boxed{{{a} {op} {b}}}", example, 0.5)  # right value, no computation
    assert not restated.correct and restated.formatted and restated.reward == 0.5
    for answer in (example.answer, f"${example.answer}$", f"{example.answer}."):
        assert task.score(f"\\boxed{{{answer}}}", example, 0.5).correct


@pytest.mark.parametrize("gold, answer, correct", [
    ("14", "3*4+2", False),  # an expression with the right value restates, it does not answer
    ("14", "7 \\times 2", False),
    ("14", "14", True),
    ("14", "14.0", True),
    ("1000", "1,000", True),
    ("-3", "-3", True),
    ("0.5", "\\frac{1}{2}", True),  # a fraction is a number
    ("0.5", "1/2", True),
    ("\\frac{\\sqrt{2}}{2}", "\\sqrt{2}/2", True),  # symbolic gold: any equal form
])
def test_numeric_gold_answers_need_a_number(tmp_path, gold, answer, correct):
    task = make_task(write_jsonl(tmp_path / "d.jsonl", [{"prompt": "q?", "answer": gold}]))
    (example,) = task.sample(random.Random(0), 1)
    score = task.score(f"\\boxed{{{answer}}}", example, 0.25)
    assert (score.correct, score.formatted, score.reward) == (correct, True, float(correct) + 0.25)


def test_arithmetic_operator_choice():
    task = make_task("arithmetic:3:+")
    assert all(" + " in ex.messages[0]["content"] for ex in task.sample(random.Random(1), 20))


@pytest.mark.parametrize(
    "spec", ["nope", "arithmetic:x", "arithmetic:0", "arithmetic:1:/", "countdown:9", "countdown:3:+", "missing.jsonl"])
def test_bad_task_specs(spec):
    with pytest.raises(ValueError):
        make_task(spec)
