"""The GRPO trainer end to end on a tiny random model (CPU): logprob agreement with the engine,
weight sync, a smoke run with checkpoints, resume, and the CLI's one-line errors."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from transformers import AutoModelForCausalLM

from elastic_decode import LLM, SamplingParams
from elastic_decode.train.__main__ import main
from elastic_decode.train.trainer import GRPOTrainer, sequence_logprobs
from engines import tiny_grpo_config

pytestmark = pytest.mark.slow


def test_trainer_logprobs_equal_the_engines(tiny_llama):
    """Left-padded ragged prompts in the trainer give the logprobs the engine sampled with."""
    llm = LLM(str(tiny_llama), dtype="float32", device="cpu", seed=0)
    prompts = [[1, 5, 9, 300], [7, 8], [42, 43, 44, 45, 46, 47, 48]]
    batch = llm.generate_tensors(prompts, SamplingParams(n=2, temperature=0.8, max_tokens=6, seed=3))
    model = AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32)
    logprobs, entropy = sequence_logprobs(model, batch.prompt_ids, batch.completion_ids, batch.completion_mask,
                                          pad_id=0, temperature=0.8, with_entropy=True)
    mask = batch.completion_mask.bool()
    assert (logprobs - batch.logprobs)[mask].abs().max().item() < 1e-4
    assert (entropy[mask] > 0).all()


def greedy_hf(model, prompts, max_new_tokens):
    model.eval()
    out = []
    for ids in prompts:
        x = torch.tensor([ids])
        y = model.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=max_new_tokens, do_sample=False,
                           use_cache=True, pad_token_id=0)
        out.append(y[0, len(ids):].tolist())
    return out


@pytest.fixture(scope="module")
def smoke_run(tiny_llama, tmp_path_factory):
    """3 steps with a checkpoint at step 2 and the final one at step 3."""
    out = tmp_path_factory.mktemp("grpo")
    config = tiny_grpo_config(tiny_llama, out, checkpoint_interval=2)
    trainer = GRPOTrainer(config, use_tqdm=False)
    final = trainer.train()
    return config, trainer, final


def test_smoke_run_writes_metrics_checkpoints_and_plot(smoke_run):
    config, trainer, final = smoke_run
    out = trainer.output_dir
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3]
    for key in ("reward_mean", "reward_std", "accuracy", "think_tokens", "solution_tokens", "forced_tokens",
                "clip_fraction", "entropy", "rollout_seconds", "train_seconds", "weight_sync_seconds", "logprob_gap"):
        assert all(key in r for r in rows), key
    # Thinking is bounded by t* = 4 and every marker was forced or written by the model.
    assert all(r["think_tokens"] <= config.think_budget for r in rows)
    assert all(r["logprob_gap"] < 1e-4 for r in rows)  # engine and trainer agree (fp32)
    assert final == out / "checkpoint-3" and (out / "checkpoint-2" / "trainer_state.pt").is_file()
    assert (out / "training.png").stat().st_size > 1000


def test_engine_matches_the_trained_model_after_sync(smoke_run, tiny_llama):
    _, trainer, _ = smoke_run
    initial = AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32)
    changed = max((p - q).abs().max().item() for p, q in zip(trainer.policy.parameters(), initial.parameters()))
    assert changed > 1e-3  # the steps moved the weights, so the comparison below means something
    prompts = [[1, 5, 9, 300], [7, 8, 9]]
    greedy = SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True)
    engine_tokens = [c.token_ids for o in trainer.engine.generate(prompts, greedy, use_tqdm=False) for c in o.outputs]
    assert engine_tokens == greedy_hf(trainer.policy, prompts, 8)
    trainer.policy.train()


def test_checkpoint_reloads_in_the_engine(smoke_run):
    _, trainer, final = smoke_run
    reloaded = LLM(str(final), dtype="float32", device="cpu")
    prompts = [[3, 4, 5, 6]]
    greedy = SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True)
    assert reloaded.generate(prompts, greedy, use_tqdm=False)[0].outputs[0].token_ids == \
        trainer.engine.generate(prompts, greedy, use_tqdm=False)[0].outputs[0].token_ids


def test_resume_redoes_the_same_last_step(smoke_run):
    config, trainer, _ = smoke_run
    out = trainer.output_dir
    before = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    resumed = GRPOTrainer(config, resume_from=out / "checkpoint-2", use_tqdm=False)
    assert resumed.step == 2
    resumed.train()
    after = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in after] == [1, 2, 3]
    for key in ("rollout_tokens", "think_tokens", "reward_mean"):
        assert after[2][key] == before[2][key], key


def test_refuses_to_overwrite_a_run(smoke_run):
    config, _, _ = smoke_run
    with pytest.raises(ValueError, match="already holds a run"):
        GRPOTrainer(config, use_tqdm=False)


@pytest.mark.parametrize(
    "args, message",
    [
        (["--task", "sudoku"], "unknown task"),
        (["--group-size", "1"], "group_size must be an integer >= 2"),
        (["--think-budget", "-1"], "think_budget must be an integer >= 0"),
        (["--solution-budget", "-5"], "solution_budget must be an integer >= 1"),
        (["--loss-aggregation", "mean"], "loss_aggregation must be one of"),
        (["--task", "{empty}"], "is empty"),
        (["--task", "{no_answer}"], 'no "answer"'),
        (["--config", "{bad_config}"], "unknown GRPOConfig field(s): group"),
        (["--model", "/nonexistent/model"], "model path not found"),
        (["--num-scheduler-steps", "0"], "num_scheduler_steps must be an integer >= 1"),
        (["--cuda-graphs", "--device", "cpu"], "cuda_graphs needs a CUDA device"),
    ],
)
def test_cli_reports_bad_input_in_one_line(tmp_path, capsys, args, message):
    (tmp_path / "empty.jsonl").write_text("\n")
    (tmp_path / "no_answer.jsonl").write_text(json.dumps({"prompt": "2+2?"}) + "\n")
    (tmp_path / "bad_config.json").write_text(json.dumps({"group": 4}))
    args = [a.format(empty=tmp_path / "empty.jsonl", no_answer=tmp_path / "no_answer.jsonl",
                     bad_config=tmp_path / "bad_config.json") for a in args]
    assert main([*args, "--output-dir", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and message in err[0], err


def test_cli_help_documents_every_field():
    out = subprocess.run([sys.executable, "-m", "elastic_decode.train", "--help"], capture_output=True, text=True)
    assert out.returncode == 0
    text = " ".join(out.stdout.split())
    for flag in ("--think-budget", "--solution-budget", "--group-size", "--epsilon-high", "--kl-coef",
                 "--loss-aggregation", "--mask-forced-tokens", "--no-mask-forced-tokens", "--resume", "--config"):
        assert flag in text, flag
    assert "clip-higher" in text and "token-mean (DAPO" in text


def test_sft_and_grpo_resolve_their_dtypes_alike():
    from train.trainer import resolve_dtypes

    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert resolve_dtypes("auto", cpu) == ("float32", None)
    assert resolve_dtypes("auto", cuda) == ("bfloat16", torch.bfloat16)
    assert resolve_dtypes("float32", cuda) == ("float32", None)
    assert resolve_dtypes("bfloat16", cpu) == ("bfloat16", torch.bfloat16)  # explicit: autocast on CPU too
    assert resolve_dtypes("float16", cuda) == ("float16", torch.float16)


def test_rollout_engine_settings_reach_the_engine(tiny_llama, tmp_path):
    trainer = GRPOTrainer(tiny_grpo_config(tiny_llama, tmp_path / "run", num_scheduler_steps=3), use_tqdm=False)
    assert trainer.engine.engine.config.num_scheduler_steps == 3
    assert not trainer.engine.engine.config.cuda_graphs
