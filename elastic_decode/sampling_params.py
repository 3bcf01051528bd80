"""Per-request sampling and budget settings (the vLLM `SamplingParams` shape, plus budgets)."""
from __future__ import annotations

from dataclasses import dataclass, field

from .errors import InvalidRequestError

# What the engine can represent: budgets, counts and token ids are int32 on the device (and
# 2**31 - 1 means "no limit" there), seeds are int64 Philox keys.
INT32_MAX = 2**31 - 1
SEED_MAX = 2**63 - 1
MAX_N = 4096  # completions of one prompt; more is almost surely a typo (each is a sequence)
MAX_TOP_LOGPROBS = 20  # alternatives per token (OpenAI's bound for top_logprobs)
EARLY_STOPS = ("deepconf", "deer")
DEER_ANSWER_PREFIX = "**Final Answer**\n\\boxed{"  # DEER's answer-inducing text, after the marker
MAX_TRANSITIONS = 16  # DEER transition strings per request
MAX_TRANSITION_CHARS = 32
DEEPCONF_ACTIONS = ("stop", "answer")


def _check_int(name: str, value, minimum: int, allow_none: bool, maximum: int = INT32_MAX) -> None:
    allowed = f"an integer in [{minimum}, {maximum}]"
    if value is None:
        if allow_none:
            return
        raise InvalidRequestError(f"{name} must be {allowed}, got None", param=name)
    if isinstance(value, bool) or not isinstance(value, int):
        raise InvalidRequestError(f"{name} must be {allowed}, got {value!r}", param=name)
    if not minimum <= value <= maximum:
        raise InvalidRequestError(f"{name} must be {allowed}, got {value}", param=name)


def _check_ids(name: str, value) -> tuple[int, ...]:
    """A sequence of token ids (each an int32 >= 0) as a tuple."""
    if isinstance(value, (str, bytes)) or not hasattr(value, "__iter__"):
        raise InvalidRequestError(f"{name} must be a sequence of token ids, got {value!r}", param=name)
    ids = tuple(value)
    for tok in ids:
        try:
            _check_int(f"{name}[i]", tok, 0, allow_none=False)
        except InvalidRequestError as e:
            raise InvalidRequestError(str(e), param=name) from None
    return ids


def _check_float(name: str, value, lo: float, hi: float, lo_open: bool, hi_open: bool) -> None:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool)
    if ok:
        ok = (value > lo if lo_open else value >= lo) and (value < hi if hi_open else value <= hi)
    if not ok:
        interval = f"{'(' if lo_open else '['}{lo}, {hi}{')' if hi_open else ']'}"
        raise InvalidRequestError(f"{name} must be a number in {interval}, got {value!r}", param=name)


@dataclass(frozen=True)
class SamplingParams:
    """How one prompt is sampled and how its thinking is budgeted (docs/architecture.md, "The budget contract")."""

    # Number of completions for the prompt; they share the prompt's KV blocks.
    n: int = 1
    # Softmax temperature; 0 means greedy (argmax).
    temperature: float = 1.0
    # Keep the top_p most likely probability mass; 1 disables.
    top_p: float = 1.0
    # Keep the k most likely tokens; 0 (or -1, as in vLLM) disables.
    top_k: int = 0
    # Drop tokens below min_p times the most likely token's probability; 0 disables.
    min_p: float = 0.0
    # RNG key: the same seed gives the same tokens whatever else is in the batch. None = random.
    seed: int | None = None
    # Cap on all generated tokens (thinking + marker + solution). None = the context window.
    max_tokens: int | None = None
    # Keep going past EOS (stop_token_ids still stop).
    ignore_eos: bool = False
    # Extra token ids that end the solution like EOS.
    stop_token_ids: tuple[int, ...] = field(default_factory=tuple)
    # No EOS or stop id before this many tokens of this request (vLLM's min_tokens; SkyRL sends 1).
    min_tokens: int = 0
    # t: thinking tokens allowed before the end-of-thinking marker is forced. None = no
    # thinking phase (plain decoding).
    think_budget: int | None = None
    # s: solution tokens allowed after the marker (EOS counts). None = until EOS / max_tokens.
    solution_budget: int | None = None
    # End-of-thinking marker override: a string (tokenized without special tokens) or token
    # ids. None = the model's `</think>` token, else the tokens of "\n</think>\n\n".
    end_think: str | tuple[int, ...] | None = None
    # m: the model may not close its thinking before m thinking tokens (s1-style minimum).
    min_think: int = 0
    # Also return, for every emitted token, the `logprobs` most likely tokens with their logprobs
    # under the model's raw distribution (log_softmax of the logits, before temperature and
    # filters: vLLM's default "raw" mode). 0 = none (each token's own logprob is always returned).
    logprobs: int = 0
    # Also return the prompt's logprobs (each prompt token under the model's raw distribution given the
    # tokens before it; None for the first) and its `prompt_logprobs` most likely alternatives: what a
    # trainer scores sequences with (vLLM's prompt_logprobs, SGLang's input_token_logprobs). None = none.
    # The prompt is computed whole then (no cached prefix).
    prompt_logprobs: int | None = None
    # A resubmitted rollout's budget already spent (partial rollouts, docs/serving.md): thinking tokens the
    # prompt ends with (its thought still open) or, with solution_spent, holds before its marker; solution
    # tokens already written after the marker. None: read off the prompt's last assistant turn
    # (core/resume.py); 0 asks for a fresh budget.
    think_spent: int | None = None
    solution_spent: int | None = None
    # -- early exit on confidence (docs/confidence.md) -------------------------------------------------------
    # Return each token's confidence (DeepConf: minus the mean raw logprob of its 20 most likely tokens) and the
    # completion's lowest group and tail confidence. Computed in the sampling step (a kernel variant that costs
    # registers, so only for batches that ask); early_stop implies it.
    confidence: bool = False
    # None, "deepconf" (DeepConf online: traces whose group confidence falls below a threshold stop) or "deer"
    # (DEER: at thinking transitions a forked probe answers; thinking ends where that answer is confident).
    # Every completion reports its token confidences and its lowest group and tail confidence either way.
    early_stop: str | None = None
    # Tokens in a group confidence: the sliding window of DeepConf (2048 there; shorter traces want less).
    confidence_window: int = 2048
    # DeepConf: the first `deepconf_warmup` of the n traces run whole; the threshold is the (1 - deepconf_keep)
    # quantile of their lowest group confidences (keep 0.1: DeepConf-low, 0.9: DeepConf-high). With n at most
    # deepconf_warmup every trace is a warm-up trace and nothing stops. deepconf_threshold gives the threshold
    # outright (no warm-up: every trace may stop).
    deepconf_warmup: int = 16
    deepconf_keep: float = 0.1
    deepconf_threshold: float | None = None
    # What a trace below the threshold does: "stop" (DeepConf: it ends there, unanswered, finish_reason "stop")
    # or "answer" (its thinking is ended by the forced marker, so it still answers within solution_budget).
    deepconf_action: str = "stop"
    # Stop the request's unfinished traces once the confidence-weighted vote of its finished ones gives one
    # answer this share of the weight (DeepConf's consensus, 0.95 there). None: every trace runs.
    deepconf_consensus: float | None = None
    # DEER: a probe's answer (greedy, at most deer_probe_tokens) whose mean token probability is at least
    # deer_threshold ends thinking at that transition; at most deer_max_probes probes per trace. Transitions are
    # token strings (a token whose text holds one is a transition); None: the model family's defaults.
    deer_threshold: float = 0.95
    deer_transitions: tuple[str, ...] | None = None
    # What a probe writes after the end-of-thinking marker before its answer: it must open the answer's box (more
    # "{" than "}"). None: DEER's "**Final Answer**\n\\boxed{". A model trained on another answer format
    # answers surer in its own ("The answer is \\boxed{").
    deer_answer_prefix: str | None = None
    deer_max_probes: int = 10
    deer_probe_tokens: int = 20

    def __post_init__(self) -> None:
        _check_int("n", self.n, 1, allow_none=False, maximum=MAX_N)
        _check_float("temperature", self.temperature, 0.0, float("inf"), lo_open=False, hi_open=True)
        _check_float("top_p", self.top_p, 0.0, 1.0, lo_open=True, hi_open=False)
        if isinstance(self.top_k, bool) or not isinstance(self.top_k, int) or not -1 <= self.top_k <= INT32_MAX:
            raise InvalidRequestError(
                f"top_k must be an integer in [0, {INT32_MAX}] (or -1 to disable), got {self.top_k!r}", param="top_k")
        _check_float("min_p", self.min_p, 0.0, 1.0, lo_open=False, hi_open=False)
        if self.seed is not None:
            _check_int("seed", self.seed, 0, allow_none=False, maximum=SEED_MAX)
        if not isinstance(self.ignore_eos, bool):
            raise InvalidRequestError(f"ignore_eos must be True or False, got {self.ignore_eos!r}", param="ignore_eos")
        _check_int("max_tokens", self.max_tokens, 1, allow_none=True)
        _check_int("think_budget", self.think_budget, 0, allow_none=True)
        # With a thinking phase, s = 0 means "stop right after the marker"; without one it
        # would mean an empty completion, which is a mistake rather than a request.
        _check_int("solution_budget", self.solution_budget, 0 if self.think_budget is not None else 1, allow_none=True)
        _check_int("min_think", self.min_think, 0, allow_none=False)
        _check_int("min_tokens", self.min_tokens, 0, allow_none=False)
        if self.max_tokens is not None and self.min_tokens > self.max_tokens:
            raise InvalidRequestError(f"min_tokens ({self.min_tokens}) must not exceed max_tokens ({self.max_tokens})",
                                      param="min_tokens")
        _check_int("logprobs", self.logprobs, 0, allow_none=False, maximum=MAX_TOP_LOGPROBS)
        _check_int("prompt_logprobs", self.prompt_logprobs, 0, allow_none=True, maximum=MAX_TOP_LOGPROBS)
        _check_int("think_spent", self.think_spent, 0, allow_none=True)
        _check_int("solution_spent", self.solution_spent, 0, allow_none=True)
        if (self.think_spent is not None or self.solution_spent is not None) and self.think_budget is None \
                and self.solution_budget is None:
            raise InvalidRequestError("think_spent and solution_spent count against budgets: give think_budget or "
                                      "solution_budget", param="think_spent")
        if self.think_spent is not None and self.think_budget is None:
            raise InvalidRequestError("think_spent needs a think_budget", param="think_spent")
        if self.min_think and self.think_budget is None:
            raise InvalidRequestError("min_think needs a think_budget (it bounds the thinking phase)", param="min_think")
        if self.think_budget is not None and self.min_think > self.think_budget:
            raise InvalidRequestError(
                f"min_think ({self.min_think}) must not exceed think_budget ({self.think_budget})", param="min_think")
        object.__setattr__(self, "stop_token_ids", _check_ids("stop_token_ids", self.stop_token_ids))
        self._check_early_stop()
        if self.end_think is not None:
            if isinstance(self.end_think, str):
                if not self.end_think:
                    raise InvalidRequestError("end_think must not be empty", param="end_think")
            else:
                ids = _check_ids("end_think", self.end_think)
                if not ids:
                    raise InvalidRequestError("end_think must not be empty", param="end_think")
                object.__setattr__(self, "end_think", ids)

    def _check_early_stop(self) -> None:
        if not isinstance(self.confidence, bool):
            raise InvalidRequestError(f"confidence must be True or False, got {self.confidence!r}", param="confidence")
        if self.early_stop is not None and self.early_stop not in EARLY_STOPS:
            raise InvalidRequestError(f"early_stop must be one of {', '.join(EARLY_STOPS)} or None, got "
                                      f"{self.early_stop!r}", param="early_stop")
        _check_int("confidence_window", self.confidence_window, 1, allow_none=False)
        _check_int("deepconf_warmup", self.deepconf_warmup, 1, allow_none=False, maximum=MAX_N)
        _check_float("deepconf_keep", self.deepconf_keep, 0.0, 1.0, lo_open=True, hi_open=False)
        if self.deepconf_threshold is not None:
            _check_float("deepconf_threshold", self.deepconf_threshold, float("-inf"), float("inf"), lo_open=True,
                         hi_open=True)
        if self.deepconf_action not in DEEPCONF_ACTIONS:
            raise InvalidRequestError(f"deepconf_action must be one of {', '.join(DEEPCONF_ACTIONS)}, got "
                                      f"{self.deepconf_action!r}", param="deepconf_action")
        if self.deepconf_consensus is not None:
            _check_float("deepconf_consensus", self.deepconf_consensus, 0.0, 1.0, lo_open=True, hi_open=False)
        _check_float("deer_threshold", self.deer_threshold, 0.0, 1.0, lo_open=False, hi_open=False)
        _check_int("deer_max_probes", self.deer_max_probes, 0, allow_none=False, maximum=1000)
        _check_int("deer_probe_tokens", self.deer_probe_tokens, 1, allow_none=False, maximum=256)
        if self.deer_transitions is not None:
            bad = (isinstance(self.deer_transitions, str) or not hasattr(self.deer_transitions, "__iter__")
                   or not 1 <= len(tuple(self.deer_transitions)) <= MAX_TRANSITIONS
                   or not all(isinstance(t, str) and 0 < len(t) <= MAX_TRANSITION_CHARS for t in self.deer_transitions))
            if bad:
                raise InvalidRequestError(f"deer_transitions must be a list of 1 to {MAX_TRANSITIONS} strings of 1 to "
                                          f"{MAX_TRANSITION_CHARS} characters, got {self.deer_transitions!r}",
                                          param="deer_transitions")
            object.__setattr__(self, "deer_transitions", tuple(self.deer_transitions))
        if self.deer_answer_prefix is not None:
            prefix = self.deer_answer_prefix
            if not isinstance(prefix, str) or not 0 < len(prefix) <= 200 or prefix.count("{") <= prefix.count("}"):
                raise InvalidRequestError("deer_answer_prefix must be a string of 1 to 200 characters that opens the "
                                          f"answer's box (e.g. ends with \\boxed{{), got {prefix!r}",
                                          param="deer_answer_prefix")
        if self.early_stop is None:
            return
        if self.early_stop == "deer" and self.think_budget is None:
            raise InvalidRequestError("early_stop 'deer' ends thinking: it needs a think_budget", param="early_stop")
        if self.early_stop == "deepconf" and self.deepconf_action == "answer" and self.think_budget is None:
            raise InvalidRequestError("deepconf_action 'answer' ends thinking with the marker: it needs a think_budget",
                                      param="deepconf_action")

    @property
    def deer_prefix(self) -> str:
        """What a DEER probe writes after the marker: deer_answer_prefix, or DEER's own."""
        return self.deer_answer_prefix or DEER_ANSWER_PREFIX

    @property
    def wants_confidence(self) -> bool:
        """Token confidences are computed for this request (asked for, or needed by an early stop)."""
        return self.confidence or self.early_stop is not None
