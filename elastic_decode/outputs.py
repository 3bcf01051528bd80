"""What generation returns: one RequestOutput per prompt, holding its n CompletionOutputs."""
from __future__ import annotations

from dataclasses import asdict, dataclass

from .utils.answers import Vote, vote_on_texts


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

    def to_dict(self) -> dict:
        return asdict(self)

    def vote(self) -> Vote:
        """Majority vote (self-consistency) over the `\\boxed{}` answers of the n completions'
        solutions; equivalent answers ("0.5", "\\frac{1}{2}") count as one."""
        return vote_on_texts([c.solution_text for c in self.outputs])


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
