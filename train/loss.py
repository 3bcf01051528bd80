"""GRPO's math as pure functions with documented shapes, each testable by hand.

Conventions (B = completions in the (micro-)batch, T = completion length, V = vocabulary):
- rows are grouped by prompt: rows `g * G .. g * G + G - 1` are the G completions of prompt g;
- `loss_mask [B, T]` is 1 on tokens that get gradient (completion tokens, minus forced marker
  tokens and truncated completions when the config masks them).

Loss variants as named in the literature: clip-higher and token-mean aggregation from DAPO
(arXiv 2503.14476), the constant normaliser and unscaled advantages from Dr. GRPO
(arXiv 2503.20783), the k3 KL estimator from Schulman's "Approximating KL divergence" note, as
used by DeepSeekMath's GRPO (arXiv 2402.03300); the off-policy correction of tokens sampled by the
engine under an older policy (or with other rounding) is truncated or masked importance sampling as
TRL's GRPOTrainer names it (`vllm_importance_sampling_mode`, Yao et al.'s "truncated importance
sampling" for the token modes).
"""
from __future__ import annotations

import math

import torch

from .config import IMPORTANCE_SAMPLING_MODES

# Added to the std when scaling advantages, so a group whose rewards are all equal (std 0)
# gets zero advantages instead of 0/0 (the value TRL uses).
ADVANTAGE_EPS = 1e-4


def group_advantages(
    rewards: torch.Tensor,  # float [num_groups * G]
    group_size: int,
    scaling: str = "group",
) -> torch.Tensor:  # float [num_groups * G]
    """Reward minus its group's mean, divided by a std (unbiased, as TRL) per `scaling`.

    group: each group's own std (GRPO); batch: the std of the whole batch's rewards;
    none: no division (Dr. GRPO).
    """
    if rewards.ndim != 1 or rewards.numel() % group_size:
        raise ValueError(f"rewards must be 1-D with a multiple of group_size={group_size} entries, got {tuple(rewards.shape)}")
    grouped = rewards.float().view(-1, group_size)  # [num_groups, G]
    centred = grouped - grouped.mean(dim=1, keepdim=True)
    if scaling == "group":
        centred = centred / (grouped.std(dim=1, keepdim=True) + ADVANTAGE_EPS)
    elif scaling == "batch":
        std = rewards.float().std() if rewards.numel() > 1 else rewards.new_zeros(())
        centred = centred / (std + ADVANTAGE_EPS)
    elif scaling != "none":
        raise ValueError(f"scaling must be group, batch or none; got {scaling!r}")
    return centred.reshape(-1)


def loss_mask(
    completion_mask: torch.Tensor,  # {0,1} [B, T]: real completion tokens
    forced_mask: torch.Tensor,  # {0,1} [B, T]: tokens the engine forced (the marker)
    truncated: torch.Tensor,  # bool [B]: cut by the solution budget
    mask_forced: bool = True,
    mask_truncated: bool = False,
) -> torch.Tensor:  # float32 [B, T]
    """Which tokens get gradient: forced tokens are conditioned on but not trained on (they were
    not sampled), and truncated completions optionally get none (DAPO's overlong filtering)."""
    mask = completion_mask.float()
    if mask_forced:
        mask = mask * (1 - forced_mask.float())
    if mask_truncated:
        mask = mask * (~truncated.bool()).float().unsqueeze(1)
    return mask


def token_logprobs(
    logits: torch.Tensor,  # float [B, T, V]: logits[b, i] predicts token_ids[b, i]
    token_ids: torch.Tensor,  # int64 [B, T]
    temperature: float = 1.0,
) -> torch.Tensor:  # float32 [B, T]
    """log softmax(logits / T)[token]: the engine's logprob convention (DESIGN: T = 1 for greedy)."""
    scaled = logits.float() / temperature
    picked = scaled.gather(-1, token_ids.unsqueeze(-1)).squeeze(-1)  # [B, T]
    return picked - torch.logsumexp(scaled, dim=-1)


def token_entropy(logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:  # float32 [B, T]
    """Entropy of softmax(logits / T) at every position."""
    logp = torch.log_softmax(logits.float() / temperature, dim=-1)  # [B, T, V]
    return -(logp.exp() * logp).sum(-1)


def grpo_loss(
    logprobs: torch.Tensor,  # float [B, T]: current policy, with grad
    old_logprobs: torch.Tensor,  # float [B, T]: the policy that sampled (no grad)
    advantages: torch.Tensor,  # float [B]
    loss_mask: torch.Tensor,  # {0,1} [B, T]
    *,
    epsilon_low: float = 0.2,
    epsilon_high: float = 0.2,
    aggregation: str = "token-mean",
    ref_logprobs: torch.Tensor | None = None,  # float [B, T]: frozen reference, for the KL term
    kl_coef: float = 0.0,
    entropy: torch.Tensor | None = None,  # float [B, T]: for the entropy bonus
    entropy_coef: float = 0.0,
    max_completion_length: int | None = None,  # dr-grpo's constant normaliser
    total_tokens: float | None = None,  # loss tokens in the whole batch (token-mean)
    total_rows: int | None = None,  # completions in the whole batch (seq-mean, dr-grpo)
    importance_weights: torch.Tensor | None = None,  # float [B, T] or [B, 1]: off-policy correction (no grad)
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The clipped surrogate objective (negated, to minimise), plus k3 KL and entropy terms.

    per token: -w min(r A, clip(r, 1 - eps_low, 1 + eps_high) A) + kl_coef k3 - entropy_coef H,
    with r = exp(logprobs - old_logprobs) and w the importance weight of the token as the engine
    sampled it (`importance_weights`, 1 without). Aggregation:
      token-mean: sum over all loss tokens / total_tokens;
      seq-mean:   sum over rows of (row sum / row's loss tokens) / total_rows;
      dr-grpo:    sum over all loss tokens / (total_rows * max_completion_length).
    total_tokens / total_rows default to this batch's; pass the whole batch's when it is split into
    micro-batches, so the summed micro-batch gradients equal the whole batch's gradient.

    Metrics (detached, over this batch's loss tokens): clip_fraction (tokens whose gradient the
    clip removed), ratio_mean, kl, entropy, loss_tokens.
    """
    mask = loss_mask.to(logprobs.dtype)
    ratio = torch.exp(logprobs - old_logprobs)  # [B, T]
    adv = advantages.to(logprobs.dtype).unsqueeze(1)  # [B, 1]
    unclipped = ratio * adv
    clipped = torch.clamp(ratio, 1.0 - epsilon_low, 1.0 + epsilon_high) * adv
    per_token = -torch.minimum(unclipped, clipped)  # [B, T]
    if importance_weights is not None:
        per_token = per_token * importance_weights.detach().to(logprobs.dtype)
    metrics: dict[str, torch.Tensor] = {}
    tokens = mask.sum()
    denom = tokens.clamp(min=1.0)

    def masked_mean(x: torch.Tensor) -> torch.Tensor:
        return (x.detach() * mask).sum() / denom

    if ref_logprobs is not None and kl_coef > 0:
        delta = ref_logprobs - logprobs
        kl = torch.exp(delta) - delta - 1.0  # k3: unbiased, always >= 0
        per_token = per_token + kl_coef * kl
        metrics["kl"] = masked_mean(kl)
    if entropy is not None:
        if entropy_coef > 0:
            per_token = per_token - entropy_coef * entropy
        metrics["entropy"] = masked_mean(entropy)

    rows = logprobs.shape[0] if total_rows is None else total_rows
    if aggregation == "token-mean":
        loss = (per_token * mask).sum() / (denom if total_tokens is None else max(float(total_tokens), 1.0))
    elif aggregation == "seq-mean":
        row_tokens = mask.sum(dim=1).clamp(min=1.0)  # [B]
        loss = ((per_token * mask).sum(dim=1) / row_tokens).sum() / rows
    elif aggregation == "dr-grpo":
        if max_completion_length is None:
            raise ValueError("dr-grpo aggregation needs max_completion_length")
        loss = (per_token * mask).sum() / (rows * max_completion_length)
    else:
        raise ValueError(f"aggregation must be token-mean, seq-mean or dr-grpo; got {aggregation!r}")

    was_clipped = ((ratio < 1.0 - epsilon_low) & (adv < 0)) | ((ratio > 1.0 + epsilon_high) & (adv > 0))
    metrics["clip_fraction"] = masked_mean(was_clipped.to(mask.dtype))
    metrics["ratio_mean"] = masked_mean(ratio)
    metrics["loss_tokens"] = tokens.detach()
    return loss, metrics


def importance_weights(
    old_logprobs: torch.Tensor,  # float [B, T]: the trainer's policy before this step's update (TRL's old logps)
    sampling_logprobs: torch.Tensor,  # float [B, T]: the engine's as it sampled (the behaviour policy: older weights)
    loss_mask: torch.Tensor,  # {0,1} [B, T]: the tokens that count (forced and padded ones out)
    mode: str = "token_truncate",
    clip_max: float | None = 3.0,
    clip_min: float | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:  # float32 [B, T] or [B, 1], metrics
    """The importance weight of each token (or sequence) sampled by the engine, for a loss taken under the
    trainer's policy: r = exp(old - sampling), per token or, for the sequence modes, one
    r = exp(sum over the sequence's loss tokens) per row. TRL's `vllm_importance_sampling_mode` names
    and bounds (`..._clip_max`, `..._clip_min`):

      token_truncate / sequence_truncate: r clamped to [clip_min, clip_max] (truncated IS);
      token_mask / sequence_mask:         r outside [clip_min, clip_max] set to 0 (masked IS).

    The weights multiply the policy term of the per-token loss (the KL term stays unweighted); a bound
    of None is no bound. Metrics (over loss tokens, detached): is_ratio_mean, is_ratio_max, is_ratio_min
    of the raw ratios before any bound, token-weighted also in the sequence modes (TRL logs them after
    the bound), is_clipped_fraction (tokens whose weight the bound changed).
    """
    if mode not in IMPORTANCE_SAMPLING_MODES:
        raise ValueError(f"mode must be one of {', '.join(IMPORTANCE_SAMPLING_MODES)}; got {mode!r}")
    mask = loss_mask.float()
    diff = (old_logprobs.detach().float() - sampling_logprobs.float()) * mask  # [B, T]
    log_ratio = diff.sum(dim=1, keepdim=True) if mode.startswith("sequence") else diff  # [B, 1] or [B, T]
    ratio = torch.exp(log_ratio)
    low = clip_min if clip_min is not None else 0.0
    high = clip_max if clip_max is not None else math.inf
    outside = (ratio < low) | (ratio > high)
    if mode.endswith("truncate"):
        weights = ratio.clamp(min=clip_min, max=clip_max) if clip_min is not None or clip_max is not None else ratio
    else:
        weights = ratio.masked_fill(outside, 0.0)
    per_token = torch.broadcast_to(ratio, mask.shape)
    tokens = mask.sum().clamp(min=1.0)
    picked = per_token[mask.bool()]
    metrics = {
        "is_ratio_mean": (per_token * mask).sum() / tokens,
        "is_ratio_max": picked.max() if picked.numel() else mask.new_zeros(()),
        "is_ratio_min": picked.min() if picked.numel() else mask.new_zeros(()),
        "is_clipped_fraction": (torch.broadcast_to(outside, mask.shape).float() * mask).sum() / tokens,
    }
    return weights, metrics


def sft_loss(
    logprobs: torch.Tensor,  # float [B, T]: completion tokens under the model, with grad
    completion_mask: torch.Tensor,  # {0,1} [B, T]: real completion tokens (prompts are not in T at all)
    total_tokens: float | None = None,  # completion tokens in the whole batch, when split into micro-batches
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Negative log-likelihood of the completion tokens, averaged over all of them (token-mean).

    Prompt tokens condition the completion but get no loss: they are never part of `logprobs`.
    Pass the whole batch's `total_tokens` for micro-batches so their gradients sum to the batch's.
    """
    mask = completion_mask.to(logprobs.dtype)
    tokens = mask.sum()
    denom = tokens.clamp(min=1.0) if total_tokens is None else max(float(total_tokens), 1.0)
    loss = -(logprobs * mask).sum() / denom
    return loss, {"loss_tokens": tokens.detach()}
