"""Tensor containers for `sample_with_budget`: per-row sampling parameters and budget state.

Every field is a device tensor with one row per sequence in the batch, so one kernel launch
advances the whole batch's Elastic Reasoning budget machine (docs/architecture.md, "The budget contract"):

    THINKING -> FORCING -> SOLVING -> DONE

The end-of-thinking marker E of each row is stored right-aligned in a `[num_seqs, max_marker]`
tensor: the last `marker_len[i]` entries of row i are E, earlier entries are padding. The
same alignment is used for `recent`, the last sampled thinking tokens, so "the thinking text
now ends with E" is one elementwise compare of two rows.
"""
from __future__ import annotations

from dataclasses import dataclass, fields

import torch

# Phases of the budget machine (int32 codes shared by every backend).
THINKING = 0
FORCING = 1
SOLVING = 2
DONE = 3

# finish codes written to BudgetState.finish
FINISH_NONE = 0
FINISH_STOP = 1  # EOS or a stop id sampled while solving
FINISH_LENGTH = 2  # solution budget, max_tokens or the context window reached
FINISH_NONFINITE = 3  # the row's logits held NaN or +inf, or no finite value: nothing was sampled

PAD_TOKEN = -1  # emitted by rows that are already DONE
# Padding of the right-aligned rows (never a token id, and the two differ: a recent window that is all
# padding never matches a marker's padding, so an empty window never closes a thought).
MARKER_PAD = -2  # marker columns before E
RECENT_PAD = -1  # recent-window columns before the first thinking token
STOP_PAD = -1  # stop-id columns past a row's stop ids
NO_LIMIT = 2**31 - 1  # int32 stand-in for "no budget"
CONF_K = 20  # the token confidence's k: DeepConf's top-20 logprobs
MAX_MARKER_TOKENS = 64  # longest end-of-thinking marker, in tokens (the Triton sampler holds it in registers)


class _Rows:
    """Field-wise helpers of a dataclass of [num_seqs, ...] tensors, written once for both below."""

    @classmethod
    def take(cls, tensors):
        """The fields' tensors from a mapping that holds them by name (and maybe more)."""
        return cls(**{f.name: tensors[f.name] for f in fields(cls)})

    def map(self, fn):
        """fn applied to every field's tensor (a device move, a selection of rows)."""
        return type(self)(**{f.name: fn(getattr(self, f.name)) for f in fields(self)})

    def to(self, device: torch.device):
        return self.map(lambda t: t.to(device))


@dataclass
class SamplerParams(_Rows):
    """Per-row sampling settings; read-only for the kernel."""

    temperature: torch.Tensor  # float32 [num_seqs]; 0 = greedy
    top_k: torch.Tensor  # int32 [num_seqs]; 0 = off
    top_p: torch.Tensor  # float32 [num_seqs]; 1 = off
    min_p: torch.Tensor  # float32 [num_seqs]; 0 = off
    seed: torch.Tensor  # int64 [num_seqs]; RNG key, with the step counter `generated`
    think_budget: torch.Tensor  # int32 [num_seqs]; t (unused by rows that start in SOLVING)
    solution_budget: torch.Tensor  # int32 [num_seqs]; s, NO_LIMIT if none
    max_new_tokens: torch.Tensor  # int32 [num_seqs]; cap on all generated tokens
    min_think: torch.Tensor  # int32 [num_seqs]; m, 0 = off
    min_tokens: torch.Tensor  # int32 [num_seqs]; no stop id while fewer tokens were generated, 0 = off
    marker: torch.Tensor  # int32 [num_seqs, max_marker]; E right-aligned
    marker_len: torch.Tensor  # int32 [num_seqs]; k >= 1
    stop_ids: torch.Tensor  # int32 [num_seqs, max_stop]; EOS + stop ids, STOP_PAD padded




@dataclass
class BudgetState(_Rows):
    """Per-row budget machine state; the kernel updates every field in place."""

    phase: torch.Tensor  # int32 [num_seqs]; THINKING / FORCING / SOLVING / DONE
    think_count: torch.Tensor  # int32 [num_seqs]; thinking tokens so far
    solution_count: torch.Tensor  # int32 [num_seqs]; solution tokens so far (EOS counts)
    generated: torch.Tensor  # int32 [num_seqs]; tokens emitted so far; also the RNG step
    force_pos: torch.Tensor  # int32 [num_seqs]; next marker index to force while FORCING
    recent: torch.Tensor  # int32 [num_seqs, max_marker]; last thinking tokens, right-aligned
    forced_end: torch.Tensor  # int32 [num_seqs]; 1 once the marker was forced
    forced: torch.Tensor  # int32 [num_seqs]; 1 if this step's token was forced
    finish: torch.Tensor  # int32 [num_seqs]; FINISH_* code once DONE
    # float32 [num_seqs]; written each step like `forced`: the step's token confidence (DeepConf): minus the
    # mean log-probability of the CONF_K (20) most likely tokens under the raw distribution (log_softmax of the
    # logits as given: before min_think suppression, temperature and filters); 0 for DONE rows.
    confidence: torch.Tensor




def sampling_batch(
    n: int,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    min_p: float = 0.0,
    seeds=None,
    generated: int = 0,
    device: torch.device | str = "cpu",
) -> tuple[SamplerParams, BudgetState]:
    """n rows in SOLVING with no budgets and no stop ids: plain sampling (tests, benchmarks)."""
    i32 = torch.int32
    params = SamplerParams(
        temperature=torch.full((n,), float(temperature)),
        top_k=torch.full((n,), top_k, dtype=i32),
        top_p=torch.full((n,), float(top_p)),
        min_p=torch.full((n,), float(min_p)),
        seed=torch.arange(n, dtype=torch.long) if seeds is None else torch.as_tensor(list(seeds), dtype=torch.long),
        think_budget=torch.full((n,), NO_LIMIT, dtype=i32),
        solution_budget=torch.full((n,), NO_LIMIT, dtype=i32),
        max_new_tokens=torch.full((n,), NO_LIMIT, dtype=i32),
        min_think=torch.zeros(n, dtype=i32),
        min_tokens=torch.zeros(n, dtype=i32),
        marker=torch.zeros(n, 1, dtype=i32),
        marker_len=torch.ones(n, dtype=i32),
        stop_ids=torch.full((n, 1), STOP_PAD, dtype=i32),
    )
    state = BudgetState(
        phase=torch.full((n,), SOLVING, dtype=i32),
        think_count=torch.zeros(n, dtype=i32),
        solution_count=torch.zeros(n, dtype=i32),
        generated=torch.full((n,), generated, dtype=i32),
        force_pos=torch.zeros(n, dtype=i32),
        recent=torch.full((n, 1), RECENT_PAD, dtype=i32),
        forced_end=torch.zeros(n, dtype=i32),
        forced=torch.zeros(n, dtype=i32),
        finish=torch.zeros(n, dtype=i32),
        confidence=torch.zeros(n),
    )
    return params.to(device), state.to(device)
