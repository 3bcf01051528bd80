"""What generation returns: one RequestOutput per prompt, holding its n CompletionOutputs."""
from __future__ import annotations

from dataclasses import asdict, dataclass

from .utils.answers import Vote, vote_on_texts

VOTE_SCORES = {"lowest_group": "lowest_group_confidence", "tail": "tail_confidence"}  # DeepConf's trace scores


@dataclass
class CompletionOutput:
    index: int  # which of the request's n samples
    text: str  # the whole completion (special tokens dropped)
    thinking_text: str  # before the end-of-thinking marker
    solution_text: str  # after the marker
    token_ids: list[int]  # thinking tokens + marker + solution tokens
    logprobs: list[float]  # of each emitted token, forced ones included (honest, not distorted)
    forced_mask: list[int]  # 1 where the engine forced the token instead of sampling it
    think_tokens: int  # the rollout's: a resubmitted one's prompt counts what it held (SamplingParams.think_spent)
    solution_tokens: int  # the same for the solution
    forced_end: bool  # the marker was forced (budget spent, or the model tried to stop)
    finish_reason: str  # "stop" (EOS / stop id) or "length" (a budget or cap was reached)
    # With SamplingParams.logprobs = k: per token, the k most likely [(token id, raw logprob)].
    top_logprobs: list[list[tuple[int, float]]] | None = None
    # The weights each token came from: (first token index, weight version) per stretch (one stretch unless
    # the weights were updated while the request ran).
    weight_versions: list[tuple[int, str]] | None = None
    # Confidence (DeepConf, docs/confidence.md): each token's (minus the mean raw logprob of its 20 most likely
    # tokens), the lowest mean over a window of SamplingParams.confidence_window tokens (the whole trace's mean
    # when shorter) and the mean of the last window. None where nothing was generated.
    confidences: list[float] | None = None
    lowest_group_confidence: float | None = None
    tail_confidence: float | None = None
    # An early exit (SamplingParams.early_stop): "low_confidence" (DeepConf stopped the trace there, unanswered),
    # "low_confidence_answer" (its thinking was ended there by the forced marker), "consensus" (the request's
    # vote was settled; stopped unfinished) or "deer" (a probe answer was confident: thinking ended there); and
    # the output index where it happened. None: it ran its course.
    early_exit: str | None = None
    exit_index: int | None = None
    probes: int = 0  # DEER probes forked from this trace
    # DEER: each finished probe's (output index it forked at, its answer's confidence; None: the box never closed).
    probe_confidences: list[tuple[int, float | None]] | None = None


@dataclass
class RequestOutput:
    request_id: int
    prompt: str | None
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]
    # With SamplingParams.prompt_logprobs: each prompt token's logprob (None for the first), and the
    # alternatives per token when prompt_logprobs > 0.
    prompt_logprobs: list[float | None] | None = None
    prompt_top_logprobs: list[list[tuple[int, float]]] | None = None
    cached_tokens: int = 0  # prompt tokens the prefix cache held (computed once for the n samples)
    # Every token generated for the request: its completions', the ones an early exit cut back, DEER's probes'.
    tokens_spent: int = 0
    deepconf_threshold: float | None = None  # DeepConf online: the threshold (given, or set by the warm-up)

    def to_dict(self) -> dict:
        return asdict(self)

    def vote(self, by: str = "majority", keep: float = 1.0) -> Vote:
        """Majority vote (self-consistency) over the `\\boxed{}` answers of the n completions'
        solutions; equivalent answers ("0.5", "\\frac{1}{2}") count as one. `by` "lowest_group" or "tail":
        DeepConf's vote, weighted by that confidence over the top `keep` share of the completions by it."""
        texts = [c.solution_text for c in self.outputs]
        if by == "majority":
            return vote_on_texts(texts)
        if by not in VOTE_SCORES:
            raise ValueError(f"vote by one of majority, {', '.join(VOTE_SCORES)}; got {by!r}")
        return vote_on_texts(texts, [getattr(c, VOTE_SCORES[by]) for c in self.outputs], keep)


@dataclass(frozen=True)
class GenerationStats:
    """What one generate call cost; the CLI prints it as its summary line."""

    requests: int
    completions: int
    prompt_tokens: int
    output_tokens: int
    think_tokens: int
    solution_tokens: int
    forced_tokens: int
    forced_ends: int
    preemptions: int
    seconds: float
    engine: str = ""  # what ran it: dtype, device and kernels ("float32 on cpu, cpu kernels")

    def summary(self) -> str:
        rate = self.output_tokens / self.seconds if self.seconds > 0 else 0.0
        return (
            f"{self.requests} requests, {self.completions} completions: {self.prompt_tokens} prompt + "
            f"{self.output_tokens} output tokens ({self.think_tokens} thinking, {self.forced_tokens} forced, "
            f"{self.solution_tokens} solution; {self.forced_ends} forced ends) in {self.seconds:.2f} s, "
            f"{rate:.1f} output tokens/s"
            + (f", {self.preemptions} preemptions" if self.preemptions else "")
            + (f" ({self.engine})" if self.engine else "")
        )
