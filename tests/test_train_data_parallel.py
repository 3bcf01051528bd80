"""Data-parallel GRPO: `torchrun --nproc-per-node 2 -m elastic_decode.train` against one process with
the same global batch and seed (CPU, gloo): the first step's loss, metrics and updated weights agree
to fp32 tolerance, and only rank 0 writes."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest
from safetensors.torch import load_file

pytestmark = pytest.mark.slow


def _args(model, out) -> list[str]:
    return ["--model", str(model), "--task", "arithmetic:1", "--output-dir", str(out), "--steps", "1",
            "--prompts-per-step", "4", "--group-size", "2", "--think-budget", "4", "--solution-budget", "5",
            "--temperature", "1.0", "--learning-rate", "1e-3", "--micro-batch-size", "3", "--device", "cpu",
            "--kv-cache-memory-gb", "0.05", "--no-progress", "--entropy-coef", "0.1"]


def test_two_ranks_step_as_one(tiny_llama, tmp_path):
    one, two = tmp_path / "one", tmp_path / "two"
    single = subprocess.run([sys.executable, "-m", "elastic_decode.train", *_args(tiny_llama, one)],
                            capture_output=True, text=True, timeout=600)
    assert single.returncode == 0, single.stderr[-2000:]
    ranks = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                            "-m", "elastic_decode.train", *_args(tiny_llama, two)],
                           capture_output=True, text=True, timeout=600)
    assert ranks.returncode == 0, ranks.stderr[-3000:]
    a = json.loads((one / "metrics.jsonl").read_text())
    b = [json.loads(line) for line in (two / "metrics.jsonl").read_text().splitlines()]
    assert len(b) == 1  # rank 0 alone writes
    b = b[0]
    for key in ("reward_mean", "reward_std", "accuracy", "think_tokens", "forced_tokens", "rollout_tokens",
                "loss_tokens"):
        assert b[key] == pytest.approx(a[key], rel=1e-6, abs=1e-9), key
    for key in ("loss", "clip_fraction", "entropy", "grad_norm"):
        assert b[key] == pytest.approx(a[key], rel=1e-4, abs=1e-6), key
    wa, wb = (load_file(str(d / "checkpoint-1" / "model.safetensors")) for d in (one, two))
    assert wa.keys() == wb.keys()
    worst = max((wa[k] - wb[k]).abs().max().item() for k in wa)
    moved = max((wa[k] - load_file(str(tiny_llama / "model.safetensors"))[k]).abs().max().item() for k in wa)
    assert moved > 1e-4 and worst < 1e-5, (worst, moved)
    assert sorted(p.name for p in two.iterdir() if p.name.startswith("checkpoint")) == ["checkpoint-1"]


def test_two_ranks_with_async_rollouts(tiny_llama, tmp_path):
    """Each rank runs its own rollout producer; the metrics' collectives stay on the trainer's thread, so
    the ranks neither hang nor mix their reductions."""
    out = tmp_path / "async"
    args = _args(tiny_llama, out)
    args[args.index("--steps") + 1] = "3"
    ranks = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                            "-m", "elastic_decode.train", *args, "--async-rollouts", "--max-staleness", "1"],
                           capture_output=True, text=True, timeout=600)
    assert ranks.returncode == 0, ranks.stderr[-3000:]
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3]
    assert all(r["staleness_max"] <= 1 and r["stale_tokens_dropped"] == 0 for r in rows)
    assert "async, the trainer waited" in ranks.stdout
