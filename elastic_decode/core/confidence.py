"""Confidence of a trace, and DeepConf's online stop ("Deep Think with Confidence", arXiv 2508.15260).

The sampler writes every token's confidence C_i = -(1/k) sum_j log P_i(j) over the k = 20 most likely tokens of
the raw distribution (kernels.BudgetState.confidence); it comes back with each chunk's logprobs. From it:

- group confidence: the mean of C over a sliding window of `window` tokens (DeepConf's 2048);
- a trace's lowest group confidence (its weakest stretch; the whole trace's mean when it is shorter than one
  window) and tail confidence (the mean of its last `window` tokens): what votes are weighted and filtered by;
- the online stop: once a trace's threshold is known (from warm-up traces, or given), the trace ends at the
  first token whose full window's mean falls below it.

The windows are kept on the host, per sequence, as a running sum: the values arrive with the tokens anyway, and
a decision needs only the tokens of the chunk that just ran. The stop is exact per token: a chunk of several
steps that passes the stop point is cut back to it (`Scheduler.rewind`).
"""
from __future__ import annotations

import math

# Early-exit reasons a completion records (CompletionOutput.early_exit).
LOW_CONFIDENCE = "low_confidence"  # DeepConf: the trace stopped where its group confidence fell below the threshold
LOW_CONFIDENCE_ANSWER = "low_confidence_answer"  # the same point, but thinking was ended by the forced marker
CONSENSUS = "consensus"  # the request's weighted vote was settled: the trace was stopped unfinished
DEER = "deer"  # a probe answer at a transition point was confident: thinking was ended there

# A row with fewer than 20 finite logits has an infinite confidence (the model rules out all but a few tokens);
# windows count it as this much, so their running sums stay finite (exact in float64 beside values ~10).
CAP = 1e6


def _capped(values: list[float]) -> list[float]:
    return [v if v < CAP else CAP for v in values]


def window_means(values: list[float], window: int) -> list[float]:
    """The mean of every full window of `window` consecutive values (none when fewer values)."""
    if len(values) < window:
        return []
    values = _capped(values)
    total = math.fsum(values[:window])
    means = [total / window]
    for i in range(window, len(values)):
        total += values[i] - values[i - window]
        means.append(total / window)
    return means


def lowest_group_confidence(values: list[float], window: int) -> float | None:
    """A trace's weakest stretch: the lowest window mean, or the mean of all when shorter than a window."""
    if not values:
        return None
    means = window_means(values, window)
    return min(means) if means else math.fsum(_capped(values)) / len(values)


def tail_confidence(values: list[float], window: int) -> float | None:
    """The mean confidence of a trace's last `window` tokens."""
    if not values:
        return None
    tail = _capped(values[-window:])
    return math.fsum(tail) / len(tail)


def warmup_threshold(scores: list[float], keep: float) -> float:
    """DeepConf's threshold from warm-up traces' lowest group confidences: the (1 - keep) quantile (linear
    interpolation, numpy's default), so about `keep` of such traces would pass it (keep 0.1: DeepConf-low,
    0.9: DeepConf-high)."""
    ordered = sorted(scores)
    pos = (1.0 - keep) * (len(ordered) - 1)
    lo = math.floor(pos)
    hi = min(lo + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (pos - lo)


def first_low_window(values: list[float], start: int, window: int, threshold: float, running: float) -> tuple[int | None, float]:
    """Scan the values from index `start` on (the new ones; `running` is the sum of the `window` values before
    `start`, or of all of them when fewer): the first index whose full window's mean is below `threshold`, or None;
    and the running sum at the end of the scan (up to that index when found)."""
    for i in range(start, len(values)):
        running += min(values[i], CAP)
        if i >= window:
            running -= min(values[i - window], CAP)
        if i + 1 >= window and running / window < threshold:
            return i, running
    return None, running
