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
