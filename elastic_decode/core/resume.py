"""Where a request's budget machine starts: the rollout's budget, not the request's.

RL frameworks resubmit an aborted rollout as prompt + the tokens it had (AReaL's and slime's partial
rollouts), and a conversation carries earlier assistant turns. A thinking budget belongs to the rollout:
the thinking already in the prompt counts. The request may say how much is spent (`think_spent`,
`solution_spent`); otherwise it is read off the prompt's last assistant turn:

- the turn starts after the chat template's assistant-start tokens (with the opening of the thinking
  block for templates that open it), or, where the prompt has no assistant start, after the model's
  last `<think>` token, and then only an open thought counts (a raw prompt whose `<think>` block is
  closed, a few-shot example say, starts fresh); a prompt with neither is a fresh rollout, and so is
  one whose last assistant turn holds an end of turn (an EOS id: the turn was finished, the prompt
  goes on past it);
- a turn that holds the marker E has closed its thought: SOLVING, the tokens before E thinking, those
  after it solution; E was forced when it ends past the budget (a marker the model writes itself closes
  the thought only before t: the machine counts its tokens as thinking until the last one);
- a turn that ends with a proper prefix of E after at least t thinking tokens was being forced: FORCING,
  the rest of E next (a prefix before t is the model's own start of a marker: thinking tokens, as the
  machine counts them);
- otherwise THINKING with every token of the turn counted, the last of them in the marker window.

So any split of a rollout into resubmissions ends with the unsplit rollout's accounting. One case cannot
be read off tokens: a marker forced because the model tried to stop early (EOS while thinking), split
inside the marker, is resumed as the model's own start of a marker (its tokens thinking), and such a
marker whole in the prompt as the model's own (not forced_end). Only earlier
turns' tokens are never counted: each assistant turn has its own budget (vLLM's bug #43708 counts them).
"""
from __future__ import annotations

from dataclasses import dataclass

from elastic_decode.kernels import FORCING, RECENT_PAD, SOLVING, THINKING

from ..sampling_params import SamplingParams


@dataclass(frozen=True)
class StartState:
    """The budget machine's state before the first new token, and what of it the prompt holds."""

    phase: int
    think_count: int = 0  # the rollout's thinking tokens so far
    solution_count: int = 0  # and its solution tokens
    force_pos: int = 0  # FORCING: marker tokens already out
    forced_end: int = 0
    recent: tuple[int, ...] = ()  # the last thinking tokens, right-aligned in len(marker) (RECENT_PAD before)
    prompt_think: int = 0  # of think_count, the ones in the prompt
    prompt_marker: int = 0  # marker tokens at the prompt's end (FORCING)


def _find(seq: list[int], sub: tuple[int, ...]) -> int:
    """The first index of `sub` in `seq`, or -1."""
    k = len(sub)
    for i in range(len(seq) - k + 1):
        if tuple(seq[i:i + k]) == sub:
            return i
    return -1


def _rfind(seq: list[int], sub: tuple[int, ...]) -> int:
    k = len(sub)
    for i in range(len(seq) - k, -1, -1):
        if tuple(seq[i:i + k]) == sub:
            return i
    return -1


def open_turn(prompt: list[int], assistant_start: tuple[int, ...], think_open: int | None,
              marker: tuple[int, ...] = (), end_ids: tuple[int, ...] = ()) -> list[int] | None:
    """The tokens of the prompt's last assistant turn (after its start), or None where the prompt has none or
    that turn has ended (an id of `end_ids` in it); after a bare `<think>`, only an open thought (no marker)."""
    turn = None
    if assistant_start:
        at = _rfind(prompt, assistant_start)
        if at >= 0:
            turn = prompt[at + len(assistant_start):]
    if turn is None and think_open is not None and think_open in prompt:
        turn = prompt[len(prompt) - prompt[::-1].index(think_open):]
        if marker and _find(turn, marker) >= 0:
            return None
    if turn is not None and any(t in end_ids for t in turn):
        return None
    return turn


def _window(tokens: list[int], width: int) -> tuple[int, ...]:
    tail = tokens[-width:] if width else []
    return (RECENT_PAD,) * (width - len(tail)) + tuple(tail)


def start_state(prompt: list[int], marker: tuple[int, ...], params: SamplingParams,
                assistant_start: tuple[int, ...] = (), think_open: int | None = None,
                end_ids: tuple[int, ...] = ()) -> StartState:
    k = len(marker)
    if params.think_budget is None:
        return StartState(SOLVING, solution_count=params.solution_spent or 0, recent=_window([], k))
    if params.solution_spent is not None:  # the request says its thought is closed
        return StartState(SOLVING, think_count=params.think_spent or 0, solution_count=params.solution_spent,
                          recent=_window([], k), prompt_think=params.think_spent or 0)
    if params.think_spent is not None:  # the request says how far its thought went
        spent = params.think_spent
        return StartState(THINKING, think_count=spent, recent=_window(prompt[len(prompt) - spent:] if spent else [], k),
                          prompt_think=spent)
    turn = open_turn(prompt, assistant_start, think_open, marker, end_ids)
    if not turn:
        return StartState(THINKING, recent=_window([], k))
    closed = _find(turn, marker)
    if closed >= 0:
        return StartState(SOLVING, think_count=closed, solution_count=len(turn) - closed - k, recent=_window([], k),
                          prompt_think=closed, forced_end=int(closed + k > params.think_budget))
    p = next((p for p in range(k - 1, 0, -1) if tuple(turn[-p:]) == marker[:p]), 0)
    if p and len(turn) - p >= params.think_budget:
        return StartState(FORCING, think_count=len(turn) - p, force_pos=p, forced_end=1, recent=_window(turn[:-p], k),
                          prompt_think=len(turn) - p, prompt_marker=p)
    return StartState(THINKING, think_count=len(turn), recent=_window(turn, k), prompt_think=len(turn))
