"""`python -m elastic_decode.eval` on tiny random models: the table's rows, columns and counts,
aggregates recomputed from the saved completions, budgets honoured, one-line errors."""
from __future__ import annotations

import csv
import json
import os
import subprocess
import sys

import pytest

from elastic_decode.utils.answers import majority_vote
from elastic_decode.eval import BudgetResult, main
from test_cli import assert_clean_error

pytestmark = pytest.mark.slow

COLUMNS = list(BudgetResult.__dataclass_fields__)


@pytest.fixture(scope="module")
def eval_run(tiny_models, tmp_path_factory):
    out = tmp_path_factory.mktemp("eval")
    task = out / "task.jsonl"
    rows = [{"prompt": f"What is {a} + 1?", "answer": str(a + 1)} for a in range(5)]
    task.write_text("".join(json.dumps(r) + "\n" for r in rows))
    code = main(["--model", str(tiny_models["llama"]), "--model", str(tiny_models["qwen3"]), "--label", "llama",
                 "--label", "qwen3", "--task", str(task), "--num-problems", "3", "--think-budgets", "0,3,none",
                 "--solution-budget", "4", "--max-tokens", "24", "-n", "2", "--temperature", "1.0", "--seed", "5",
                 "--output-dir", str(out / "run"), "--save-completions", "--no-progress",
                 "--kv-cache-memory-gb", "0.05", "--device", "cpu"])
    assert code == 0
    return out / "run"


def test_one_row_per_checkpoint_and_budget_with_every_column(eval_run):
    rows = [json.loads(line) for line in (eval_run / "results.jsonl").read_text().splitlines()]
    assert [(r["model"], r["think_budget"]) for r in rows] == [
        ("llama", "0"), ("llama", "3"), ("llama", "none"), ("qwen3", "0"), ("qwen3", "3"), ("qwen3", "none")]
    assert all(list(r) == COLUMNS for r in rows)
    assert all(r["problems"] == 3 and r["samples"] == 2 for r in rows)
    with open(eval_run / "results.csv") as f:
        table = list(csv.DictReader(f))
    assert list(table[0]) == COLUMNS and len(table) == 6
    assert (eval_run / "accuracy_vs_tokens.png").stat().st_size > 1000


def test_aggregates_match_the_saved_completions(eval_run):
    rows = [json.loads(line) for line in (eval_run / "results.jsonl").read_text().splitlines()]
    records = [json.loads(line) for line in (eval_run / "completions.jsonl").read_text().splitlines()]
    assert len(records) == 6 * 3 * 2
    for row in rows:
        cell = [r for r in records if r["model"] == row["model"] and r["think_budget"] == row["think_budget"]]
        assert len(cell) == 6
        assert row["accuracy"] == pytest.approx(sum(r["correct"] for r in cell) / 6)
        assert row["think_tokens"] == pytest.approx(sum(r["think_tokens"] for r in cell) / 6)
        assert row["total_tokens"] == pytest.approx(sum(r["total_tokens"] for r in cell) / 6)
        assert row["forced_end_rate"] == pytest.approx(sum(r["forced_end"] for r in cell) / 6)
        votes = 0
        for p in range(3):
            samples = [r for r in cell if r["problem"] == p]
            vote = majority_vote([r["answer"] for r in samples])
            assert all(r["vote"] == vote.answer for r in samples)
            votes += vote.index is not None and samples[vote.index]["correct"]
        assert row["vote_accuracy"] == pytest.approx(votes / 3)


def test_budgets_are_honoured(eval_run):
    records = [json.loads(line) for line in (eval_run / "completions.jsonl").read_text().splitlines()]
    for r in records:
        assert r["total_tokens"] <= 24
        if r["think_budget"] == "0":
            assert r["think_tokens"] == 0 and r["forced_end"]
        elif r["think_budget"] == "3":
            assert r["think_tokens"] <= 3
        assert r["solution_tokens"] <= 4
    # Under "none" nothing is forced: a random model rarely closes its thinking within 24 tokens.
    assert not any(r["forced_end"] for r in records if r["think_budget"] == "none" and r["think_tokens"] >= 20)


def run_eval(*args):
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    return subprocess.run([sys.executable, "-m", "elastic_decode.eval", *map(str, args)],
                          capture_output=True, text=True, timeout=300, env=env)


@pytest.mark.parametrize(
    "args, message",
    [
        (["--think-budgets", "0,abc"], "must be a non-negative integer or 'none', got 'abc'"),
        (["--think-budgets", "8,8"], "appears twice"),
        (["--model", "/no/such/model"], "/no/such/model"),
        (["--num-problems", "0"], "--num-problems must be >= 1"),
        (["--task", "nothing:1"], "unknown task"),
        (["--model", "a", "--model", "b", "--label", "x"], "1 --label for 2 --model"),
        (["--temperature", "-1"], "temperature must be"),
        (["--num-scheduler-steps", "0"], "--num-scheduler-steps must be >= 1"),
        (["--cuda-graphs", "--device", "cpu"], "--cuda-graphs needs a CUDA device"),
    ],
)
def test_bad_input_is_one_line(args, message):
    assert_clean_error(run_eval(*args), message)
