"""A budgeted rollout backend for TRL's `GRPOTrainer` (its `rollout_func` hook).

    from elastic_decode import LLM
    from elastic_decode.integrations.trl import make_rollout_func
    llm = LLM(model_path)
    trainer = GRPOTrainer(model=model_path, ..., rollout_func=make_rollout_func(llm, think_budget=256,
                                                                                 solution_budget=128))

TRL calls `rollout_func(prompts, trainer)` with the prompts of one generation batch, each repeated
`num_generations` times in a row (its RepeatSampler), and expects one completion per entry:
`prompt_ids`, `completion_ids`, `logprobs`, and optionally `env_mask` (1 = sampled by the model,
0 = inserted from outside: TRL keeps those tokens out of the loss). The forced end-of-thinking
marker is exactly such an insertion, so `env_mask = 1 - forced_mask`. Every other returned field
reaches the reward functions as a keyword argument: here `think_tokens`, `solution_tokens`,
`forced_end` and `solution_text` (the text after the marker, where answers are graded).

Each group of repeated prompts is decoded as one request with n = num_generations, so the group
shares the prompt's KV. Before the first rollout of each optimizer step the trainer's current
weights are copied into the engine in place, so rollouts are on-policy.
"""
from __future__ import annotations

import importlib.metadata
import time
from collections.abc import Callable

from ..client import RolloutClient
from ..errors import ElasticDecodeError
from ..llm import LLM
from ..sampling_params import SamplingParams

# `rollout_func(prompts, trainer)` with `env_mask` and extra fields forwarded to reward functions:
# the shape of TRL 1.16 (the release tested; older 1.x releases were not checked).
TRL_MIN = (1, 16)
TRL_BELOW = (2, 0)


def check_trl() -> str:
    """The installed TRL version, or a one-line error saying how to get a suitable one."""
    hint = "pip install 'elastic_decode[trl]'"
    try:
        version = importlib.metadata.version("trl")
    except importlib.metadata.PackageNotFoundError:
        raise ElasticDecodeError(f"the TRL integration needs trl >= 1.16, < 2: {hint}") from None
    parts = tuple(int(p) for p in version.split(".")[:2] if p.isdigit())
    if not TRL_MIN <= parts < TRL_BELOW:
        raise ElasticDecodeError(f"the TRL integration needs trl >= 1.16, < 2 (found {version}): {hint}")
    return version


def make_rollout_func(
    llm: LLM | RolloutClient,
    *,
    think_budget: int | None,
    solution_budget: int | None,
    temperature: float = 1.0,
    top_p: float = 1.0,
    top_k: int = 0,
    min_p: float = 0.0,
    seed: int | None = None,
    sync_weights: bool = True,
) -> Callable:
    """A `rollout_func` for `trl.GRPOTrainer` that decodes with Elastic Reasoning budgets, on an
    in-process `LLM` or on a rollout server through a `RolloutClient` (TRL's server setup: trainer
    and engine in two processes).

    `seed` makes rollouts reproducible (each call gets its own derived seed); `sync_weights=False`
    leaves the engine's weights alone (for a frozen policy or a test). The returned function keeps
    `sync_seconds` (one entry per weight copy) for logging.
    """
    check_trl()
    # Checked here, once, rather than at the first rollout deep inside the training loop.
    SamplingParams(temperature=temperature, top_p=top_p, top_k=top_k, min_p=min_p,
                   think_budget=think_budget, solution_budget=solution_budget)
    synced_step: list[int | None] = [None]
    calls = [0]

    def rollout_func(prompts: list, trainer) -> dict[str, list]:
        if sync_weights and trainer.state.global_step != synced_step[0]:
            model = trainer.accelerator.unwrap_model(trainer.model)
            start = time.perf_counter()
            llm.load_weights(model.named_parameters())
            rollout_func.sync_seconds.append(time.perf_counter() - start)
            synced_step[0] = trainer.state.global_step
        group = trainer.num_generations if trainer.model.training else trainer.num_generations_eval
        unique, n = _groups(prompts, group)
        params = SamplingParams(
            n=n,
            temperature=temperature,
            top_p=top_p,
            top_k=top_k,
            min_p=min_p,
            think_budget=think_budget,
            solution_budget=solution_budget,
            seed=None if seed is None else (seed * 1_000_003 + calls[0]) % (2**31 - 1),
        )
        calls[0] += 1
        batch = llm.generate_tensors([_encode(llm, p) for p in unique], params)
        lengths = batch.completion_mask.sum(dim=1).tolist()
        return {
            "prompt_ids": batch.prompt_ids,
            "completion_ids": [row[:k] for row, k in zip(batch.completion_ids.tolist(), lengths)],
            "logprobs": [row[:k] for row, k in zip(batch.logprobs.tolist(), lengths)],
            "env_mask": [[1 - f for f in row[:k]] for row, k in zip(batch.forced_mask.tolist(), lengths)],
            "think_tokens": batch.think_tokens.tolist(),
            "solution_tokens": batch.solution_tokens.tolist(),
            "forced_end": batch.forced_end.tolist(),
            "solution_text": batch.solution_texts,
        }

    rollout_func.sync_seconds = []
    return rollout_func


def _groups(prompts: list, group: int) -> tuple[list, int]:
    """TRL repeats each prompt `group` times in a row: decode each run once with n = group.
    Anything else (a batch that does not come in whole runs) gets one completion per entry."""
    if group > 1 and len(prompts) % group == 0 and all(
        prompts[i] == prompts[i - i % group] for i in range(len(prompts))
    ):
        return prompts[::group], group
    return list(prompts), 1


def _encode(llm: LLM | RolloutClient, prompt) -> list[int]:
    if isinstance(prompt, list):  # conversational: the chat template is applied here, as TRL asks
        return llm.encode_chat(prompt)
    if isinstance(prompt, str):
        return llm.encode(prompt)
    raise ElasticDecodeError(f"a prompt must be text or a list of chat messages, got {type(prompt).__name__}")
