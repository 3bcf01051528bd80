"""SFT and distillation on tiny random models (CPU): the loss masks prompts exactly, a trace is
learned with the engine's marker ids, distillation keeps only verified traces, CLI errors."""
from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

from elastic_decode import LLM, SamplingParams
from elastic_decode.engine.tokenizer import Tokenizer
from elastic_decode.train import GRPOConfig
from elastic_decode.train.__main__ import main
from elastic_decode.train.loss import sft_loss
from elastic_decode.train.sft import DISTILL_FILE, SFTTrainer, collate, encode_traces, read_trace_rows
from elastic_decode.train.tasks import make_task
from elastic_decode.train.traces import addition_rows, addition_trace
from elastic_decode.train.trainer import sequence_logprobs

pytestmark = pytest.mark.slow


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_addition_trace_is_right_and_carries():
    thinking, solution = addition_trace(478, 395)
    assert thinking.splitlines()[1:4] == [
        "Units: 8 + 5 + 0 = 13, write 3, carry 1.",
        "Tens: 7 + 9 + 1 = 17, write 7, carry 1.",
        "Hundreds: 4 + 3 + 1 = 8, write 8, carry 0.",
    ]
    assert thinking.endswith("So 478 + 395 = 873.") and solution == "The answer is \\boxed{873}."
    assert "leading digit" in addition_trace(900, 100)[0]
    checked, _ = addition_trace(478, 395, check=True)
    assert checked.startswith(thinking + "\nCheck by adding in the other order.\n")
    assert "Units: 5 + 8 + 0 = 13, write 3, carry 1." in checked and checked.endswith("The check gives 873 too.")
    for row in addition_rows(4, 20, seed=1, check=True):  # every trace's boxed answer is the task's gold answer
        assert make_task("arithmetic:4:+").score(row["solution"], _example(row), 0.0).correct


def _example(row):
    from elastic_decode.train.tasks import Example

    return Example(({"role": "user", "content": row["prompt"]},), row["answer"])


def test_sft_loss_is_hf_cross_entropy_on_completion_tokens_only(tiny_llama, tmp_path):
    """Against transformers' own loss with labels -100 on the prompt: exact masking, ragged rows."""
    data = write_jsonl(tmp_path / "t.jsonl", [
        {"prompt": "What is 2 + 2?", "thinking": "Two and two.", "solution": "\\boxed{4}"},
        {"messages": [{"role": "user", "content": "Say a long thing please"}], "completion": "ok"},
        {"prompt": "Hi", "thinking": "", "solution": "Hello there, friend."},
    ])
    tok = Tokenizer(tiny_llama, AutoConfig.from_pretrained(tiny_llama))
    examples = encode_traces(read_trace_rows(data), tok, 512)
    model = AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32)
    prompts, ids, mask = collate(examples)
    logprobs, _ = sequence_logprobs(model, prompts, ids, mask, pad_id=0, temperature=1.0)
    loss, metrics = sft_loss(logprobs, mask)
    total = sum(len(e.completion_ids) for e in examples)
    assert metrics["loss_tokens"].item() == total
    expected = 0.0
    for e in examples:  # one row at a time, no padding at all
        x = torch.tensor([e.prompt_ids + e.completion_ids])
        labels = x.clone()
        labels[0, : len(e.prompt_ids)] = -100
        expected += model(input_ids=x, labels=labels).loss.item() * len(e.completion_ids)
    assert loss.item() == pytest.approx(expected / total, rel=1e-5)


def test_trace_encoding_uses_the_engines_marker_and_eos(tiny_llama, tmp_path):
    data = write_jsonl(tmp_path / "t.jsonl", [{"prompt": "Q", "thinking": "abc", "solution": "\\boxed{1}"}])
    tok = Tokenizer(tiny_llama, AutoConfig.from_pretrained(tiny_llama))
    (ex,) = encode_traces(read_trace_rows(data), tok, 512)
    piece = lambda s: tok.hf(s, add_special_tokens=False)["input_ids"]  # noqa: E731
    assert ex.completion_ids == piece("abc") + list(tok.marker(None)) + piece("\\boxed{1}") + [tok.eos_ids[0]]
    assert ex.prompt_ids == tok.encode_chat([{"role": "user", "content": "Q"}])


def sft_config(model, out, data, **overrides):
    values = dict(mode="sft", model=str(model), sft_data=str(data), output_dir=str(out), epochs=40, batch_size=2,
                  micro_batch_size=1, learning_rate=1e-2, device="cpu", gradient_checkpointing=False)
    values.update(overrides)
    return GRPOConfig(**values)


@pytest.fixture(scope="module")
def sft_run(tiny_llama, tmp_path_factory):
    """A tiny model memorises two traces; returns (config, checkpoint, rows)."""
    root = tmp_path_factory.mktemp("sft")
    rows = [
        {"prompt": "What is 3 + 4? Put your final answer in \\boxed{}.", "thinking": "Three plus four.",
         "solution": "\\boxed{7}"},
        {"prompt": "What is 2 + 3? Put your final answer in \\boxed{}.", "thinking": "Two plus three.",
         "solution": "\\boxed{6}"},  # wrong on purpose: distillation must reject it
    ]
    data = write_jsonl(root / "traces.jsonl", rows)
    config = sft_config(tiny_llama, root / "run", data)
    checkpoint = SFTTrainer(config, use_tqdm=False).train()
    return config, checkpoint, rows


def test_sft_learns_the_trace_and_the_engine_closes_thinking_with_it(sft_run):
    config, checkpoint, rows = sft_run
    metrics = [json.loads(line) for line in (checkpoint.parent / "metrics.jsonl").read_text().splitlines()]
    assert len(metrics) == 40 and metrics[-1]["loss"] < 0.05 < metrics[0]["loss"]
    assert (checkpoint.parent / "training.png").is_file()
    llm = LLM(str(checkpoint), dtype="float32", device="cpu", kv_cache_memory_gb=0.05)
    out = llm.chat([[{"role": "user", "content": r["prompt"]}] for r in rows],
                   SamplingParams(temperature=0, think_budget=64, solution_budget=16))
    for r, o in zip(rows, out):
        c = o.outputs[0]
        # The model closed its thinking itself with the marker ids it was trained on, then stopped.
        assert not c.forced_end and c.finish_reason == "stop"
        assert c.thinking_text == r["thinking"] and c.solution_text == r["solution"]


def test_distill_keeps_only_verified_traces(sft_run, tmp_path):
    _, teacher, rows = sft_run
    task_file = write_jsonl(tmp_path / "task.jsonl", [{"prompt": rows[0]["prompt"], "answer": "7"},
                                                      {"prompt": rows[1]["prompt"], "answer": "5"}])
    config = GRPOConfig(mode="distill", teacher=str(teacher), model=str(teacher), task=str(task_file),
                        distill_prompts=2, group_size=3, think_budget=32, solution_budget=16, temperature=0.05,
                        epochs=1, batch_size=4, learning_rate=1e-4, output_dir=str(tmp_path / "d"), device="cpu",
                        kv_cache_memory_gb=0.05, gradient_checkpointing=False)
    SFTTrainer(config, use_tqdm=False).train()
    kept = [json.loads(line) for line in (tmp_path / "d" / DISTILL_FILE).read_text().splitlines()]
    # The teacher answers 7 (right) three times and 6 (wrong: the gold is 5) three times.
    assert len(kept) == 3
    assert all(k["answer"] == "7" and k["solution"] == "\\boxed{7}" for k in kept)
    assert all(k["messages"][0]["content"] == rows[0]["prompt"] for k in kept)


def test_distill_with_nothing_correct_is_one_error(sft_run, tmp_path, capsys):
    _, teacher, rows = sft_run
    task_file = write_jsonl(tmp_path / "task.jsonl", [{"prompt": rows[1]["prompt"], "answer": "5"}])
    code = main(["--mode", "distill", "--teacher", str(teacher), "--model", str(teacher), "--task", str(task_file),
                 "--distill-prompts", "1", "--group-size", "2", "--temperature", "0.05", "--device", "cpu",
                 "--kv-cache-memory-gb", "0.05", "--output-dir", str(tmp_path / "d"), "--no-progress"])
    assert code == 2
    err = capsys.readouterr().err
    assert "nothing to distill" in err and "0 of 2 traces" in err


@pytest.mark.parametrize(
    "rows, message",
    [
        ([{"prompt": "q", "thinking": "a"}], '"solution" must be a string'),
        ([{"prompt": "q", "thinking": "a", "solution": "b", "completion": "c"}], 'either "thinking" and "solution"'),
        ([{"thinking": "a", "solution": "b"}], 'non-empty "prompt"'),
        ([{"prompt": "q", "completion": "  "}], "the trace is empty"),
        ([{"prompt": "q", "completion": "x" * 3000}], "context"),
    ],
)
def test_bad_traces_are_one_line_errors(tiny_llama, tmp_path, capsys, rows, message):
    data = write_jsonl(tmp_path / "bad.jsonl", rows)
    code = main(["--mode", "sft", "--model", str(tiny_llama), "--sft-data", str(data),
                 "--output-dir", str(tmp_path / "o")])
    assert code == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err and "line 1" in err


def test_mode_settings_are_checked(capsys, tmp_path):
    assert main(["--mode", "sft"]) == 2
    assert "mode sft needs sft_data" in capsys.readouterr().err
    assert main(["--mode", "distill"]) == 2
    assert "needs a teacher" in capsys.readouterr().err
    assert main(["--mode", "tune"]) == 2
    assert "mode must be one of grpo, sft, distill" in capsys.readouterr().err
