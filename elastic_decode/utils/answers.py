"""Final answers: the last `\\boxed{}` of a text, answer equivalence, and majority voting.

Answers are compared as strings after normalisation, then as values: the LaTeX subset that math
answers use (integers, decimals, fractions, roots, powers, pi, simple symbolic expressions) is
parsed by Python's `ast` into sympy objects, never through `eval` or `sympify` (model output is
untrusted), and two answers match when their difference simplifies to zero. math-verify would
cover more notation; it is one more dependency for what this subset already handles on the
synthetic tasks and on GSM8K-style numeric answers.

Majority voting (self-consistency, Wang et al., arXiv 2203.11171) groups a request's n answers
by that equivalence and picks the largest group.
"""
from __future__ import annotations

import ast
import dataclasses
import functools
import math
import re
from dataclasses import dataclass

# Model output is untrusted: bound the work one comparison can cost.
MAX_ANSWER_CHARS = 200
MAX_EXPONENT = 64


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


# A number written out: an integer, a decimal, or a fraction of two integers, signed.
_NUMBER = re.compile(r"-?(\d+(\.\d+)?|\d+/\d+|\\frac\{\d+\}\{\d+\})")


def is_number(text: str) -> bool:
    """True when `text` states a number rather than an expression that evaluates to one."""
    return bool(_NUMBER.fullmatch(normalize_answer(str(text))))


@functools.cache
def _sympy():
    """sympy, imported when an answer is first compared by value (it takes about a second to import, which
    `import elastic_decode` should not cost every user)."""
    import sympy

    return sympy


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
        return bool(_sympy().simplify(a - b) == 0)
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
    sympy = _sympy()
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


# -- majority voting ---------------------------------------------------------------------


@dataclass(frozen=True)
class Vote:
    """The outcome of a majority vote over one request's completions."""

    answer: str | None  # the winning answer as first written; None when no completion answered
    votes: int  # completions in the winning group
    answered: int  # completions with an extractable answer (the others do not vote)
    total: int  # completions in all
    index: int | None  # the completion whose answer stands for the winning group (its first)
    tie: bool  # another group had as many votes (the earliest-answered group won)
    answers: tuple[str | None, ...]  # every completion's extracted answer, in order
    # Weighted votes (DeepConf: by confidence): the winning group's share of the answered weight; with
    # equal weights, votes / answered.
    weight_share: float = 0.0

    @property
    def share(self) -> float:
        """Fraction of all completions that voted for the winner."""
        return self.votes / self.total if self.total else 0.0


def majority_vote(answers: list[str | None], weights: list[float] | None = None) -> Vote:
    """Group equivalent answers (`answers_match`) and pick the largest group (with `weights`, the heaviest:
    DeepConf's confidence-weighted vote).

    Missing answers (None: no box, or a box the budget cut off) do not vote. Ties go to the
    group whose first answer came earliest, so the result does not depend on dict order.
    """
    weights = [1.0] * len(answers) if weights is None else list(weights)
    groups: list[list[int]] = []  # completion indices; groups[g][0] is the representative
    for i, answer in enumerate(answers):
        if answer is None or not normalize_answer(answer):
            continue
        for group in groups:
            if answers_match(answer, answers[group[0]]):
                group.append(i)
                break
        else:
            groups.append([i])
    if not groups:
        return Vote(None, 0, 0, len(answers), None, False, tuple(answers))
    weight = [sum(weights[i] for i in g) for g in groups]
    best = max(weight)
    winner = groups[weight.index(best)]  # groups are in first-answer order
    total = sum(weight)
    return Vote(
        answer=answers[winner[0]],
        votes=len(winner),
        answered=sum(len(g) for g in groups),
        total=len(answers),
        index=winner[0],
        tie=sum(w == best for w in weight) > 1,
        answers=tuple(answers),
        weight_share=best / total if total > 0 else 0.0,
    )


def confidence_vote(answers: list[str | None], scores: list[float | None], keep: float = 1.0) -> Vote:
    """DeepConf's offline vote: the traces ranked by confidence `scores` (a trace's lowest group or tail
    confidence; None: no score, it does not vote), the top `keep` share of them kept (at least one; DeepConf
    filters with 0.1 or 0.9), and a vote over those weighted by their scores. The Vote's `answers` are all the
    traces'; the ones filtered out count as not answered."""
    ranked = sorted((i for i, s in enumerate(scores) if s is not None), key=lambda i: -scores[i])
    kept = set(ranked[: max(1, math.ceil(keep * len(ranked)))]) if ranked else set()
    vote = majority_vote([a if i in kept else None for i, a in enumerate(answers)],
                         [scores[i] if i in kept else 0.0 for i in range(len(answers))])
    return dataclasses.replace(vote, answers=tuple(answers))


def vote_on_texts(texts: list[str], scores: list[float | None] | None = None, keep: float = 1.0) -> Vote:
    """Majority vote over the last `\\boxed{}` answer of each text (with confidence `scores`: DeepConf's
    weighted and filtered vote, `confidence_vote`)."""
    answers = [extract_boxed(t) for t in texts]
    return majority_vote(answers) if scores is None else confidence_vote(answers, scores, keep)
