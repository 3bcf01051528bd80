"""Elastic Reasoning training with TRL's GRPOTrainer, rollouts by elastic_decode.

    pip install -e '.[trl]'
    python examples/trl_elastic_grpo.py --task arithmetic:1:+ --think-budget 32 --solution-budget 32 --steps 20
    python examples/trl_elastic_grpo.py --model PATH --task data.jsonl --think-budget 1024 --solution-budget 512

Each rollout thinks for at most --think-budget tokens, gets the end-of-thinking marker forced
there (inside the sampler, no second prefill), and answers in at most --solution-budget tokens:
the budget-constrained rollout of "Scalable Chain of Thoughts via Elastic Reasoning". The forced
marker tokens come back with env_mask 0, so TRL conditions on them without training on them.
The reward is elastic_decode.train's: 1 for a correct \\boxed{} answer after the marker, plus
--format-weight for any boxed answer there. Tasks: arithmetic[:D[:OPS]], countdown[:N] (made on
the fly) or a JSONL file of {"prompt"|"messages", "answer"} rows.
"""
from __future__ import annotations

import argparse
import os
import random
import sys

os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")  # TRL flags rollout_func as experimental


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None, help="HF checkpoint dir or .gguf (default: embedded SmolLM2-135M-Instruct)")
    p.add_argument("--task", default="arithmetic:1:+", help="synthetic task spec or JSONL dataset")
    p.add_argument("--num-prompts", type=int, default=256, help="prompts drawn from a synthetic task")
    p.add_argument("--think-budget", type=int, default=32, help="t*: thinking tokens before the marker is forced")
    p.add_argument("--solution-budget", type=int, default=32, help="s*: solution tokens after the marker")
    p.add_argument("--num-generations", type=int, default=8, help="G: completions per prompt")
    p.add_argument("--batch-size", type=int, default=16, help="completions per device step")
    p.add_argument("--steps", type=int, default=20, help="optimizer steps")
    p.add_argument("--learning-rate", type=float, default=5e-5)
    p.add_argument("--temperature", type=float, default=0.7)
    p.add_argument("--format-weight", type=float, default=0.5, help="reward for any boxed answer after the marker")
    p.add_argument("--output-dir", default="runs/trl-elastic")
    args = p.parse_args()

    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM
    from trl import GRPOConfig, GRPOTrainer

    from elastic_decode import LLM, ElasticDecodeError
    from elastic_decode.integrations.trl import make_rollout_func
    from elastic_decode.models.loader import resolve_checkpoint
    from elastic_decode.train.tasks import JsonlTask, make_task

    try:
        task = make_task(args.task)
        path = str(resolve_checkpoint(args.model))
        examples = task.examples if isinstance(task, JsonlTask) else task.sample(random.Random(0), args.num_prompts)
    except ValueError as e:  # ElasticDecodeError is one too
        print(f"error: {e}", file=sys.stderr)
        return 2
    rows = [{"prompt": list(ex.messages), "example": i} for i, ex in enumerate(examples)]

    def elastic_reward(completions, example, solution_text, **kwargs):
        """Graded on the text after the end-of-thinking marker (an extra field of the rollout)."""
        return [task.score(text, examples[i], args.format_weight).reward for text, i in zip(solution_text, example)]

    on_gpu = torch.cuda.is_available()
    llm = LLM(path, seed=0, kv_cache_memory_gb=None if not on_gpu else 4.0)
    rollout_func = make_rollout_func(llm, think_budget=args.think_budget, solution_budget=args.solution_budget,
                                     temperature=args.temperature, seed=0)
    marker = len(llm.engine.tokenizer.marker(None))
    config = GRPOConfig(
        output_dir=args.output_dir,
        per_device_train_batch_size=args.batch_size,
        num_generations=args.num_generations,
        max_steps=args.steps,
        learning_rate=args.learning_rate,
        temperature=args.temperature,  # TRL recomputes logprobs at this temperature, as the engine samples
        max_completion_length=args.think_budget + marker + args.solution_budget,
        logging_steps=1,
        report_to=[],
        save_strategy="no",
        use_cpu=not on_gpu,
        bf16=on_gpu,
    )
    # A model object rather than the path: a checkpoint converted from GGUF names no architecture.
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    trainer = GRPOTrainer(model=model, reward_funcs=elastic_reward, args=config,
                          train_dataset=Dataset.from_list(rows), rollout_func=rollout_func)
    try:
        trainer.train()
    except ElasticDecodeError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    trainer.save_model(args.output_dir)
    rewards = [h["reward"] for h in trainer.state.log_history if "reward" in h]
    sync = sum(rollout_func.sync_seconds)
    print(f"{len(rewards)} steps: reward {rewards[0]:.3f} (first) -> {rewards[-1]:.3f} (last); weight sync "
          f"{sync:.2f} s in all; model saved to {args.output_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
