"""`GRPOConfig`: every knob of a GRPO run, validated where it is built.

Each field carries its help text in `metadata["help"]`; the CLI (`python -m elastic_decode.train`)
turns the fields into flags, so this file is also the flag reference.
"""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path

from .report import parse_targets
from .schedule import BudgetSchedule

MODES = ("grpo", "sft", "distill")
LOSS_AGGREGATIONS = ("token-mean", "seq-mean", "dr-grpo")
ADVANTAGE_SCALINGS = ("group", "batch", "none")
# TRL's vllm_importance_sampling_mode values (train/loss.py: importance_weights)
IMPORTANCE_SAMPLING_MODES = ("token_truncate", "token_mask", "sequence_truncate", "sequence_mask")


def _help(text: str, default):
    return field(default=default, metadata={"help": text})


@dataclass(frozen=True)
class GRPOConfig:
    """Every setting of a training run. Despite the name it also drives the SFT and
    distillation modes (`mode`), so one CLI and one config file format serve all three."""

    # -- what to train on ----------------------------------------------------------------
    mode: str = _help(
        "grpo (budget-constrained RL), sft (supervised fine-tuning on --sft-data traces) or distill "
        "(sample traces from --teacher on --task, keep the verified-correct ones, then SFT on them)",
        "grpo",
    )
    model: str | None = _help("HF checkpoint directory or .gguf file (default: the embedded SmolLM2-135M-Instruct)", None)
    task: str = _help(
        "synthetic task (arithmetic, arithmetic:D for D-digit operands, arithmetic:D:OPS with OPS from +-*, "
        "countdown, countdown:N for N numbers) "
        'or a JSONL file with {"prompt"|"messages", "answer"} rows',
        "arithmetic:1",
    )
    output_dir: str = _help("where metrics.jsonl, checkpoints and the plot are written", "runs/grpo")

    # -- SFT and distillation (mode sft / distill) ----------------------------------------
    sft_data: str | None = _help(
        'sft: JSONL traces, one {"prompt"|"messages", "thinking", "solution"} (the end-of-thinking marker '
        'is put between them) or {"prompt"|"messages", "completion"} object per line', None
    )
    epochs: int = _help("sft / distill: passes over the traces", 1)
    batch_size: int = _help("sft / distill: traces per optimizer step (split into micro-batches)", 16)
    teacher: str | None = _help("distill: the checkpoint that writes the traces (sampled with think/solution budget, "
                                "temperature, top_p and group_size samples per prompt)", None)
    distill_prompts: int = _help("distill: task prompts the teacher answers", 64)

    # -- rollouts (the Elastic Reasoning budget-constrained rollout) ----------------------
    steps: int = _help("rollout batches (each followed by num_iterations optimizer steps)", 20)
    prompts_per_step: int = _help("prompts per rollout batch", 4)
    group_size: int = _help("G: completions per prompt; they share the prompt's KV in the engine", 8)
    think_budget: int = _help("t*: thinking tokens before the end-of-thinking marker is forced", 64)
    solution_budget: int = _help("s*: solution tokens after the marker", 64)
    temperature: float = _help("rollout temperature (logprobs are taken under softmax(logits / T))", 1.0)
    top_p: float = _help("rollout nucleus mass; 1 keeps the full distribution (on-policy)", 1.0)

    # -- the objective ---------------------------------------------------------------------
    learning_rate: float = _help("AdamW learning rate", 1e-6)
    weight_decay: float = _help("AdamW weight decay", 0.0)
    num_iterations: int = _help(
        "optimizer steps per rollout batch; > 1 keeps the rollout policy's logprobs as the old policy", 1
    )
    epsilon_low: float = _help("clip the ratio below at 1 - epsilon_low", 0.2)
    epsilon_high: float = _help("clip the ratio above at 1 + epsilon_high (> epsilon_low: DAPO clip-higher)", 0.2)
    kl_coef: float = _help("weight of the k3 KL estimate against the frozen initial model; 0 loads no reference", 0.0)
    entropy_coef: float = _help("entropy bonus weight (subtracted from the loss)", 0.0)
    loss_aggregation: str = _help(
        "token-mean (DAPO: mean over all loss tokens), seq-mean (original GRPO: mean per completion, "
        "then over completions), dr-grpo (sum over tokens / (completions x max completion length))",
        "token-mean",
    )
    advantage_scaling: str = _help(
        "divide group-centred rewards by the group's std (group), the batch's std (batch) or not at all (none, Dr. GRPO)",
        "group",
    )
    mask_forced_tokens: bool = _help("keep tokens the engine forced (the end-of-thinking marker) out of the loss", True)
    mask_truncated: bool = _help("give no gradient to completions cut by the solution budget", False)
    format_reward_weight: float = _help(
        "reward = correct + this x formatted (a \\boxed{} answer after the marker)", 0.1
    )
    micro_batch_size: int = _help(
        "gradient accumulation: rows per forward/backward; gradients accumulate over the whole rollout batch", 8
    )
    max_grad_norm: float = _help("clip the gradient norm; 0 disables", 1.0)
    gradient_checkpointing: bool = _help("recompute activations in the backward pass to save memory", True)

    think_budget_schedule: str = _help(
        "thinking budgets over training, drawn per prompt group: constant (--think-budget), linear:START:END, "
        "step:B1,B2@STEP,... (B2 from STEP on), choice:B1,B2,... (each group draws one)", "constant")

    # -- asynchronous rollouts and the off-policy correction ----------------------------------
    async_rollouts: bool = _help(
        "a producer thread rolls out the next steps while the optimizer steps; weights go to the engine in "
        "flight after each step and every token records the weights that produced it", False)
    max_staleness: int = _help(
        "async: at most this many optimizer steps between the policy that produced a token and the one it "
        "trains (0 is the synchronous trainer, step for step)", 1)
    importance_sampling_correction: str = _help(
        "weight each token's loss by exp(trainer logprob - engine logprob), truncated or masked (TRL's "
        "vllm_importance_sampling_correction): auto (on with --async-rollouts and --max-staleness above 0), "
        "on, off", "auto")
    importance_sampling_mode: str = _help(
        "token_truncate, token_mask, sequence_truncate or sequence_mask (TRL's vllm_importance_sampling_mode; "
        "TRL's default is sequence_mask, this one is truncated importance sampling per token)", "token_truncate")
    importance_sampling_clip_max: float = _help(
        "upper bound C_max of the importance ratio: truncated to it, or masked above it (always set here; TRL "
        "also allows none)", 3.0)
    importance_sampling_clip_min: float | None = _help(
        "lower bound C_min of the importance ratio (none: no lower bound)", None)

    # -- bookkeeping -------------------------------------------------------------------------
    seed: int = _help("seeds prompts, rollouts and torch", 0)
    checkpoint_interval: int = _help("save a checkpoint every this many steps (0: only at the end)", 0)
    device: str | None = _help("cpu | cuda (default: cuda when available)", None)
    dtype: str = _help("auto (bf16 on GPU, fp32 on CPU) | float32 | bfloat16", "auto")
    kv_cache_memory_gb: float | None = _help("KV cache of the rollout engine in GiB (default: 1 on CPU, 30% of free memory on a GPU)", None)
    num_scheduler_steps: int = _help(
        "decode steps the rollout engine runs on the device per host sync (same rollouts for any value)", 1)
    cuda_graphs: bool = _help("the rollout engine replays decode steps from CUDA graphs (CUDA only)", False)
    tensor_parallel_size: int = _help(
        "split the rollout engine's model over this many GPUs (or CPU processes), Megatron-style", 1)
    report_to: str = _help("where metrics go besides metrics.jsonl and the plot: none, tensorboard, wandb "
                           "(a comma list for both)", "none")

    def __post_init__(self) -> None:
        _choice("mode", self.mode, MODES)
        positive = ("steps", "prompts_per_step", "num_iterations", "micro_batch_size", "epochs", "batch_size",
                    "distill_prompts", "num_scheduler_steps", "tensor_parallel_size")
        for name in positive:
            _int_at_least(name, getattr(self, name), 1)
        if self.mode == "grpo":
            _int_at_least("group_size", self.group_size, 2, why=" (GRPO compares completions within a group)")
        else:
            _int_at_least("group_size", self.group_size, 1)
        if self.mode == "sft" and not self.sft_data:
            raise ValueError("mode sft needs sft_data (--sft-data FILE.jsonl)")
        if self.mode == "distill" and not self.teacher:
            raise ValueError("mode distill needs a teacher checkpoint (--teacher PATH)")
        _int_at_least("think_budget", self.think_budget, 0)
        _int_at_least("solution_budget", self.solution_budget, 1)
        _int_at_least("seed", self.seed, 0)
        _int_at_least("checkpoint_interval", self.checkpoint_interval, 0)
        _number_in("temperature", self.temperature, 0.0, None, low_open=True)
        _number_in("top_p", self.top_p, 0.0, 1.0, low_open=True)
        _number_in("learning_rate", self.learning_rate, 0.0, None)
        for name in ("weight_decay", "kl_coef", "entropy_coef", "max_grad_norm", "format_reward_weight"):
            _number_in(name, getattr(self, name), 0.0, None)
        _number_in("epsilon_low", self.epsilon_low, 0.0, 1.0, high_open=True)
        _number_in("epsilon_high", self.epsilon_high, 0.0, None)
        _choice("loss_aggregation", self.loss_aggregation, LOSS_AGGREGATIONS)
        _choice("advantage_scaling", self.advantage_scaling, ADVANTAGE_SCALINGS)
        _choice("dtype", self.dtype, ("auto", "float32", "bfloat16", "float16"))
        if self.kv_cache_memory_gb is not None:
            _number_in("kv_cache_memory_gb", self.kv_cache_memory_gb, 0.0, None, low_open=True)
        self.budget_schedule  # noqa: B018 - parsed here: a bad schedule is a one-line error before any load
        _int_at_least("max_staleness", self.max_staleness, 0)
        _choice("importance_sampling_correction", self.importance_sampling_correction, ("auto", "on", "off"))
        _choice("importance_sampling_mode", self.importance_sampling_mode, IMPORTANCE_SAMPLING_MODES)
        _number_in("importance_sampling_clip_max", self.importance_sampling_clip_max, 0.0, None, low_open=True)
        if self.importance_sampling_clip_min is not None:
            _number_in("importance_sampling_clip_min", self.importance_sampling_clip_min, 0.0,
                       self.importance_sampling_clip_max)
        parse_targets(self.report_to)

    @property
    def budget_schedule(self) -> BudgetSchedule:
        return BudgetSchedule.parse(self.think_budget_schedule)

    @property
    def corrects_off_policy(self) -> bool:
        """Whether the loss weights tokens by their importance ratio (auto: with async rollouts that may be
        stale, so that max_staleness 0 stays the synchronous trainer)."""
        return self.importance_sampling_correction == "on" or (
            self.importance_sampling_correction == "auto" and self.async_rollouts and self.max_staleness > 0)

    @property
    def max_completion_length(self) -> int:
        """An upper bound on completion tokens (the dr-grpo normaliser): t* (the schedule's largest) + marker + s*.

        The marker is at most a handful of tokens; 8 covers "\\n</think>\\n\\n" in every
        tokenizer we know of, and a constant is all dr-grpo asks for.
        """
        return self.budget_schedule.most(self.think_budget) + 8 + self.solution_budget

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict) -> GRPOConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"unknown GRPOConfig field(s): {', '.join(unknown)}")
        return cls(**values)

    @classmethod
    def from_json(cls, path: str | Path) -> GRPOConfig:
        try:
            values = json.loads(Path(path).read_text())
        except OSError as e:
            raise ValueError(f"cannot read config file {path}: {e.strerror}") from None
        except json.JSONDecodeError as e:
            raise ValueError(f"config file {path} is not valid JSON: {e}") from None
        if not isinstance(values, dict):
            raise ValueError(f"config file {path} must hold a JSON object")
        return cls.from_dict(values)


def _int_at_least(name: str, value, minimum: int, why: str = "") -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}{why}, got {value!r}")


def _number_in(name, value, low, high, low_open=False, high_open=False) -> None:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool)
    if ok:
        ok = (value > low if low_open else value >= low) and (
            high is None or (value < high if high_open else value <= high)
        )
    if not ok:
        interval = f"{'(' if low_open else '['}{low}, {'inf)' if high is None else str(high) + (')' if high_open else ']')}"
        raise ValueError(f"{name} must be a number in {interval}, got {value!r}")


def _choice(name: str, value, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ValueError(f"{name} must be one of {', '.join(allowed)}; got {value!r}")
