"""Asynchronous GRPO (train/async_rollouts.py): K = 0 is the synchronous trainer step for step, K = 1
trains no token older than one step, an in-flight weight update keeps the earlier tokens' versions and
logprobs, budgets drawn per rollout group reach the engine; the budget schedules and --report-to."""
from __future__ import annotations

import json
import random
import threading
import time

import pytest
import torch
from safetensors.torch import load_file

from elastic_decode import LLM, ElasticDecodeError, SamplingParams
from elastic_decode.train import GRPOConfig
from elastic_decode.train.async_rollouts import RolloutProducer
from elastic_decode.train.schedule import BudgetSchedule

from conftest import make_tiny_checkpoint
from engines import tiny_grpo_config


# -- the schedules (no model) ------------------------------------------------------------------------------


@pytest.mark.parametrize("text, steps, want", [
    ("constant", [1, 5, 10], [7, 7, 7]),
    ("linear:64:16", [1, 4, 10], [64, 48, 16]),  # 64 + (16 - 64) * 3/9 = 48
    ("step:64,32@4,16@8", [1, 3, 4, 7, 8, 10], [64, 64, 32, 32, 16, 16]),
])
def test_scheduled_budgets(text, steps, want):
    schedule = BudgetSchedule.parse(text)
    got = [schedule.budgets(s, 10, 3, 7, random.Random(0)) for s in steps]
    assert got == [[w] * 3 for w in want]


def test_a_chosen_budget_per_group_from_the_set():
    schedule = BudgetSchedule.parse("choice:8,16,32")
    drawn = schedule.budgets(1, 10, 200, 7, random.Random(0))
    assert set(drawn) == {8, 16, 32}
    assert drawn == schedule.budgets(1, 10, 200, 7, random.Random(0))  # seeded


@pytest.mark.parametrize("text, said", [("cosine", "start with one of"), ("linear:5", "linear:START:END"),
                                        ("step:8@2", "starts at step 1"), ("step:8,4", "increasing @STEP"),
                                        ("choice:", "needs budgets"), ("choice:8,x", "not an integer"),
                                        ("constant:3", "takes no values")])
def test_a_bad_schedule_is_one_clear_error(tmp_path, text, said):
    with pytest.raises(ValueError, match=said):
        GRPOConfig(output_dir=str(tmp_path), think_budget_schedule=text)


def test_report_to_and_correction_settings_are_checked(tmp_path):
    for bad in ({"report_to": "tensorbored"}, {"report_to": "none,wandb"}, {"importance_sampling_mode": "tis"},
                {"importance_sampling_correction": "yes"}, {"max_staleness": -1},
                {"importance_sampling_clip_min": 4.0}):
        with pytest.raises(ValueError):
            GRPOConfig(output_dir=str(tmp_path), **bad)
    assert GRPOConfig(output_dir=str(tmp_path), async_rollouts=True).corrects_off_policy
    assert not GRPOConfig(output_dir=str(tmp_path), async_rollouts=True, max_staleness=0).corrects_off_policy
    assert not GRPOConfig(output_dir=str(tmp_path)).corrects_off_policy
    assert GRPOConfig(output_dir=str(tmp_path), importance_sampling_correction="on").corrects_off_policy
    assert GRPOConfig(output_dir=str(tmp_path), think_budget=8, think_budget_schedule="choice:4,32",
                      solution_budget=10).max_completion_length == 32 + 8 + 10


# -- the engine: in-flight updates --------------------------------------------------------------------------


def wait_until(condition, seconds: float = 60.0) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.001)


@pytest.mark.slow
def test_an_in_flight_update_keeps_the_earlier_tokens(tiny_llama, tmp_path):
    """A long greedy rollout on one thread, other weights loaded in flight from another as version "v1": the
    tokens before the update are those of a run without it, with their logprobs and version "0"; the tokens
    after are what the new weights continue the same prefix with, version "v1"."""
    llm = LLM(str(tiny_llama), dtype="float32", device="cpu", seed=0, kv_cache_memory_gb=0.05)
    params = SamplingParams(temperature=0.0, max_tokens=300, ignore_eos=True)
    prompt = [1, 5, 9, 300, 7]
    plain = llm.generate_tensors([prompt], params)
    other = make_tiny_checkpoint("llama", tmp_path / "other", tiny_llama, seed=7)
    weights = load_file(str(other / "model.safetensors"))
    box = {}
    thread = threading.Thread(target=lambda: box.setdefault("out", llm.generate_tensors([prompt], params)))
    thread.start()
    engine = llm.engine  # some tokens first, so that the update lands mid-rollout
    wait_until(lambda: any(len(s.output_ids) >= 20 for r in list(engine.requests.values()) for s in r.seqs))
    assert llm.load_weights_in_flight(weights.items(), version="v1") > 0
    thread.join(120)
    out = box["out"]
    runs = out.weight_versions[0]
    assert [v for _, v in runs] == ["0", "v1"], runs
    k = runs[1][0]
    assert 20 <= k < 300
    assert torch.equal(out.completion_ids[0, :k], plain.completion_ids[0, :k])
    assert torch.equal(out.logprobs[0, :k], plain.logprobs[0, :k])
    fresh = LLM(str(other), dtype="float32", device="cpu", seed=0, kv_cache_memory_gb=0.05)
    rest = fresh.generate_tensors([prompt + out.completion_ids[0, :k].tolist()],
                                  SamplingParams(temperature=0.0, max_tokens=300 - k, ignore_eos=True))
    assert torch.equal(out.completion_ids[0, k:], rest.completion_ids[0])
    assert torch.allclose(out.logprobs[0, k:], rest.logprobs[0], atol=1e-5)
    assert llm.generate_tensors([prompt], params).weight_versions[0] == [(0, "v1")]  # none running: at once


@pytest.mark.slow
def test_cancel_running_ends_a_call_and_frees_its_requests(tiny_llama):
    llm = LLM(str(tiny_llama), dtype="float32", device="cpu", seed=0, kv_cache_memory_gb=0.05)
    box = {}

    def run():
        try:
            llm.generate_tensors([[1, 5, 9]], SamplingParams(max_tokens=400, ignore_eos=True))
        except ElasticDecodeError as e:
            box["error"] = e
    thread = threading.Thread(target=run)
    thread.start()
    wait_until(lambda: llm._generating and llm.engine.stats()["running"])  # noqa: SLF001
    llm.cancel_running()
    thread.join(60)
    assert "cancelled" in str(box["error"]) and llm.engine.stats()["kv_blocks_used"] == 0


# -- the producer alone (a fake rollout) ----------------------------------------------------------------------


def test_the_producer_runs_at_most_k_steps_ahead():
    started = []
    producer = RolloutProducer(lambda s: started.append(s) or f"rollout {s}", first=1, last=6, max_staleness=1)
    wait_until(lambda: started == [1, 2])  # step 3 needs step 1's weights
    time.sleep(0.05)
    assert started == [1, 2]
    assert producer.get(1) == ("rollout 1", pytest.approx(0.0, abs=1.0))
    producer.synced(1)
    wait_until(lambda: started == [1, 2, 3])
    producer.synced(2)
    wait_until(lambda: started == [1, 2, 3, 4])
    assert producer.get(2)[0] == "rollout 2" and producer.get(4)[0] == "rollout 4"
    producer.stop()
    producer.join(5)


def test_the_producers_failure_reaches_the_trainer():
    def make(step):
        if step == 2:
            raise RuntimeError("engine on fire")
        return step
    producer = RolloutProducer(make, first=1, last=3, max_staleness=2)
    assert producer.get(1)[0] == 1
    with pytest.raises(RuntimeError, match="on fire"):
        producer.get(2)
    producer.join(5)


# -- the trainer ------------------------------------------------------------------------------------------------


def rows_of(out) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.slow
def test_k0_is_the_synchronous_trainer(tiny_llama, tmp_path):
    from elastic_decode.train.trainer import GRPOTrainer

    runs = {}
    for name, extra in (("sync", {}), ("async", {"async_rollouts": True, "max_staleness": 0})):
        config = tiny_grpo_config(tiny_llama, tmp_path / name, **extra)  # the defaults: no correction at K = 0
        trainer = GRPOTrainer(config, use_tqdm=False)
        final = trainer.train()
        runs[name] = (rows_of(tmp_path / name), load_file(str(final / "model.safetensors")))
    (sync_rows, sync_w), (async_rows, async_w) = runs["sync"], runs["async"]
    for a, b in zip(sync_rows, async_rows, strict=True):
        for key in ("reward_mean", "think_tokens", "rollout_tokens", "loss_tokens"):
            assert a[key] == b[key], key
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-6, abs=1e-9)
        assert b["staleness_max"] == 0
    assert max((sync_w[k] - async_w[k]).abs().max().item() for k in sync_w) < 1e-6


@pytest.mark.slow
def test_k1_trains_no_token_older_than_one_step(tiny_llama, tmp_path):
    from elastic_decode.train.trainer import GRPOTrainer

    config = tiny_grpo_config(tiny_llama, tmp_path / "run", async_rollouts=True, max_staleness=1, steps=4,
                              solution_budget=40)
    trainer = GRPOTrainer(config, use_tqdm=False)
    seen = []
    optimize = trainer.optimize

    def recording(rollout, step):
        seen.append((step, rollout.token_steps[rollout.completion_mask.bool()].clone()))
        return optimize(rollout, step)

    trainer.optimize = recording
    trainer.train()
    rows = rows_of(tmp_path / "run")
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    for step, token_steps in seen:
        assert ((step - 1) - token_steps).max().item() <= 1
    assert max(r["staleness_max"] for r in rows) == 1  # the producer ran ahead: overlap happened
    for r in rows:  # the correction is on (auto with async) and reported
        assert {"is_ratio_mean", "is_ratio_max", "is_clipped_fraction", "staleness_0", "staleness_1",
                "rollout_wait_seconds", "producer_wait_seconds"} <= set(r)
        assert r["staleness_0"] + r["staleness_1"] == pytest.approx(1.0)
        assert r["stale_tokens_dropped"] == 0


@pytest.mark.slow
def test_budgets_drawn_per_group_reach_the_engine(tiny_llama, tmp_path):
    from elastic_decode.train.trainer import GRPOTrainer

    config = tiny_grpo_config(tiny_llama, tmp_path / "run", think_budget_schedule="choice:1,3,6",
                              prompts_per_step=6, group_size=2)
    trainer = GRPOTrainer(config, use_tqdm=False)
    rollout = trainer.rollout(1)
    budgets = rollout.think_budgets.tolist()
    assert set(budgets) <= {1, 3, 6} and len(set(budgets)) > 1
    assert budgets[0::2] == budgets[1::2]  # a group shares its budget
    think = rollout.think_tokens.tolist()
    assert all(t <= b for t, b in zip(think, budgets)), (think, budgets)  # the engine forced the marker there
    assert any(t == b for t, b in zip(think, budgets) if b > 1)  # and the budgets differ by group, not by luck


@pytest.mark.slow
def test_report_to_tensorboard_writes_events(tiny_llama, tmp_path):
    pytest.importorskip("tensorboard")
    from elastic_decode.train.trainer import GRPOTrainer

    config = tiny_grpo_config(tiny_llama, tmp_path / "run", steps=2, report_to="tensorboard")
    trainer = GRPOTrainer(config, use_tqdm=False)
    trainer.train()
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(tmp_path / "run" / "tensorboard"))
    events.Reload()
    assert [e.step for e in events.Scalars("reward_mean")] == [1, 2]
