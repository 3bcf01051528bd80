"""Drive a `sample_with_budget` implementation over a batch with scripted logits."""
from __future__ import annotations

import torch

from elastic_decode.kernels import (
    DONE,
    FINISH_STOP,
    NO_LIMIT,
    PAD_TOKEN,
    SOLVING,
    THINKING,
    BudgetState,
    SamplerParams,
)

VOCAB = 16
FALLBACK = 14  # the scripted model's second choice at every step
EOS = 15


def make_batch(rows, device="cpu"):
    """rows: dicts with t, s, marker, m, max_new (and optional stop). Returns (params, state)."""
    n = len(rows)
    width = max(len(r["marker"]) for r in rows)
    stops = [list(r.get("stop", (EOS,))) for r in rows]
    stop_width = max(1, max(len(x) for x in stops))
    i32 = torch.int32
    params = SamplerParams(
        temperature=torch.zeros(n),
        top_k=torch.zeros(n, dtype=i32),
        top_p=torch.ones(n),
        min_p=torch.zeros(n),
        seed=torch.arange(n, dtype=torch.long),
        think_budget=torch.tensor([NO_LIMIT if r["t"] is None else r["t"] for r in rows], dtype=i32),
        solution_budget=torch.tensor([NO_LIMIT if r["s"] is None else r["s"] for r in rows], dtype=i32),
        max_new_tokens=torch.tensor([r["max_new"] for r in rows], dtype=i32),
        min_think=torch.tensor([r["m"] for r in rows], dtype=i32),
        min_tokens=torch.tensor([r.get("min_tokens", 0) for r in rows], dtype=i32),
        marker=torch.tensor([[-2] * (width - len(r["marker"])) + list(r["marker"]) for r in rows], dtype=i32),
        marker_len=torch.tensor([len(r["marker"]) for r in rows], dtype=i32),
        stop_ids=torch.tensor([x + [-1] * (stop_width - len(x)) for x in stops], dtype=i32),
    )
    state = BudgetState(
        phase=torch.tensor([SOLVING if r["t"] is None else THINKING for r in rows], dtype=i32),
        think_count=torch.zeros(n, dtype=i32),
        solution_count=torch.zeros(n, dtype=i32),
        generated=torch.zeros(n, dtype=i32),
        force_pos=torch.zeros(n, dtype=i32),
        recent=torch.full((n, width), -1, dtype=i32),
        forced_end=torch.zeros(n, dtype=i32),
        forced=torch.zeros(n, dtype=i32),
        confidence=torch.zeros(n),
        finish=torch.zeros(n, dtype=i32),
    )
    return params.to(device), state.to(device)


def scripted_logits(wishes_per_row, generated, dtype=torch.float32, device="cpu"):
    """Favourite token 10, FALLBACK 5, everything else 0."""
    n = len(wishes_per_row)
    logits = torch.zeros(n, VOCAB, dtype=dtype)
    for i, wishes in enumerate(wishes_per_row):
        step = min(int(generated[i]), len(wishes) - 1)
        logits[i, FALLBACK] = 5.0
        logits[i, wishes[step]] = 10.0
    return logits.to(device)


def drive(sample_fn, rows, wishes_per_row, device="cpu", dtype=torch.float32):
    """Run until every row is DONE; returns per-row dicts of what was emitted."""
    params, state = make_batch(rows, device)
    n = len(rows)
    out = [dict(tokens=[], forced=[], logprobs=[]) for _ in range(n)]
    for _ in range(max(r["max_new"] for r in rows) + 1):
        if bool((state.phase == DONE).all()):
            break
        logits = scripted_logits(wishes_per_row, state.generated.cpu(), dtype, device)
        tokens, logprobs = sample_fn(logits, params, state)
        for i in range(n):
            tok = int(tokens[i])
            if tok != PAD_TOKEN:
                out[i]["tokens"].append(tok)
                out[i]["forced"].append(int(state.forced[i]))
                out[i]["logprobs"].append(float(logprobs[i]))
    assert bool((state.phase == DONE).all()), "a row never finished"
    for i in range(n):
        out[i]["think_tokens"] = int(state.think_count[i])
        out[i]["solution_tokens"] = int(state.solution_count[i])
        out[i]["forced_end"] = bool(state.forced_end[i])
        out[i]["finish"] = "stop" if int(state.finish[i]) == FINISH_STOP else "length"
    return out
