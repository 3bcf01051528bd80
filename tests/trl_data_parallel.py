"""Run by tests/test_trl.py under `torchrun --nproc-per-node 2`: TRL's GRPOTrainer with one engine per
rank as its rollout backend (what `accelerate launch` sets up on GPUs). Each rank writes what it saw."""
import json
import os
import sys

os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")

import torch  # noqa: E402
from datasets import Dataset  # noqa: E402
from trl import GRPOConfig, GRPOTrainer  # noqa: E402

from elastic_decode import LLM, SamplingParams  # noqa: E402
from elastic_decode.integrations.trl import make_rollout_func  # noqa: E402

model_path, out = sys.argv[1], sys.argv[2]
llm = LLM(model_path, dtype="float32", device="cpu", seed=0, kv_cache_memory_gb=0.05, max_model_len=256)
rollout = make_rollout_func(llm, think_budget=4, solution_budget=4, seed=0)
prompts_seen = []


def recording(prompts, trainer):
    prompts_seen.append(len(prompts))
    return rollout(prompts, trainer)


def reward(completions, **kwargs):
    return [float(len(str(c)) % 3) for c in completions]


dataset = Dataset.from_list([{"prompt": [{"role": "user", "content": f"What is {i} + {i}?"}]} for i in range(8)])
args = GRPOConfig(output_dir=out, per_device_train_batch_size=2, num_generations=2, max_steps=2, learning_rate=1e-2,
                  logging_steps=1, report_to=[], use_cpu=True, save_strategy="no", max_completion_length=16, bf16=False)
trainer = GRPOTrainer(model=model_path, reward_funcs=reward, args=args, train_dataset=dataset, rollout_func=recording)
trainer.train()
rollout([[{"role": "user", "content": "sync"}]] * 2, trainer)  # a new step: the trained weights reach the engine
prompt = [1, 5, 9, 300, 7]
ours = llm.generate([prompt], SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True),
                    use_tqdm=False)[0].outputs[0].token_ids
model = trainer.accelerator.unwrap_model(trainer.model).eval()
x = torch.tensor([prompt])
theirs = model.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=8, do_sample=False,
                        pad_token_id=0)[0, len(prompt):].tolist()
rank = trainer.accelerator.process_index
with open(os.path.join(out, f"rank{rank}.json"), "w") as f:
    json.dump({"world": trainer.accelerator.num_processes, "rollouts": prompts_seen, "syncs": len(rollout.sync_seconds),
               "engine": ours, "trainer": theirs}, f)
