"""Rewards: the final answer in `\\boxed{}` after the end-of-thinking marker, checked for value.

Only the solution (the text after the marker) is searched, so an answer buried in the thinking
earns nothing: that is the point of training under a thinking budget. Answers are compared as
strings after normalisation, then as values: the LaTeX subset that math answers use (integers,
decimals, fractions, roots, powers, pi, simple symbolic expressions) is parsed by Python's `ast`
into sympy objects, never through `eval` or `sympify` (model output is untrusted), and two
answers match when their difference simplifies to zero. math-verify would cover more notation;
it is one more dependency for what this subset already handles on the synthetic tasks and on
GSM8K-style numeric answers.
"""
from __future__ import annotations

import ast
import re
from dataclasses import dataclass

import sympy

# Model output is untrusted: bound the work one comparison can cost.
MAX_ANSWER_CHARS = 200
MAX_EXPONENT = 64


@dataclass(frozen=True)
class Score:
    reward: float
    correct: bool
    formatted: bool  # a \boxed{} answer was found after the marker
    answer: str | None  # what was extracted


def extract_boxed(text: str) -> str | None:
    """The contents of the last `\\boxed{...}` (or `\\fbox{...}`), braces matched; None if absent."""
    start = max(text.rfind("\\boxed{"), text.rfind("\\fbox{"))
    if start < 0:
        return None
    i = text.index("{", start) + 1
    depth = 1
    for j in range(i, len(text)):
        if text[j] == "{":
            depth += 1
        elif text[j] == "}":
            depth -= 1
            if depth == 0:
                return text[i:j].strip()
    return None  # unclosed: the solution budget cut it off


def normalize_answer(text: str) -> str:
    """Strip the notation that does not change an answer's value."""
    s = text.strip().strip("$").strip()
    s = re.sub(r"\\text\{([^{}]*)\}", r"\1", s)
    s = re.sub(r"\\(left|right|displaystyle|!|,|;|\s)", "", s)
    s = s.replace("\\dfrac", "\\frac").replace("\\tfrac", "\\frac")
    s = s.replace("^\\circ", "").replace("^{\\circ}", "").replace("\\%", "").replace("%", "")
    s = re.sub(r"(?<=\d),(?=\d{3}\b)", "", s)  # thousands separators
    s = s.rstrip(".").replace(" ", "")
    return s


def answers_match(predicted: str | None, gold: str) -> bool:
    """True when `predicted` states the same answer as `gold` (string or value)."""
    if predicted is None:
        return False
    p, g = normalize_answer(predicted), normalize_answer(str(gold))
    if not p:
        return False
    if p == g:
        return True
    a, b = to_sympy(p), to_sympy(g)
    if a is None or b is None:
        return False
    try:
        return bool(sympy.simplify(a - b) == 0)
    except (TypeError, ValueError, ArithmeticError, RecursionError):
        return False


def to_sympy(text: str):
    """Parse a normalised LaTeX-ish answer into a sympy expression, or None."""
    if len(text) > MAX_ANSWER_CHARS:
        return None
    s = text
    for _ in range(8):  # nested \frac / \sqrt, innermost first
        s2 = re.sub(r"\\frac\{([^{}]*)\}\{([^{}]*)\}", r"((\1)/(\2))", s)
        s2 = re.sub(r"\\sqrt\{([^{}]*)\}", r"sqrt(\1)", s2)
        if s2 == s:
            break
        s = s2
    s = s.replace("\\cdot", "*").replace("\\times", "*").replace("\\pi", "pi").replace("^", "**")
    s = s.replace("{", "(").replace("}", ")")
    if "\\" in s:
        return None
    try:
        tree = ast.parse(s, mode="eval")
    except (SyntaxError, ValueError):
        return None
    try:
        return _convert(tree.body)
    except (_Unsupported, TypeError, ValueError, ArithmeticError, RecursionError):
        return None


class _Unsupported(Exception):
    pass


_BINOPS = {
    ast.Add: lambda a, b: a + b,
    ast.Sub: lambda a, b: a - b,
    ast.Mult: lambda a, b: a * b,
    ast.Div: lambda a, b: a / b,
}


def _convert(node):
    if isinstance(node, ast.Constant) and isinstance(node.value, (int, float)) and not isinstance(node.value, bool):
        return sympy.Rational(repr(node.value)) if isinstance(node.value, float) else sympy.Integer(node.value)
    if isinstance(node, ast.Name):
        if node.id == "pi":
            return sympy.pi
        if len(node.id) == 1 and node.id.isalpha():
            return sympy.Symbol(node.id)
        raise _Unsupported(node.id)
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.USub, ast.UAdd)):
        value = _convert(node.operand)
        return -value if isinstance(node.op, ast.USub) else value
    if isinstance(node, ast.BinOp):
        if isinstance(node.op, ast.Pow):
            exponent = _convert(node.right)
            if not exponent.is_number or abs(exponent) > MAX_EXPONENT:
                raise _Unsupported("exponent")
            return _convert(node.left) ** exponent
        op = _BINOPS.get(type(node.op))
        if op is None:
            raise _Unsupported(type(node.op).__name__)
        return op(_convert(node.left), _convert(node.right))
    if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "sqrt" and len(node.args) == 1:
        return sympy.sqrt(_convert(node.args[0]))
    raise _Unsupported(type(node).__name__)


def score_math(solution_text: str, gold: str, format_weight: float) -> Score:
    """Accuracy (1 if the boxed answer equals `gold`) plus `format_weight` if an answer was boxed."""
    answer = extract_boxed(solution_text)
    correct = answers_match(answer, gold)
    formatted = answer is not None
    return Score(reward=float(correct) + format_weight * float(formatted), correct=correct, formatted=formatted, answer=answer)
