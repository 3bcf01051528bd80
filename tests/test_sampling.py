"""Sampling in `sample_with_budget`, for every provider of the contract (the torch reference, the C++ CPU
sampler, the Triton kernel in its interpreter): greedy, filters, distribution, seeding. Each provider's
own matters live beside it (tests/test_kernels_sampler.py for the Triton kernel's one-pass reading,
tests/test_kernels_cpu.py for the C++ sampler's candidates)."""
from __future__ import annotations

import pytest
import torch

from elastic_decode.kernels import cpu, reference, sampling_batch
from elastic_decode.kernels.sample_with_budget import sample_with_budget

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
SAMPLERS = {"reference": reference.sample_with_budget, "cpu": cpu.sample_with_budget, "triton": sample_with_budget}
PROVIDERS = ["reference", pytest.param("cpu", marks=pytest.mark.skipif(not cpu.HAVE_CPU_KERNELS,
                                                                       reason="no C++ CPU kernels")), "triton"]


def sample(provider: str, logits: torch.Tensor, params, state):
    """The provider's tokens and logprobs (on the GPU for Triton where there is one), as CPU tensors."""
    device = DEVICE if provider == "triton" else "cpu"
    tokens, logprobs = SAMPLERS[provider](logits.to(device), params.to(device), state.to(device))
    return tokens.cpu(), logprobs.cpu()


def allowed_set(logits_row: torch.Tensor, temperature, top_k, top_p, min_p) -> set[int]:
    """The tokens a filter may emit, computed independently with float64 and Python loops."""
    x = logits_row.double() / temperature
    order = sorted(range(len(x)), key=lambda i: -float(x[i]))
    if 0 < top_k < len(x):
        kth = float(x[order[top_k - 1]])
        keep = [i for i in range(len(x)) if float(x[i]) >= kth]
    else:
        keep = list(range(len(x)))
    z = sum(float(torch.exp(x[i] - x[order[0]])) for i in keep)
    p = {i: float(torch.exp(x[i] - x[order[0]])) / z for i in keep}
    if top_p < 1:
        # smallest probability the nucleus needs; ties with it are kept too
        mass, threshold = 0.0, 0.0
        for i in sorted(keep, key=lambda i: -p[i]):
            if mass >= top_p:
                break
            threshold = p[i]
            mass += p[i]
        keep = [i for i in keep if p[i] >= threshold * (1 - 1e-6)]
    top = max(p.values())
    return {i for i in keep if p[i] >= min_p * top * (1 - 1e-6)}


def test_greedy_is_argmax():
    torch.manual_seed(0)
    logits = torch.randn(37, 1001)
    params, state = sampling_batch(37, temperature=0.0)
    tokens, logprobs = reference.sample_with_budget(logits, params, state)
    assert torch.equal(tokens, logits.argmax(-1))
    assert torch.allclose(logprobs, torch.log_softmax(logits, -1).max(-1).values)


@pytest.mark.parametrize("provider", PROVIDERS)
def test_filters_never_emit_outside_the_allowed_set(provider):
    torch.manual_seed(1)
    vocab = 50
    for temperature, top_k, top_p, min_p in [(1.0, 5, 1.0, 0.0), (0.7, 0, 0.8, 0.0), (1.3, 0, 1.0, 0.1),
                                               (1.0, 10, 0.5, 0.05), (0.5, 3, 0.9, 0.2)]:
        logits = torch.randn(32, vocab) * 2
        for step in range(3):
            params, state = sampling_batch(32, temperature, top_k, top_p, min_p, generated=step)
            tokens, _ = sample(provider, logits, params, state)
            for row, tok in enumerate(tokens.tolist()):
                assert tok in allowed_set(logits[row], temperature, top_k, top_p, min_p)


@pytest.mark.parametrize("provider, draws, top_p, min_p", [
    ("reference", 20000, 0.9, 0.0), pytest.param("cpu", 20000, 0.9, 0.0, marks=PROVIDERS[1].marks),
    # The interpreter is slow: fewer draws, and min-p (the top-k/top-p paths of the kernel are pinned by
    # test_kernels_sampler.test_draws_equal_the_reference_draws, token for token with the reference).
    ("triton", 3000, 1.0, 0.05),
])
def test_distribution_matches_the_renormalised_target(provider, draws, top_p, min_p):
    """Chi-square over fixed seeds (a fixed set, so the test is deterministic): the draws follow the
    filtered distribution."""
    vocab = 8
    logits = torch.tensor([2.0, 1.5, 1.0, 0.5, 0.0, -0.5, -1.0, -3.0])
    temperature = 0.9
    params, state = sampling_batch(draws, temperature=temperature, top_p=top_p, min_p=min_p,
                                   seeds=range(1000, 1000 + draws))
    tokens, _ = sample(provider, logits.expand(draws, vocab).contiguous(), params, state)
    counts = torch.bincount(tokens, minlength=vocab).double()
    keep = sorted(allowed_set(logits, temperature, 0, top_p, min_p))
    p = torch.softmax(logits.double() / temperature, -1)[keep]
    expected = p / p.sum() * draws
    assert counts[[i for i in range(vocab) if i not in keep]].sum() == 0
    chi2 = float(((counts[keep] - expected) ** 2 / expected).sum())
    # 99.9% quantile of chi-square with len(keep) - 1 degrees of freedom (<= 7): 24.3
    assert chi2 < 24.3, (chi2, counts[keep].tolist(), expected.tolist())


@pytest.mark.parametrize("provider", PROVIDERS)
def test_same_seed_and_step_same_token_whatever_the_batch(provider):
    torch.manual_seed(2)
    vocab = 300
    row = torch.randn(vocab)
    alone_params, alone_state = sampling_batch(1, seeds=[1234], generated=7)
    alone, _ = sample(provider, row[None].clone(), alone_params, alone_state)
    others = torch.randn(9, vocab)
    batch = torch.cat([others[:4], row[None], others[4:]])
    seeds = [5, 6, 7, 8, 1234, 9, 10, 11, 12, 13]
    params, state = sampling_batch(10, seeds=seeds, generated=7)
    tokens, _ = sample(provider, batch, params, state)
    assert int(tokens[4]) == int(alone[0])


def test_different_steps_draw_different_uniforms():
    u = reference.philox_uniform(torch.full((1000,), 42, dtype=torch.long), torch.arange(1000))
    assert 0.0 <= float(u.min()) and float(u.max()) < 1.0 + 1e-7
    assert len(set(u.tolist())) > 990
    assert abs(float(u.mean()) - 0.5) < 0.03
