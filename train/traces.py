"""Synthetic step-by-step reasoning traces for SFT: column addition, one line per digit.

    python -m elastic_decode.train.traces --digits 3 --count 500 --output traces.jsonl

    python -m elastic_decode.train.traces --digits 2 --check --count 400 --output traces.jsonl

Each row is `{"prompt", "thinking", "solution", "answer"}` with the prompt worded exactly as the
`arithmetic:D:+` task words it, so a model fine-tuned on these traces is evaluated and trained
with GRPO on the same questions. The thinking is deliberately long (a line per digit, a carry on
every line, the result restated), which is what a thinking budget has to cut.
"""
from __future__ import annotations

import argparse
import json
import random
import sys
from pathlib import Path

from .tasks import INSTRUCTION

PLACES = ("Units", "Tens", "Hundreds", "Thousands", "Ten thousands", "Hundred thousands")


def _columns(a: int, b: int) -> list[str]:
    """One line per digit of a + b, right to left, and the final carry."""
    da, db = str(a)[::-1], str(b)[::-1]
    lines = []
    carry = 0
    for i in range(max(len(da), len(db))):
        x = int(da[i]) if i < len(da) else 0
        y = int(db[i]) if i < len(db) else 0
        total = x + y + carry
        place = PLACES[i] if i < len(PLACES) else f"Digit {i + 1}"
        lines.append(f"{place}: {x} + {y} + {carry} = {total}, write {total % 10}, carry {total // 10}.")
        carry = total // 10
    if carry:
        lines.append(f"The last carry {carry} becomes the leading digit.")
    return lines


def addition_trace(a: int, b: int, check: bool = False) -> tuple[str, str]:
    """(thinking, solution) for a + b, both non-negative.

    With `check`, the thinking goes on after the answer is found: it adds again in the other
    order and confirms, as reasoning models re-verify what they already know. That tail is what
    a thinking budget can cut without losing the answer, if the model learns to answer from it.
    """
    if a < 0 or b < 0:
        raise ValueError("addition traces are for non-negative operands")
    lines = ["Add the digits from right to left.", *_columns(a, b), f"So {a} + {b} = {a + b}."]
    if check:
        lines += ["Check by adding in the other order.", *_columns(b, a), f"The check gives {a + b} too."]
    return "\n".join(lines), f"The answer is \\boxed{{{a + b}}}."


def addition_rows(digits: int, count: int, seed: int, check: bool = False) -> list[dict]:
    """`count` traces with D-digit operands, drawn as `arithmetic:D:+` draws them."""
    rng = random.Random(seed)
    lo, hi = (0 if digits == 1 else 10 ** (digits - 1)), 10**digits - 1
    rows = []
    for _ in range(count):
        a, b = rng.randint(lo, hi), rng.randint(lo, hi)
        thinking, solution = addition_trace(a, b, check)
        rows.append({"prompt": f"What is {a} + {b}? {INSTRUCTION}", "thinking": thinking, "solution": solution,
                     "answer": str(a + b)})
    return rows


def main(argv: list[str] | None = None) -> int:
    from elastic_decode.cli import OneLineErrorParser

    p = OneLineErrorParser(prog="python -m elastic_decode.train.traces", description=__doc__,
                           formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--digits", type=int, default=3, help="operand digits, 1 to 9 (default 3)")
    p.add_argument("--count", type=int, default=500, help="traces to write (default 500)")
    p.add_argument("--seed", type=int, default=0, help="RNG seed (default 0)")
    p.add_argument("--check", action="store_true",
                   help="after the answer, add again in the other order and confirm (a longer trace)")
    p.add_argument("--output", type=Path, required=True, help="the JSONL file to write")
    args = p.parse_args(argv)
    if not 1 <= args.digits <= 9:
        p.error(f"--digits must be in [1, 9], got {args.digits}")
    if args.count < 1:
        p.error(f"--count must be >= 1, got {args.count}")
    if not args.output.parent.exists():
        p.error(f"--output folder {args.output.parent} does not exist")
    rows = addition_rows(args.digits, args.count, args.seed, args.check)
    with open(args.output, "w") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")
    print(f"wrote {len(rows)} traces to {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
