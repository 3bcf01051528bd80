"""One completion being generated: its tokens, its KV blocks and its budget-machine state.

Only the scheduler changes a Sequence (docs/architecture.md, "Who owns what"); the runner reads a batch of them and
returns a StepResult that the scheduler applies.
"""
from __future__ import annotations

import enum
from dataclasses import dataclass, field

from elastic_decode.kernels import FINISH_NONE, FINISH_STOP, FORCING, RECENT_PAD, SOLVING, THINKING

from . import confidence

from ..sampling_params import SamplingParams


class SequenceStatus(enum.Enum):
    WAITING = enum.auto()
    RUNNING = enum.auto()
    FINISHED = enum.auto()


@dataclass(eq=False)
class Sequence:
    seq_id: int
    request_id: int
    sample_index: int  # which of the request's n completions
    token_ids: list[int]  # prompt followed by the output so far
    num_prompt_tokens: int
    params: SamplingParams
    seed: int
    marker: tuple[int, ...]  # end-of-thinking marker E
    stop_ids: tuple[int, ...]  # EOS (unless ignore_eos) + stop_token_ids
    max_new_tokens: int

    status: SequenceStatus = SequenceStatus.WAITING
    block_table: list[int] = field(default_factory=list)
    num_cached_tokens: int = 0  # leading tokens whose K/V a prefix-cache hit provides
    # Bumped whenever the scheduler frees the blocks (preempted, recomputed, aborted, finished): a
    # resident device row written under an older epoch is stale (worker/device_batch.py).
    epoch: int = 0

    # budget machine state: one row of kernels.BudgetState, kept here between steps
    phase: int = THINKING
    think_count: int = 0
    solution_count: int = 0
    force_pos: int = 0
    recent: list[int] = field(default_factory=list)  # last len(marker) thinking tokens
    forced_end: int = 0
    finish: int = FINISH_NONE
    # Where the machine started (core/resume.py): a resubmitted rollout's prompt holds some of its thinking
    # (counted in think_count) and maybe the start of a forced marker.
    start_phase: int = THINKING
    prompt_think: int = 0
    prompt_marker: int = 0
    prompt_solution: int = 0

    logprobs: list[float] = field(default_factory=list)
    forced_mask: list[int] = field(default_factory=list)
    top_logprobs: list[list[tuple[int, float]]] = field(default_factory=list)  # with params.logprobs > 0
    # Prompt logprobs (with params.prompt_logprobs): one per prompt token, None for the first; and their
    # alternatives [(token id, logprob)] per token.
    prompt_logprobs: list[float | None] | None = None
    prompt_top_logprobs: list[list[tuple[int, float]]] | None = None
    cached_tokens: int | None = None  # prompt tokens its first prefill found in the prefix cache
    # The weights each output token came from: (first output index, weight version) for every stretch.
    weight_versions: list[tuple[int, str]] = field(default_factory=list)

    # Confidence and early exit (core/confidence.py): each output token's confidence; DeepConf's threshold once
    # known (None: no online stop) and the running sum of the last window; a thinking limit below the budget
    # (the forced marker comes when the count reaches it); why and at which output index the trace exited early.
    confidences: list[float] = field(default_factory=list)
    conf_threshold: float | None = None
    conf_running: float = 0.0
    think_limit: int | None = None
    early_exit: str | None = None
    exit_index: int | None = None
    # DEER: a probe is a sequence of its own, forked from `probe_of` at output index `probe_at` (its blocks up to
    # there shared); it is never part of the request's outputs. A trace counts its probes and its transitions.
    probe_of: Sequence | None = None
    probe_at: int = 0
    probes: int = 0
    deer_scanned: int = 0  # output tokens already looked at for transitions
    pending_at: int | None = None  # a probe forked here is still deciding: later tokens may be cut back
    discarded: int = 0  # tokens sampled and then cut back by an early exit (they were spent all the same)
    hashed_tokens: int = 0  # leading tokens whose full blocks the latest prefill made findable by the prefix cache
    probe_log: list[tuple[int, float | None]] = field(default_factory=list)  # DEER: (output index, answer confidence)

    def __post_init__(self) -> None:
        if self.params.think_budget is None:
            self.phase = self.start_phase = SOLVING
        if not self.recent:
            self.recent = [RECENT_PAD] * len(self.marker)

    def start_from(self, state) -> None:
        """Start the budget machine where a resumed rollout stands (a core.resume.StartState)."""
        self.phase = self.start_phase = state.phase
        self.think_count, self.solution_count = state.think_count, state.solution_count
        self.force_pos, self.forced_end = state.force_pos, state.forced_end
        self.recent = list(state.recent)
        self.prompt_think, self.prompt_marker = state.prompt_think, state.prompt_marker
        self.prompt_solution = state.solution_count

    @property
    def group_confidence(self) -> tuple[float | None, float | None]:
        """(lowest group, tail) confidence of the output so far (core/confidence.py; None, None before any)."""
        window = self.params.confidence_window
        return (confidence.lowest_group_confidence(self.confidences, window),
                confidence.tail_confidence(self.confidences, window))

    @property
    def settled(self) -> int:
        """Output tokens no early exit can cut back any more (what a stream may send)."""
        if self.pending_at is None or self.phase != THINKING:  # past thinking, no probe can cut it back
            return self.num_generated
        return min(self.pending_at, self.num_generated)

    def __len__(self) -> int:
        return len(self.token_ids)

    @property
    def output_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt_tokens :]

    @property
    def num_generated(self) -> int:
        return len(self.token_ids) - self.num_prompt_tokens

    # -- the budget contract's readings (docs/architecture.md, "The budget contract"), said once -------------------------

    @property
    def think_tokens(self) -> int:
        """Thinking tokens so far; 0 for a request without a thinking phase."""
        return self.think_count if self.params.think_budget is not None else 0

    @property
    def in_thought(self) -> bool:
        """Still before the end of thinking: thinking, or the marker being forced."""
        return self.params.think_budget is not None and self.phase in (THINKING, FORCING)

    @property
    def weight_version(self) -> str | None:
        """The weights the latest token came from (None before the first)."""
        return self.weight_versions[-1][1] if self.weight_versions else None

    @property
    def finish_reason(self) -> str:
        """What ended the sequence, as the APIs name it (read once it is FINISHED): "stop" for EOS or a stop
        id, "length" for a budget, max_tokens or the window."""
        return "stop" if self.finish == FINISH_STOP else "length"

    def output_parts(self) -> tuple[list[int], list[int], list[int]]:
        """(thinking, marker, solution) tokens of the output: thinking first, then the k marker tokens, then
        the solution (everything is solution without a thinking phase, or when the prompt closed the thought;
        a resumed rollout's output holds only its new thinking, and the rest of a marker the prompt began)."""
        out = self.output_ids
        k, m = self.output_thought
        return out[:k], out[k : k + m], out[k + m :]

    @property
    def output_thought(self) -> tuple[int, int]:
        """(thinking tokens, marker tokens) the output starts with: (0, 0) without a thinking phase or when the
        prompt closed the thought; the marker's count is what it will hold once the thought is closed."""
        if self.params.think_budget is None or self.start_phase == SOLVING:
            return 0, 0
        # Negative where the prompt ended with the start of a marker the model then finished: those tokens
        # were counted as the prompt's thinking until the marker completed.
        thought = self.think_count - self.prompt_think
        return max(thought, 0), len(self.marker) - self.prompt_marker + min(thought, 0)
