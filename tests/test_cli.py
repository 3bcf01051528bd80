"""`python -m elastic_decode.generate` as a user runs it (subprocesses)."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest


def run_cli(*args, timeout=300):
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    return subprocess.run([sys.executable, "-m", "elastic_decode.generate", *map(str, args)],
                          capture_output=True, text=True, timeout=timeout, env=env)


def assert_clean_error(result, message):
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    lines = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and message in lines[0], result.stderr


@pytest.mark.slow
def test_prompt_alone_shows_thinking_forced_marker_and_solution():
    result = run_cli("--prompt", "Explain briefly why the sky is blue.", "--seed", "3")
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert "[thinking: 48 tokens]" in out
    assert "[end of thinking forced: budget spent]" in out
    assert "[solution:" in out
    assert "1 requests, 1 completions" in out and "tokens/s" in out
    # what ran it: the CPU default is the C++ kernels, in bf16 where the CPU has it natively
    from elastic_decode.kernels import cpu
    assert f"({'bfloat16' if cpu.native_bf16() else 'float32'} on cpu, cpu kernels)" in out


def test_jsonl_in_and_out_with_several_completions(tiny_llama, tmp_path):
    prompts = tmp_path / "in.jsonl"
    prompts.write_text(
        json.dumps({"prompt": "Count to three:"}) + "\n\n"
        + json.dumps({"messages": [{"role": "user", "content": "Say hi"}], "id": 7}) + "\n"
    )
    out = tmp_path / "out.jsonl"
    result = run_cli("--model", tiny_llama, "--prompts-file", prompts, "--output", out, "-n", "2",
                     "--think-budget", "6", "--solution-budget", "5", "--end-think", "</think>", "--seed", "1")
    assert result.returncode == 0, result.stderr
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(rows) == 2 and rows[1]["id"] == 7 and rows[0]["prompt"] == "Count to three:"
    for row in rows:
        assert len(row["completions"]) == 2
        for c in row["completions"]:
            for key in ("text", "thinking_text", "solution_text", "token_ids", "logprobs", "forced_mask",
                        "think_tokens", "solution_tokens", "forced_end", "finish_reason"):
                assert key in c
            assert len(c["token_ids"]) == len(c["logprobs"]) == len(c["forced_mask"])
            assert c["think_tokens"] <= 6 and c["solution_tokens"] <= 5
    assert "2 requests, 4 completions" in result.stdout


@pytest.mark.parametrize("args, message", [
    (["--prompt", "hi", "--think-budget", "-3"], "must be a non-negative integer or 'none'"),
    (["--prompt", "hi", "--solution-budget", "2.5"], "must be a non-negative integer or 'none'"),
    (["--prompt", "hi", "--top-p", "0"], "top_p must be a number in (0.0, 1.0]"),
    (["--prompt", "hi", "--top-p", "1.2"], "top_p must be a number in (0.0, 1.0]"),
    (["--prompt", "hi", "--temperature", "-1"], "temperature must be"),
    (["--prompt", "   "], "prompt 0 is empty"),
    ([], "no prompts"),
    (["--prompt", "hi", "--model", "/no/such/model"], "model path not found: /no/such/model"),
    (["--prompts-file", "/no/such/file.jsonl"], "cannot read --prompts-file"),
])
def test_bad_input_is_one_line_without_traceback(args, message):
    assert_clean_error(run_cli(*args), message)


def test_unreadable_gguf_files(tmp_path):
    junk = tmp_path / "junk.gguf"
    junk.write_bytes(b"not a model at all")
    assert_clean_error(run_cli("--prompt", "hi", "--model", junk), "is not a GGUF file")
    broken = tmp_path / "broken.gguf"
    broken.write_bytes(b"GGUF" + b"\x00" * 64)
    env_cache = tmp_path / "cache"
    result = subprocess.run([sys.executable, "-m", "elastic_decode.generate", "--prompt", "hi", "--model", str(broken)],
                            capture_output=True, text=True, timeout=300,
                            env={**os.environ, "ELASTIC_DECODE_CACHE": str(env_cache)})
    assert_clean_error(result, "cannot load GGUF file")
    assert not any(env_cache.glob("gguf/*broken*")), "a failed conversion left a cache entry"


def test_prompt_longer_than_the_context(tiny_llama, tmp_path):
    prompts = tmp_path / "p.jsonl"
    prompts.write_text(json.dumps({"prompt": "word " * 100}) + "\n")
    result = run_cli("--model", tiny_llama, "--prompts-file", prompts, "--no-chat-template", "--max-model-len", "32")
    assert_clean_error(result, "context window is 32 tokens")


def test_bad_prompts_file_rows(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "ok"}\n{"text": "no prompt field"}\n')
    assert_clean_error(run_cli("--prompts-file", bad), "line 2: needs a \"prompt\" or \"messages\" field")
    bad.write_text('{"prompt": "ok"}\nnot json\n')
    assert_clean_error(run_cli("--prompts-file", bad), "line 2: not valid JSON")


def test_chat_template_on_a_model_without_one(tiny_llama, tmp_path):
    plain = tmp_path / "plain"
    shutil.copytree(tiny_llama, plain)
    (plain / "chat_template.jinja").unlink(missing_ok=True)
    config = json.loads((plain / "tokenizer_config.json").read_text())
    config.pop("chat_template", None)
    (plain / "tokenizer_config.json").write_text(json.dumps(config))
    assert_clean_error(run_cli("--model", plain, "--prompt", "hi"), "this model has no chat template")
    ok = run_cli("--model", plain, "--prompt", "hi", "--no-chat-template", "--max-tokens", "4")
    assert ok.returncode == 0, ok.stderr


# -- nothing a user can give loses finished work or ends in a traceback (in-process: quicker) ----

def main_error(capsys, argv, message, module="elastic_decode.generate"):
    import importlib

    code = importlib.import_module(module).main([str(a) for a in argv])
    err = capsys.readouterr().err
    assert code == 2, err
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and message in lines[0], err


def test_output_paths_are_checked_before_the_model_loads(tmp_path, capsys):
    a_file = tmp_path / "a_file"
    a_file.write_text("x")
    no_model = "/no/such/model"  # were the model loaded first, this would be the error
    for output, message in [(tmp_path, "is a folder; give a file path"),
                            (tmp_path / "missing" / "out.jsonl", "folder " + str(tmp_path / "missing") + " does not exist"),
                            (a_file / "out.jsonl", f"{a_file} is a file, not a folder")]:
        main_error(capsys, ["--prompt", "hi", "--output", output, "--model", no_model], message)
    main_error(capsys, ["--prompt", "hi", "--seed", 2**64], "seed must be an integer in [0, 9223372036854775807]")


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes anywhere")
def test_a_read_only_output_is_refused_up_front(tmp_path, capsys):
    tmp_path.chmod(0o555)
    try:
        main_error(capsys, ["--prompt", "hi", "--output", tmp_path / "out.jsonl"], "is not writable")
    finally:
        tmp_path.chmod(0o755)


def test_prompts_file_rows_that_cannot_be_served(tmp_path, capsys):
    rows = tmp_path / "p.jsonl"
    for text, message in [
        (json.dumps({"messages": [{"role": "user", "content": ""}]}), "line 1: a conversation has an empty message"),
        (json.dumps({"prompt": "a", "messages": [{"role": "user", "content": "b"}]}),
         'line 1: give "prompt" or "messages", not both'),
        ("", "holds no prompts"),
        ("\n   \n", "holds no prompts"),
    ]:
        rows.write_text(text)
        main_error(capsys, ["--prompts-file", rows], message)


def test_an_interrupt_keeps_every_finished_row(tiny_llama, tmp_path, capsys, monkeypatch):
    """Ctrl-C after the first prompt finished: its row is in --output (with its prompt's index),
    the summary says how many were written, the exit status is 130."""
    from elastic_decode import generate
    from elastic_decode.engine import LLMEngine

    step = LLMEngine.step
    finished = []

    def interrupted_step(self):
        if finished:
            raise KeyboardInterrupt
        out = step(self)
        finished.extend(out)
        return out

    monkeypatch.setattr(LLMEngine, "step", interrupted_step)
    out = tmp_path / "out.jsonl"
    # No chat template, a 24-token window: the long prompt has the least room and finishes first.
    code = generate.main(["--model", str(tiny_llama), "--prompt", "short", "--prompt",
                          "a much longer prompt than the other two, with room for fewer tokens",
                          "--prompt", "third", "--output", str(out), "--no-chat-template", "--max-model-len", "24",
                          "--think-budget", "none", "--solution-budget", "none", "--temperature", "0"])
    err = capsys.readouterr().err
    assert code == 130
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert rows and len(rows) == len(finished) < 3
    assert {r["index"] for r in rows} <= {0, 1, 2} and all(r["completions"] for r in rows)
    assert f"wrote the {len(rows)} of 3 rows that finished to {out}" in err


def test_eval_and_train_check_their_output_folder_first(tmp_path, capsys):
    a_file = tmp_path / "a_file"
    a_file.write_text("x")
    main_error(capsys, ["--model", "/no/such/model", "--output-dir", a_file, "--task", "arithmetic:1:+"],
               "model path not found", module="elastic_decode.eval")  # a bad model is caught first there
    from elastic_decode.train.tasks import make_task  # noqa: F401  (the task exists)

    main_error(capsys, ["--output-dir", a_file, "--task", "arithmetic:1:+", "--num-problems", "2"],
               f"--output-dir {a_file} is a file; give a folder", module="elastic_decode.eval")
    main_error(capsys, ["--output-dir", a_file / "run"], f"--output-dir {a_file / 'run'}: {a_file} is a file",
               module="elastic_decode.train.__main__")
    main_error(capsys, ["--output-dir", a_file], f"--output-dir {a_file} is a file; give a folder",
               module="elastic_decode.train.__main__")
