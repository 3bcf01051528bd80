"""Tasks: where prompts and their verifiable answers come from.

Synthetic tasks are generated on the fly from a seeded RNG, so training needs no download:
- `arithmetic[:D[:OPS]]`: a + b, a - b or a * b with D-digit operands (default 1), the
  operators drawn from OPS (default `+-*`; `arithmetic:1:+` is one-digit addition);
- `countdown[:N]`: reach a target with N given numbers (default 3), each used at most once,
  with + - * /; any correct expression earns the reward.
A JSONL file with one `{"prompt": str | "messages": [...], "answer": ...}` object per line
supplies a real dataset (MATH, GSM8K, ...), sampled without replacement epoch by epoch.
"""
from __future__ import annotations

import ast
import random
from collections import Counter
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path

from elastic_decode.utils.jsonl import check_messages, read_jsonl

from .rewards import Score, extract_boxed, score_math

INSTRUCTION = "Put your final answer in \\boxed{}."


@dataclass(frozen=True)
class Example:
    messages: tuple[dict, ...]  # the chat prompt
    answer: str  # the gold answer (countdown: the target)
    numbers: tuple[int, ...] = ()  # countdown: the numbers the expression may use


def _user(text: str) -> tuple[dict, ...]:
    return ({"role": "user", "content": text},)


class ArithmeticTask:
    def __init__(self, digits: int = 1, ops: str = "+-*"):
        if not 1 <= digits <= 9:
            raise ValueError(f"arithmetic digits must be in [1, 9], got {digits}")
        if not ops or set(ops) - set("+-*"):
            raise ValueError(f"arithmetic operators must be some of + - *, got {ops!r}")
        self.digits = digits
        self.ops = ops
        self.name = f"arithmetic:{digits}:{ops}"

    def sample(self, rng: random.Random, k: int) -> list[Example]:
        lo, hi = (0 if self.digits == 1 else 10 ** (self.digits - 1)), 10**self.digits - 1
        out = []
        for _ in range(k):
            a, b = rng.randint(lo, hi), rng.randint(lo, hi)
            op = rng.choice(self.ops)
            value = a + b if op == "+" else a - b if op == "-" else a * b
            out.append(Example(_user(f"What is {a} {op} {b}? {INSTRUCTION}"), str(value)))
        return out

    def score(self, solution_text: str, example: Example, format_weight: float) -> Score:
        return score_math(solution_text, example.answer, format_weight)  # which wants a number


class CountdownTask:
    def __init__(self, count: int = 3):
        if not 2 <= count <= 6:
            raise ValueError(f"countdown needs 2 to 6 numbers, got {count}")
        self.count = count
        self.name = f"countdown:{count}"

    def sample(self, rng: random.Random, k: int) -> list[Example]:
        out = []
        while len(out) < k:
            numbers = [rng.randint(1, 20) for _ in range(self.count)]
            # The target comes from a random expression over the numbers, so one exists.
            value = Fraction(numbers[0])
            for n in numbers[1:]:
                op = rng.choice("+-*")
                value = value + n if op == "+" else value - n if op == "-" else value * n
            if value.denominator != 1 or not 0 < value <= 1000:
                continue
            target = int(value)
            shown = list(numbers)
            rng.shuffle(shown)
            text = (
                f"Using the numbers {', '.join(map(str, shown))} (each at most once) and + - * /, "
                f"write an expression equal to {target}. {INSTRUCTION}"
            )
            out.append(Example(_user(text), str(target), tuple(shown)))
        return out

    def score(self, solution_text: str, example: Example, format_weight: float) -> Score:
        answer = extract_boxed(solution_text)
        correct = answer is not None and countdown_correct(answer, example.numbers, int(example.answer))
        formatted = answer is not None
        return Score(float(correct) + format_weight * float(formatted), correct, formatted, answer)


def countdown_correct(expression: str, numbers: tuple[int, ...], target: int) -> bool:
    """The expression uses only the given numbers (each at most once) and equals the target."""
    # "3 + 4 * 5 = 23" states the expression and its value: judge the expression.
    expression = expression.replace("\\times", "*").replace("\\cdot", "*").replace("\\div", "/").split("=")[0]
    if len(expression) > 100:
        return False
    try:
        tree = ast.parse(expression.strip(), mode="eval")
    except (SyntaxError, ValueError):
        return False
    used: list[int] = []

    def value(node) -> Fraction:
        if isinstance(node, ast.Constant) and isinstance(node.value, int) and not isinstance(node.value, bool):
            used.append(node.value)
            return Fraction(node.value)
        if isinstance(node, ast.BinOp) and isinstance(node.op, (ast.Add, ast.Sub, ast.Mult, ast.Div)):
            a, b = value(node.left), value(node.right)
            if isinstance(node.op, ast.Add):
                return a + b
            if isinstance(node.op, ast.Sub):
                return a - b
            if isinstance(node.op, ast.Mult):
                return a * b
            return a / b  # ZeroDivisionError is caught below
        raise ValueError("not an arithmetic expression over integers")

    try:
        result = value(tree.body)
    except (ValueError, ZeroDivisionError, RecursionError):
        return False
    return result == target and not (Counter(used) - Counter(numbers))


class JsonlTask:
    def __init__(self, path: Path):
        self.name = str(path)
        self.examples = load_jsonl_examples(path)
        self._order: list[int] = []

    def sample(self, rng: random.Random, k: int) -> list[Example]:
        out = []
        for _ in range(k):
            if not self._order:
                self._order = list(range(len(self.examples)))
                rng.shuffle(self._order)
            out.append(self.examples[self._order.pop()])
        return out

    def score(self, solution_text: str, example: Example, format_weight: float) -> Score:
        return score_math(solution_text, example.answer, format_weight)


def load_jsonl_examples(path: Path) -> list[Example]:
    examples = []
    for where, row in read_jsonl(path, "dataset"):
        if row.get("answer") is None or str(row["answer"]).strip() == "":
            raise ValueError(f'{where}: the row has no "answer"')
        check_messages(row, where)
        if "messages" in row:
            messages = tuple(row["messages"])
        elif isinstance(row.get("prompt"), str) and row["prompt"].strip():
            messages = _user(row["prompt"])
        else:
            raise ValueError(f'{where}: the row needs a non-empty "prompt" (text) or "messages" (chat)')
        examples.append(Example(messages, str(row["answer"]).strip()))
    if not examples:
        raise ValueError(f"dataset {path} is empty")
    return examples


def make_task(spec: str):
    """`arithmetic[:D[:OPS]]`, `countdown[:N]`, or a path to a JSONL file."""
    name, _, rest = spec.partition(":")
    if name in ("arithmetic", "countdown"):
        arg, _, ops = rest.partition(":")
        try:
            size = int(arg) if arg else None
        except ValueError:
            raise ValueError(f"task {spec!r}: the part after ':' must be an integer") from None
        if name == "arithmetic":
            return ArithmeticTask(1 if size is None else size, ops or "+-*")
        if ops:
            raise ValueError(f"task {spec!r}: countdown takes only a count of numbers")
        return CountdownTask() if size is None else CountdownTask(size)
    path = Path(spec).expanduser()
    if path.suffix == ".jsonl" or path.exists():
        if not path.is_file():
            raise ValueError(f"dataset file not found: {spec}")
        return JsonlTask(path)
    raise ValueError(f"unknown task {spec!r}: use arithmetic, arithmetic:D, arithmetic:D:OPS, countdown, countdown:N or a .jsonl file")
