"""An independent, token-by-token statement of the budget contract (docs/architecture.md, "The budget contract").

Written as plainly as possible from the text of the contract, with no code shared with the
kernels, so the batched kernels can be checked against it.
"""
from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class Expected:
    tokens: list[int] = field(default_factory=list)
    forced: list[int] = field(default_factory=list)
    think_tokens: int = 0
    solution_tokens: int = 0
    forced_end: bool = False
    finish: str = "length"


def run_contract(wishes, t, s, marker, m, stop, max_new, fallback, min_tokens=0) -> Expected:
    """What a sequence emits when at generation step j the model's favourite token is wishes[j].

    `fallback` is the model's second choice at every step (used when the favourite is
    suppressed by min_think, or is a stop token before min_tokens tokens). t = None means no
    thinking phase.
    """
    e = Expected()
    k = len(marker)
    thinking = t is not None
    pending: list[int] = []  # marker tokens still to force
    thought: list[int] = []  # emitted thinking tokens (the marker window looks at these)
    while len(e.tokens) < max_new:
        if thinking and not pending and e.think_tokens >= t:
            pending, e.forced_end = list(marker), True
        if not pending and thinking:
            wish = wishes[len(e.tokens)]
            completes = wish == marker[-1] and thought[len(thought) - (k - 1):] == marker[:-1] if k > 1 else wish == marker[0]
            if completes and e.think_tokens - (k - 1) < m:
                wish = fallback
            if wish in stop and (e.think_tokens < m or len(e.tokens) < min_tokens):
                wish = fallback
            if wish in stop:  # the model tries to stop while thinking: the marker replaces it
                pending, e.forced_end = list(marker), True
            else:
                e.tokens.append(wish)
                e.forced.append(0)
                e.think_tokens += 1
                thought.append(wish)
                if len(thought) >= k and thought[-k:] == list(marker):
                    e.think_tokens -= k
                    thinking = False
                    if s == 0:
                        return e
                continue
        if pending:
            e.tokens.append(pending.pop(0))
            e.forced.append(1)
            if not pending:
                thinking = False
                if s == 0:
                    return e
            continue
        wish = wishes[len(e.tokens)]
        if wish in stop and len(e.tokens) < min_tokens:
            wish = fallback
        e.tokens.append(wish)
        e.forced.append(0)
        e.solution_tokens += 1
        if wish in stop:
            e.finish = "stop"
            return e
        if s is not None and e.solution_tokens >= s:
            return e
    return e
