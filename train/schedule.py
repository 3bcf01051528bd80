"""Thinking budgets that move over training (`--think-budget-schedule`), drawn per rollout group.

- `constant`: --think-budget at every step (the E1 recipe; the default);
- `linear:A:B`: from A at step 1 to B at the last step, in a straight line (rounded), as budget
  curricula shrink (or grow) the thinking allowed;
- `step:A,B@S,C@T`: A from step 1, B from step S, C from step T (a step decay);
- `choice:A,B,C`: each prompt's group draws one of the budgets, uniformly (a budget prior, as
  AnytimeReasoner samples thinking budgets so that the policy learns to answer at any of them).

A prompt's G completions share the budget they are drawn (their advantages compare like with like).
"""
from __future__ import annotations

import random
from dataclasses import dataclass

KINDS = ("constant", "linear", "step", "choice")


@dataclass(frozen=True)
class BudgetSchedule:
    kind: str
    values: tuple[int, ...] = ()  # linear: (A, B); step: the budgets; choice: the set
    starts: tuple[int, ...] = ()  # step: the first step of each budget

    @classmethod
    def parse(cls, text: str) -> BudgetSchedule:
        """A schedule from its flag text; ValueError naming what is wrong."""
        kind, _, rest = text.partition(":")
        if kind not in KINDS:
            raise ValueError(f"think_budget_schedule must start with one of {', '.join(KINDS)}; got {text!r}")
        if kind == "constant":
            if rest:
                raise ValueError("think_budget_schedule constant takes no values (it is --think-budget)")
            return cls(kind)
        if kind == "linear":
            parts = rest.split(":")
            if len(parts) != 2:
                raise ValueError(f"think_budget_schedule linear is linear:START:END; got {text!r}")
            return cls(kind, tuple(_budget(p, text) for p in parts))
        items = [p.strip() for p in rest.split(",") if p.strip()]
        if not items:
            raise ValueError(f"think_budget_schedule {kind} needs budgets after the colon; got {text!r}")
        if kind == "choice":
            return cls(kind, tuple(_budget(p, text) for p in items))
        values, starts = [], []
        for k, item in enumerate(items):
            budget, at, step = item.partition("@")
            start = 1 if not at else _budget(step, text)
            if k == 0 and start != 1:
                raise ValueError(f"think_budget_schedule step starts at step 1 (leave the first @ off); got {text!r}")
            if k and (not at or start <= starts[-1]):
                raise ValueError(f"think_budget_schedule step needs increasing @STEP after the first; got {text!r}")
            values.append(_budget(budget, text))
            starts.append(start)
        return cls(kind, tuple(values), tuple(starts))

    def most(self, constant: int) -> int:
        """The largest budget the schedule gives (`constant` is --think-budget)."""
        return constant if self.kind == "constant" else max(self.values)

    def budgets(self, step: int, steps: int, groups: int, constant: int, rng: random.Random) -> list[int]:
        """The thinking budget of each of `groups` prompt groups at `step` (1-based) of `steps`."""
        if self.kind == "constant":
            value = constant
        elif self.kind == "linear":
            a, b = self.values
            value = round(a + (b - a) * (step - 1) / max(steps - 1, 1))
        elif self.kind == "step":
            value = next(v for v, s in zip(reversed(self.values), reversed(self.starts)) if step >= s)
        else:
            return [rng.choice(self.values) for _ in range(groups)]
        return [value] * groups


def _budget(text: str, whole: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise ValueError(f"think_budget_schedule: {text!r} is not an integer (in {whole!r})") from None
    if value < 0:
        raise ValueError(f"think_budget_schedule: budgets and steps are >= 0 (in {whole!r})")
    return value
