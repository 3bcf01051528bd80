"""Seconds per TRL GRPOTrainer step: this engine as `rollout_func` vs TRL's own generation.

    python benchmarks/bench_trl.py [--model PATH] [--steps 4] [--think-budget 32] [--solution-budget 32]

Both runs use the same model, dataset, reward, batch (`--batch` completions per step in groups of
`--generations`) and `max_completion_length = t + marker + s`; only the rollout backend differs
(TRL's transformers generation cannot force the end of thinking, so it just gets the same
length cap). The first step of each run is a warm-up and is not counted. Prints a table.
"""
from __future__ import annotations

import argparse
import os
import random
import statistics
import tempfile

import torch


def run(model_path: str, use_engine: bool, args) -> tuple[float, float, float]:
    from datasets import Dataset
    from transformers import AutoModelForCausalLM
    from trl import GRPOConfig, GRPOTrainer

    from elastic_decode import LLM
    from elastic_decode.integrations.trl import make_rollout_func

    rng = random.Random(0)
    prompts = [{"prompt": [{"role": "user", "content": f"What is {rng.randint(0, 99)} + {rng.randint(0, 99)}? "
                                                       "Put the answer in \\boxed{}."}]} for _ in range(64)]

    def reward(completions, **kwargs):
        return [float("\\boxed" in str(c)) for c in completions]

    rollout_func = None
    marker_len = 0
    if use_engine:
        llm = LLM(model_path, dtype="float32", device="cpu", seed=0)
        marker_len = len(llm.engine.tokenizer.marker(None))
        rollout_func = make_rollout_func(llm, think_budget=args.think_budget, solution_budget=args.solution_budget,
                                         seed=0)
    else:
        from elastic_decode import LLM

        probe = LLM(model_path, dtype="float32", device="cpu", num_kv_blocks=1)
        marker_len = len(probe.engine.tokenizer.marker(None))
        del probe
    with tempfile.TemporaryDirectory() as out:
        config = GRPOConfig(output_dir=out, per_device_train_batch_size=args.batch, num_generations=args.generations,
                            max_steps=args.steps + 1, learning_rate=1e-6, logging_steps=1, report_to=[],
                            use_cpu=True, save_strategy="no", bf16=False,
                            max_completion_length=args.think_budget + marker_len + args.solution_budget)
        # A model object, not the path: a checkpoint converted from GGUF names no architecture,
        # which TRL's loader needs.
        model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32)
        trainer = GRPOTrainer(model=model, reward_funcs=reward, args=config, train_dataset=Dataset.from_list(prompts),
                              rollout_func=rollout_func)
        trainer.train()
    times = [h["step_time"] for h in trainer.state.log_history if "step_time" in h][1:]
    lengths = [h["completions/mean_length"] for h in trainer.state.log_history if "step_time" in h][1:]
    sync = statistics.mean(rollout_func.sync_seconds) if rollout_func else float("nan")
    return statistics.mean(times), statistics.mean(lengths), sync


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None, help="HF checkpoint dir (default: the embedded SmolLM2-135M-Instruct)")
    p.add_argument("--steps", type=int, default=4, help="timed steps per backend (after one warm-up step)")
    p.add_argument("--batch", type=int, default=16, help="completions per step")
    p.add_argument("--generations", type=int, default=4, help="completions per prompt (num_generations)")
    p.add_argument("--think-budget", type=int, default=32)
    p.add_argument("--solution-budget", type=int, default=32)
    args = p.parse_args()
    os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
    from elastic_decode.models.loader import resolve_checkpoint

    model_path = str(resolve_checkpoint(args.model))
    torch.manual_seed(0)
    ours, ours_len, sync = run(model_path, True, args)
    theirs, theirs_len, _ = run(model_path, False, args)
    print(f"\nTRL GRPOTrainer, {args.batch} completions/step (groups of {args.generations}), t={args.think_budget}, "
          f"s={args.solution_budget}, {args.steps} timed steps, torch threads {torch.get_num_threads()}")
    print("| rollout backend | s/step | mean completion tokens (sampled) |")
    print("|---|---:|---:|")
    print(f"| elastic_decode rollout_func | {ours:.2f} | {ours_len:.1f} |")
    print(f"| TRL transformers generate | {theirs:.2f} | {theirs_len:.1f} |")
    print(f"ratio (TRL / ours): {theirs / ours:.2f}x; weight sync into the engine {sync * 1000:.0f} ms/step")


if __name__ == "__main__":
    main()
