"""What passes between the scheduler and the worker, as plain data: the batch a step runs, and the host
values it gives back (vLLM v1 keeps the same split in sched/output.py). Only the scheduler turns a
StepResult into changes of its Sequences."""
from __future__ import annotations

from dataclasses import dataclass

from .sequence import Sequence


@dataclass(frozen=True)
class ScheduledBatch:
    seqs: tuple[Sequence, ...]
    is_prefill: bool
    num_steps: int = 1  # decode steps in this chunk (prefill: 1)


@dataclass(frozen=True)
class StepResult:
    """What the runner returns for a batch: one entry per sequence, in batch order.

    tokens / logprobs / forced hold each sequence's emitted tokens of the whole chunk (padding
    dropped); the state fields are the budget machine's state after the chunk.
    """

    tokens: list[list[int]]
    logprobs: list[list[float]]
    forced: list[list[int]]
    phase: list[int]
    think_count: list[int]
    solution_count: list[int]
    force_pos: list[int]
    recent: list[list[int]]  # right-aligned, at least as wide as each sequence's marker
    forced_end: list[int]
    finish: list[int]
    # Per sequence, per emitted token: the top alternatives [(token id, raw logprob)], when the
    # batch asked for any (SamplingParams.logprobs); else None.
    top_logprobs: list[list[list[tuple[int, float]]]] | None = None
    # A prefill's prompt logprobs, for the sequences that asked: {sequence index: (logprob per prompt token,
    # None for the first; their alternatives per token, or None)}.
    prompt_logprobs: dict[int, tuple[list, list | None]] | None = None
    # Per sequence, per emitted token: its token confidence (kernels.BudgetState.confidence); None from a
    # runner that does not compute it.
    confidence: list[list[float]] | None = None
