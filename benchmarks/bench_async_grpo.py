"""Synchronous vs asynchronous GRPO at `make train-demo`'s settings (fewer steps): the same run with
`--async-rollouts --max-staleness K` for each K given, one process after the other on this machine.

Reported per variant: wall time, the rollout and training phases (summed per step), how long the
trainer waited for rollouts and the producer for the staleness bound, the reward (mean of the last
third of the steps), the staleness of trained tokens and the importance ratios. Then a model of what
the overlap buys when rollout and training have devices of their own (they share the CPU's cores here):
a synchronous step costs rollout + training + sync, an overlapped one max(rollout, training + sync),
summed step by step from the synchronous run's phase times. The async runs correct off-policy tokens
(importance sampling, on by default with K > 0); the synchronous one does not, so their rewards differ
by that too.

    .venv/bin/python benchmarks/bench_async_grpo.py --steps 10 --staleness 1 2
"""
from __future__ import annotations

import argparse
import json
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

DEMO = ["--task", "arithmetic:1:+", "--group-size", "8", "--prompts-per-step", "4", "--think-budget", "16",
        "--solution-budget", "16", "--temperature", "0.7", "--learning-rate", "5e-5", "--format-reward-weight", "0.5",
        "--no-gradient-checkpointing", "--no-progress"]


def run(name: str, extra: list[str], steps: int, root: Path) -> dict:
    out = root / name
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "elastic_decode.train", *DEMO, "--steps", str(steps),
                           "--output-dir", str(out), *extra], capture_output=True, text=True)
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        raise SystemExit(f"{name} failed:\n{proc.stderr[-3000:]}")
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    tail = rows[-max(1, len(rows) // 3):]

    def total(key: str) -> float:
        return sum(r.get(key, 0.0) for r in rows)

    return {"name": name, "wall": wall, "rollout": total("rollout_seconds"), "train": total("train_seconds"),
            "sync": total("weight_sync_seconds"), "trainer_wait": total("rollout_wait_seconds"),
            "producer_wait": total("producer_wait_seconds"),
            "reward": statistics.mean(r["reward_mean"] for r in tail),
            "staleness": statistics.mean(r.get("staleness_mean", 0.0) for r in rows),
            "ratio_max": max((r.get("is_ratio_max", 0.0) for r in rows), default=0.0),
            "clipped": statistics.mean(r.get("is_clipped_fraction", 0.0) for r in rows), "steps": len(rows),
            "rows": rows}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--staleness", type=int, nargs="+", default=[1, 2], help="the K values of the async runs")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        results = [run("sync", [], args.steps, root)]
        for k in args.staleness:
            results.append(run(f"async K={k}", ["--async-rollouts", "--max-staleness", str(k)], args.steps, root))
    print(f"device: cpu ({platform.machine()}); model: the embedded SmolLM2-135M-Instruct, fp32; make train-demo's "
          f"settings for {args.steps} steps (4 prompts x 8 completions, t* = s* = 16); one run each, one after "
          "the other\n")
    print("| run | wall s | rollout s | training s | weight sync s | trainer waited s | producer waited s | "
          "reward (last third) | staleness (mean) | IS ratio max | IS clipped |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for r in results:
        print(f"| {r['name']} | {r['wall']:.0f} | {r['rollout']:.0f} | {r['train']:.0f} | {r['sync']:.1f} | "
              f"{r['trainer_wait']:.0f} | {r['producer_wait']:.0f} | {r['reward']:.3f} | {r['staleness']:.2f} | "
              f"{r['ratio_max']:.3f} | {r['clipped']:.4f} |")
    steps = results[0]["rows"]
    serial = sum(r["rollout_seconds"] + r["train_seconds"] + r["weight_sync_seconds"] for r in steps)
    overlapped = sum(max(r["rollout_seconds"], r["train_seconds"] + r["weight_sync_seconds"]) for r in steps)
    print(f"\nModel (own devices, from the sync run's phases): serial {serial:.0f} s, overlapped {overlapped:.0f} s "
          f"per {args.steps} steps: {serial / overlapped:.2f}x")


if __name__ == "__main__":
    main()
