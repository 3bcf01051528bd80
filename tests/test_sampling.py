"""Sampling in `sample_with_budget` (reference): greedy, filters, distribution, seeding."""
from __future__ import annotations

import torch

from elastic_decode.kernels import reference, sampling_batch


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


def test_filters_never_emit_outside_the_allowed_set():
    torch.manual_seed(1)
    vocab = 50
    for temperature, top_k, top_p, min_p in [(1.0, 5, 1.0, 0.0), (0.7, 0, 0.8, 0.0), (1.3, 0, 1.0, 0.1),
                                               (1.0, 10, 0.5, 0.05), (0.5, 3, 0.9, 0.2)]:
        logits = torch.randn(64, vocab) * 2
        for step in range(5):
            params, state = sampling_batch(64, temperature, top_k, top_p, min_p, generated=step)
            tokens, _ = reference.sample_with_budget(logits, params, state)
            for row, tok in enumerate(tokens.tolist()):
                assert tok in allowed_set(logits[row], temperature, top_k, top_p, min_p)


def test_distribution_matches_the_renormalised_target():
    """Chi-square over 20000 fixed seeds: the draws follow the filtered distribution."""
    vocab, n = 8, 20000
    logits = torch.tensor([2.0, 1.5, 1.0, 0.5, 0.0, -0.5, -1.0, -3.0])
    temperature, top_p = 0.9, 0.9
    params, state = sampling_batch(n, temperature=temperature, top_p=top_p, seeds=range(1000, 1000 + n))
    tokens, _ = reference.sample_with_budget(logits.expand(n, vocab).clone(), params, state)
    counts = torch.bincount(tokens, minlength=vocab).double()
    keep = sorted(allowed_set(logits, temperature, 0, top_p, 0.0))
    p = torch.softmax(logits.double() / temperature, -1)[keep]
    expected = p / p.sum() * n
    assert counts[[i for i in range(vocab) if i not in keep]].sum() == 0
    chi2 = float(((counts[keep] - expected) ** 2 / expected).sum())
    # 99.9% quantile of chi-square with len(keep) - 1 degrees of freedom (<= 7): 24.3
    assert chi2 < 24.3, (chi2, counts[keep].tolist(), expected.tolist())


def test_same_seed_and_step_same_token_whatever_the_batch():
    torch.manual_seed(2)
    vocab = 300
    row = torch.randn(vocab)
    alone_params, alone_state = sampling_batch(1, seeds=[1234], generated=7)
    alone, _ = reference.sample_with_budget(row[None].clone(), alone_params, alone_state)
    others = torch.randn(9, vocab)
    batch = torch.cat([others[:4], row[None], others[4:]])
    seeds = [5, 6, 7, 8, 1234, 9, 10, 11, 12, 13]
    params, state = sampling_batch(10, seeds=seeds, generated=7)
    tokens, _ = reference.sample_with_budget(batch, params, state)
    assert int(tokens[4]) == int(alone[0])


def test_different_steps_draw_different_uniforms():
    u = reference.philox_uniform(torch.full((1000,), 42, dtype=torch.long), torch.arange(1000))
    assert 0.0 <= float(u.min()) and float(u.max()) < 1.0 + 1e-7
    assert len(set(u.tolist())) > 990
    assert abs(float(u.mean()) - 0.5) < 0.03
