"""GRPO's pure functions against values computed by hand on tiny tensors."""
from __future__ import annotations

import math

import pytest
import torch

from elastic_decode.train.loss import (
    ADVANTAGE_EPS,
    group_advantages,
    grpo_loss,
    importance_weights,
    loss_mask,
    token_entropy,
    token_logprobs,
)

REWARDS = torch.tensor([1.0, 0.0, 0.0, 1.0, 2.0, 2.0, 2.0, 2.0])  # two groups of G = 4


def test_group_advantages_group_scaling():
    adv = group_advantages(REWARDS, 4, "group")
    # group 0: mean 0.5, unbiased std sqrt(1/3); group 1: all equal -> 0
    a = 0.5 / (math.sqrt(1 / 3) + ADVANTAGE_EPS)
    assert torch.allclose(adv, torch.tensor([a, -a, -a, a, 0, 0, 0, 0]), atol=1e-6)


def test_group_advantages_batch_and_no_scaling():
    centred = torch.tensor([0.5, -0.5, -0.5, 0.5, 0, 0, 0, 0])
    assert torch.allclose(group_advantages(REWARDS, 4, "none"), centred)
    batch_std = math.sqrt(5.5 / 7)  # rewards' unbiased std over all 8
    assert torch.allclose(group_advantages(REWARDS, 4, "batch"), centred / (batch_std + ADVANTAGE_EPS), atol=1e-6)


def test_group_advantages_rejects_ragged_groups():
    with pytest.raises(ValueError, match="group_size"):
        group_advantages(torch.zeros(6), 4)


def test_token_logprobs_and_entropy_by_hand():
    logits = torch.tensor([[[0.0, math.log(3.0)]]])  # probabilities 1/4, 3/4
    ids = torch.tensor([[1]])
    assert token_logprobs(logits, ids).item() == pytest.approx(math.log(0.75), abs=1e-6)
    # T = 2 halves the logits: probabilities 1 / (1 + sqrt 3), sqrt 3 / (1 + sqrt 3)
    p = math.sqrt(3) / (1 + math.sqrt(3))
    assert token_logprobs(logits, ids, temperature=2.0).item() == pytest.approx(math.log(p), abs=1e-6)
    assert token_entropy(logits).item() == pytest.approx(-(0.25 * math.log(0.25) + 0.75 * math.log(0.75)), abs=1e-6)


def _hand_batch():
    # ratios: row 0 [1.5, 0.9], row 1 [0.5, 1.1]; advantages +1, -2; row 1's token 1 masked
    old = torch.tensor([[-1.0, -2.0], [-0.5, -3.0]])
    ratios = torch.tensor([[1.5, 0.9], [0.5, 1.1]])
    logprobs = (old + ratios.log()).requires_grad_(True)
    return logprobs, old, torch.tensor([1.0, -2.0]), torch.tensor([[1, 1], [1, 0]])


@pytest.mark.parametrize(
    "aggregation, expected",
    [
        # per token: -min(rA, clip(r, 0.8, 1.3) A) = [[-1.3, -0.9], [1.6, 2.2 (masked)]]
        ("token-mean", (-1.3 - 0.9 + 1.6) / 3),
        ("seq-mean", ((-1.3 - 0.9) / 2 + 1.6 / 1) / 2),
        ("dr-grpo", (-1.3 - 0.9 + 1.6) / (2 * 4)),
    ],
)
def test_clipped_objective_by_hand(aggregation, expected):
    logprobs, old, adv, mask = _hand_batch()
    loss, metrics = grpo_loss(logprobs, old, adv, mask, epsilon_low=0.2, epsilon_high=0.3,
                              aggregation=aggregation, max_completion_length=4)
    assert loss.item() == pytest.approx(expected, abs=1e-6)
    # Row 0 token 0 (r = 1.5 > 1.3, A > 0) and row 1 token 0 (r = 0.5 < 0.8, A < 0) are clipped.
    assert metrics["clip_fraction"].item() == pytest.approx(2 / 3)
    assert metrics["loss_tokens"].item() == 3


def test_gradient_only_through_unclipped_unmasked_tokens():
    logprobs, old, adv, mask = _hand_batch()
    loss, _ = grpo_loss(logprobs, old, adv, mask, epsilon_low=0.2, epsilon_high=0.3)
    loss.backward()
    # d/dlogp of -rA/3 = -rA/3 for row 0 token 1 (r = 0.9, A = 1); clipped and masked tokens get 0.
    expected = torch.tensor([[0.0, -0.9 / 3], [0.0, 0.0]])
    assert torch.allclose(logprobs.grad, expected, atol=1e-6)


def test_clip_higher_widens_only_the_upper_side():
    logprobs, old, adv, mask = _hand_batch()
    narrow, _ = grpo_loss(logprobs, old, adv, mask, epsilon_low=0.2, epsilon_high=0.2)
    wide, m = grpo_loss(logprobs, old, adv, mask, epsilon_low=0.2, epsilon_high=0.6)
    # with eps_high 0.6 row 0 token 0 is no longer clipped: -1.5 instead of -1.2
    assert narrow.item() == pytest.approx((-1.2 - 0.9 + 1.6) / 3, abs=1e-6)
    assert wide.item() == pytest.approx((-1.5 - 0.9 + 1.6) / 3, abs=1e-6)
    assert m["clip_fraction"].item() == pytest.approx(1 / 3)


def test_k3_kl_by_hand():
    logprobs = torch.tensor([[math.log(0.25)]], requires_grad=True)
    ref = torch.tensor([[math.log(0.5)]])  # ref - logp = ln 2: k3 = 2 - ln 2 - 1
    loss, metrics = grpo_loss(logprobs, logprobs.detach(), torch.zeros(1), torch.ones(1, 1),
                              ref_logprobs=ref, kl_coef=0.5)
    k3 = 2 - math.log(2) - 1
    assert metrics["kl"].item() == pytest.approx(k3, abs=1e-6)
    assert loss.item() == pytest.approx(0.5 * k3, abs=1e-6)  # zero advantage: only the KL term
    loss.backward()
    # d k3 / d logp = -exp(ref - logp) + 1 = -1
    assert logprobs.grad.item() == pytest.approx(0.5 * -1.0, abs=1e-6)


def test_entropy_bonus_lowers_the_loss():
    logprobs, old, adv, mask = _hand_batch()
    entropy = torch.tensor([[1.0, 2.0], [3.0, 100.0]])  # the masked token's entropy must not count
    base, _ = grpo_loss(logprobs, old, adv, mask)
    with_bonus, m = grpo_loss(logprobs, old, adv, mask, entropy=entropy, entropy_coef=0.1)
    assert m["entropy"].item() == pytest.approx(2.0)
    assert (base - with_bonus).item() == pytest.approx(0.1 * 2.0, abs=1e-6)


def test_loss_mask_removes_exactly_forced_and_truncated_tokens():
    completion = torch.tensor([[1, 1, 1, 1], [1, 1, 1, 0], [1, 1, 0, 0]])
    forced = torch.tensor([[0, 1, 1, 0], [0, 0, 0, 0], [1, 0, 0, 0]])
    truncated = torch.tensor([False, True, False])
    assert loss_mask(completion, forced, truncated, False, False).tolist() == completion.float().tolist()
    assert loss_mask(completion, forced, truncated, True, False).tolist() == [
        [1, 0, 0, 1], [1, 1, 1, 0], [0, 1, 0, 0]]
    assert loss_mask(completion, forced, truncated, True, True).tolist() == [
        [1, 0, 0, 1], [0, 0, 0, 0], [0, 1, 0, 0]]


@pytest.mark.parametrize("aggregation", ["token-mean", "seq-mean", "dr-grpo"])
def test_micro_batches_sum_to_the_whole_batch_gradient(aggregation):
    g = torch.Generator().manual_seed(0)
    rows, length = 6, 5
    old = -torch.rand(rows, length, generator=g) * 3
    logprobs = (old + 0.3 * torch.randn(rows, length, generator=g)).requires_grad_(True)
    adv = torch.randn(rows, generator=g)
    mask = (torch.rand(rows, length, generator=g) > 0.3).int()
    kwargs = dict(aggregation=aggregation, max_completion_length=7, epsilon_high=0.28)
    whole, _ = grpo_loss(logprobs, old, adv, mask, **kwargs)
    (whole_grad,) = torch.autograd.grad(whole, logprobs)
    total = dict(total_tokens=mask.sum().item(), total_rows=rows)
    parts = [grpo_loss(logprobs[s], old[s], adv[s], mask[s], **kwargs, **total)[0] for s in (slice(0, 4), slice(4, 6))]
    (split_grad,) = torch.autograd.grad(sum(parts), logprobs)
    assert sum(p.item() for p in parts) == pytest.approx(whole.item(), abs=1e-6)
    assert torch.allclose(split_grad, whole_grad, atol=1e-7)


# -- the off-policy correction: TRL's four modes on one hand-computed example ----------------------------
# Two rows, three tokens; the last token of row 1 is padding. Trainer minus engine logprobs:
#   row 0: ln 2, ln 4, -ln 2  -> token ratios 2, 4, 1/2; sequence ratio 2 * 4 / 2 = 4
#   row 1: ln 1.5, 0, (pad)   -> token ratios 1.5, 1;     sequence ratio 1.5
LN = math.log
TRAINER = torch.tensor([[LN(2), LN(4), -LN(2)], [LN(1.5), 0.0, 5.0]]) - 1.0
ENGINE = torch.full((2, 3), -1.0)
MASK = torch.tensor([[1.0, 1.0, 1.0], [1.0, 1.0, 0.0]])


@pytest.mark.parametrize("mode, clip_max, clip_min, expected, clipped", [
    ("token_truncate", 3.0, None, [[2, 3, 0.5], [1.5, 1, 1]], 1 / 5),  # 4 -> 3
    ("token_truncate", 3.0, 0.6, [[2, 3, 0.6], [1.5, 1, 1]], 2 / 5),  # and 1/2 -> 0.6
    ("token_mask", 3.0, None, [[2, 0, 0.5], [1.5, 1, 1]], 1 / 5),  # 4 masked
    ("token_mask", 3.0, 0.6, [[2, 0, 0], [1.5, 1, 1]], 2 / 5),
    ("sequence_truncate", 3.0, None, [[3], [1.5]], 3 / 5),  # row 0's 4 -> 3, all three tokens
    ("sequence_mask", 3.0, None, [[0], [1.5]], 3 / 5),
    ("sequence_mask", 5.0, 2.0, [[4], [0]], 2 / 5),  # row 1 under C_min
])
def test_importance_weights_by_hand(mode, clip_max, clip_min, expected, clipped):
    weights, metrics = importance_weights(TRAINER, ENGINE, MASK, mode, clip_max, clip_min)
    want = torch.tensor(expected, dtype=torch.float32)
    if mode.startswith("token"):  # the padded token's weight is exp(0) = 1 (masked in the loss anyway)
        assert torch.allclose(weights, want, atol=1e-5)
    else:
        assert weights.shape == (2, 1) and torch.allclose(weights, want, atol=1e-5)
    assert metrics["is_clipped_fraction"].item() == pytest.approx(clipped, abs=1e-6)
    raw = [2, 4, 0.5, 1.5, 1] if mode.startswith("token") else [4, 4, 4, 1.5, 1.5]
    assert metrics["is_ratio_mean"].item() == pytest.approx(sum(raw) / 5, rel=1e-5)
    assert metrics["is_ratio_max"].item() == pytest.approx(max(raw), rel=1e-5)
    assert metrics["is_ratio_min"].item() == pytest.approx(min(raw), rel=1e-5)


def test_importance_weights_refuse_an_unknown_mode():
    with pytest.raises(ValueError, match="token_truncate"):
        importance_weights(TRAINER, ENGINE, MASK, "token_clip")


def test_importance_weights_scale_the_policy_term_not_the_kl():
    """w multiplies -min(rA, clip(r)A) per token; the k3 KL term is added unweighted (TRL's order)."""
    logprobs = torch.tensor([[-1.0, -2.0]], requires_grad=True)
    old = logprobs.detach()
    ref = torch.tensor([[-1.5, -1.0]])
    adv, mask = torch.tensor([2.0]), torch.ones(1, 2)
    w = torch.tensor([[0.5, 3.0]])
    loss, _ = grpo_loss(logprobs, old, adv, mask, importance_weights=w, ref_logprobs=ref, kl_coef=0.1)
    k3 = torch.exp(ref - old) - (ref - old) - 1
    by_hand = (-(w * adv) + 0.1 * k3).sum() / 2  # r = 1 at the start: -w A + kl per token, token mean
    assert loss.item() == pytest.approx(by_hand.item(), rel=1e-6)
    loss.backward()
    # d/dlogp of -w r A at r = 1 is -w A; the KL's is 0.1 (1 - exp(ref - logp))
    grad = (-(w * adv) + 0.1 * (1 - torch.exp(ref - old))) / 2
    assert torch.allclose(logprobs.grad, grad, atol=1e-6)
