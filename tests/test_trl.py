"""The TRL rollout backend: real GRPOTrainer steps on a tiny model, env_mask of forced tokens,
weight sync, and the grouping of TRL's repeated prompts."""
from __future__ import annotations

import importlib.metadata
import os
from types import SimpleNamespace

import pytest
import torch
from transformers import AutoModelForCausalLM

from elastic_decode import LLM, ElasticDecodeError, SamplingParams
from elastic_decode.integrations import trl as integration

pytest.importorskip("trl", reason="the trl extra is not installed (pip install 'elastic_decode[trl]')")
os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")  # rollout_func is flagged experimental by TRL

pytestmark = pytest.mark.slow
THINK, SOLVE = 4, 4


@pytest.fixture(scope="module")
def trained(tiny_llama, tmp_path_factory):
    """Two GRPOTrainer steps with the engine as rollout backend; every rollout output recorded."""
    from datasets import Dataset
    from trl import GRPOConfig, GRPOTrainer

    llm = LLM(str(tiny_llama), dtype="float32", device="cpu", seed=0, kv_cache_memory_gb=0.05)
    rollout = integration.make_rollout_func(llm, think_budget=THINK, solution_budget=SOLVE, seed=0)
    outputs = []

    def recording(prompts, trainer):
        out = rollout(prompts, trainer)
        outputs.append((prompts, out))
        return out

    def reward(completions, think_tokens, forced_end, **kwargs):
        assert len(think_tokens) == len(forced_end) == len(completions)  # extra fields reach rewards
        return [float(len(str(c)) % 3) for c in completions]

    dataset = Dataset.from_list([{"prompt": [{"role": "user", "content": f"What is {i} + {i}?"}]} for i in range(8)])
    args = GRPOConfig(output_dir=str(tmp_path_factory.mktemp("trl")), per_device_train_batch_size=4,
                      num_generations=2, max_steps=2, learning_rate=1e-2, logging_steps=1, report_to=[],
                      use_cpu=True, save_strategy="no", max_completion_length=THINK + 8 + SOLVE, bf16=False)
    trainer = GRPOTrainer(model=str(tiny_llama), reward_funcs=reward, args=args, train_dataset=dataset,
                          rollout_func=recording)
    trainer.train()
    return llm, rollout, trainer, outputs


def test_two_grpo_steps_complete_and_log(trained):
    _, rollout, trainer, outputs = trained
    steps = [h for h in trainer.state.log_history if "reward" in h]
    assert [h["step"] for h in steps] == [1, 2]
    assert len(outputs) == 2 and len(rollout.sync_seconds) == 2  # one weight copy per optimizer step


def test_forced_tokens_get_env_mask_zero(trained):
    llm, _, _, outputs = trained
    marker = list(llm.engine.tokenizer.marker(None))
    checked = 0
    for _, out in outputs:
        for ids, mask, think, forced in zip(out["completion_ids"], out["env_mask"], out["think_tokens"],
                                            out["forced_end"]):
            assert len(mask) == len(ids)
            expected = [1] * len(ids)
            if forced:  # the marker right after the thinking tokens was inserted, not sampled
                assert ids[think:think + len(marker)] == marker
                expected[think:think + len(marker)] = [0] * len(marker)
                checked += 1
            assert mask == expected
    assert checked > 0  # t* = 4: the tiny model never closes its thinking by itself


def test_engine_holds_the_trainers_weights_after_a_step(trained, tiny_llama):
    llm, rollout, trainer, _ = trained
    # The next rollout (a new optimizer step) copies the weights in first.
    rollout([[{"role": "user", "content": "sync"}]] * 2, trainer)
    model = trainer.accelerator.unwrap_model(trainer.model).eval()
    initial = AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32)
    moved = max((p - q).abs().max().item() for p, q in zip(model.parameters(), initial.parameters()))
    assert moved > 1e-3  # the steps changed the weights, so equal outputs mean they were copied
    prompt = [1, 5, 9, 300, 7]
    ours = llm.generate([prompt], SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True),
                        use_tqdm=False)[0].outputs[0].token_ids
    x = torch.tensor([prompt])
    theirs = model.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=8, do_sample=False,
                            pad_token_id=0)[0, len(prompt):].tolist()
    assert ours == theirs


def fake_trainer(group: int):
    model = SimpleNamespace(training=True)
    return SimpleNamespace(state=SimpleNamespace(global_step=0), num_generations=group, num_generations_eval=group,
                           model=model, accelerator=SimpleNamespace(unwrap_model=lambda m: m))


def test_one_completion_per_entry_in_prompt_order(tiny_llama):
    llm = LLM(str(tiny_llama), dtype="float32", device="cpu", seed=0, kv_cache_memory_gb=0.05)
    rollout = integration.make_rollout_func(llm, think_budget=2, solution_budget=2, sync_weights=False)
    a, b = "first prompt", "second prompt, longer"
    out = rollout([a, a, a, b, b, b], fake_trainer(3))
    assert out["prompt_ids"] == [llm.encode(a)] * 3 + [llm.encode(b)] * 3
    assert all(len(out[k]) == 6 for k in ("completion_ids", "logprobs", "env_mask", "think_tokens"))
    # Not in whole runs of num_generations: one completion per entry, still in order.
    out = rollout([a, b, a], fake_trainer(3))
    assert out["prompt_ids"] == [llm.encode(a), llm.encode(b), llm.encode(a)]


def test_missing_or_old_trl_is_one_clear_error(monkeypatch):
    real = importlib.metadata.version
    monkeypatch.setattr(importlib.metadata, "version", lambda name: "0.29.1" if name == "trl" else real(name))
    with pytest.raises(ElasticDecodeError, match=r"trl >= 1.16, < 2 \(found 0.29.1\)"):
        integration.check_trl()

    def missing(name):
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(importlib.metadata, "version", missing)
    with pytest.raises(ElasticDecodeError, match="elastic_decode\\[trl\\]"):
        integration.check_trl()


def test_one_engine_per_rank_under_torchrun(tiny_llama, tmp_path):
    """Two ranks (gloo), each with its own engine: every rank rolls out, syncs its engine each step, and
    ends with the same trained weights in its engine as in its (DDP-synchronised) model."""
    import json
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).with_name("trl_data_parallel.py")
    run = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                          str(script), str(tiny_llama), str(tmp_path)], capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    for seen in ranks:
        assert seen["world"] == 2 and seen["rollouts"] == [2, 2] and seen["syncs"] == 3
        assert seen["engine"] == seen["trainer"]
    assert ranks[0]["engine"] == ranks[1]["engine"]
