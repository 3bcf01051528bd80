"""Compact GRPO trainer with budget-constrained rollouts (installed as elastic_decode.train).

    from elastic_decode.train import GRPOConfig, GRPOTrainer
    GRPOTrainer(GRPOConfig(task="arithmetic:1", steps=30)).train()

Rollouts go through the engine's public API (Elastic Reasoning: think up to t*, marker forced,
solve up to s*, in one pass); the loss lives in `loss.py` as pure functions.
"""
from .config import GRPOConfig
from .loss import group_advantages, grpo_loss, token_entropy, token_logprobs
from .rewards import answers_match, extract_boxed
from .tasks import make_task


def __getattr__(name: str):
    # The trainer imports transformers; load it only when asked for.
    if name == "GRPOTrainer":
        from .trainer import GRPOTrainer

        return GRPOTrainer
    raise AttributeError(name)


__all__ = [
    "GRPOConfig",
    "GRPOTrainer",
    "group_advantages",
    "grpo_loss",
    "token_logprobs",
    "token_entropy",
    "answers_match",
    "extract_boxed",
    "make_task",
]
