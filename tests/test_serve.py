"""The server: the real `openai` client (sync and async) against `elastic_decode.serve` on a loopback
port, token-level /generate against `LLM.generate_tensors`, concurrency, aborts, pause / resume /
update_weights, auth and every kind of bad request. The engine is a tiny random Llama (CPU, fp32);
the reference is a second `LLM` on the same checkpoint, so "same tokens" means the HTTP path
changes nothing."""
from __future__ import annotations

import asyncio
import json
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request

import pytest
import torch

pytest.importorskip("fastapi", reason="the serve extra is not installed (pip install 'elastic_decode[serve]')")
openai = pytest.importorskip("openai", reason="the test extra is not installed")

from elastic_decode import LLM, SamplingParams  # noqa: E402
from elastic_decode.client import RolloutClient  # noqa: E402
from elastic_decode.engine.loop import EngineLoop  # noqa: E402
from elastic_decode.errors import InvalidRequestError  # noqa: E402
from elastic_decode.serve.app import ServerConfig  # noqa: E402

from conftest import make_tiny_checkpoint  # noqa: E402
from serving import MODEL, empty, engine_kwargs, get, in_thread, post, serving, wait_for_tokens  # noqa: E402

KEY = "test-key"
MESSAGES = [{"role": "user", "content": "What is 2 + 3?"}]


@pytest.fixture(scope="module")
def served(tiny_llama):
    llm = LLM(str(tiny_llama), **engine_kwargs())
    with EngineLoop(llm.engine) as loop:
        config = ServerConfig(model_name=MODEL, max_n=8, max_body_bytes=2**20, max_weights_bytes=64 * 2**20)
        with serving(loop, config) as url:
            yield url, loop


@pytest.fixture
def client(url):
    return openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0)


BUDGETS = {"thinking_budget": 6, "solution_budget": 5}
PARAMS = SamplingParams(think_budget=6, solution_budget=5, seed=7, n=2, temperature=0.8, top_p=0.9)


# -- OpenAI routes -----------------------------------------------------------------------------


def test_models_and_health(url, client):
    assert [m.id for m in client.models.list().data] == [MODEL]
    status, body = get(url, "/health")
    assert status == 200 and json.loads(body)["status"] == "ok"


def test_chat_matches_the_in_process_api(client, ref):
    reply = client.chat.completions.create(model=MODEL, messages=MESSAGES, n=2, seed=7, temperature=0.8, top_p=0.9,
                                           logprobs=True, extra_body=BUDGETS)
    expected = ref.chat(MESSAGES, PARAMS, use_tqdm=False)[0].outputs
    for choice, want in zip(reply.choices, expected):
        assert choice.message.reasoning == want.thinking_text == choice.message.reasoning_content
        assert choice.message.content == want.solution_text
        assert choice.finish_reason == want.finish_reason
        budget = choice.model_extra["budget"]
        assert (budget["think_tokens"], budget["solution_tokens"], budget["forced_end"]) == \
               (want.think_tokens, want.solution_tokens, want.forced_end)
        entries = choice.logprobs.content
        assert [e.logprob for e in entries] == pytest.approx(want.logprobs, abs=1e-5)
        assert [int(e.model_extra["forced"]) for e in entries] == want.forced_mask
    assert reply.usage.completion_tokens == sum(len(c.token_ids) for c in expected)
    assert reply.usage.completion_tokens_details.reasoning_tokens == sum(c.think_tokens for c in expected)
    assert reply.usage.prompt_tokens == len(ref.encode_chat(MESSAGES)) * 2


def test_top_logprobs(client, ref):
    params = SamplingParams(seed=2, max_tokens=6, temperature=0.9, logprobs=2)
    want = ref.chat(MESSAGES, params, use_tqdm=False)[0].outputs[0]
    reply = client.chat.completions.create(model=MODEL, messages=MESSAGES, seed=2, max_tokens=6, temperature=0.9,
                                           logprobs=True, top_logprobs=2)
    entries = reply.choices[0].logprobs.content
    assert [[(a.token, a.logprob) for a in e.top_logprobs] for e in entries] == \
           [[(ref.engine.tokenizer.decode([i]), pytest.approx(v, abs=1e-5)) for i, v in row] for row in want.top_logprobs]
    done = client.completions.create(model=MODEL, prompt="Once upon", seed=2, max_tokens=4, logprobs=3)
    assert all(len(row) == 3 for row in done.choices[0].logprobs.top_logprobs)


def test_chat_stream_async_matches(url, ref):
    async def stream():
        client = openai.AsyncOpenAI(base_url=url + "/v1", api_key="unused", max_retries=0)
        parts = {0: ["", ""], 1: ["", ""]}
        finish, usage = {}, None
        async for chunk in await client.chat.completions.create(
                model=MODEL, messages=MESSAGES, n=2, seed=7, temperature=0.8, top_p=0.9, stream=True,
                stream_options={"include_usage": True}, extra_body=BUDGETS):
            if chunk.usage is not None:
                usage = chunk.usage
            for c in chunk.choices:
                extra = c.delta.model_extra or {}
                assert not (extra.get("reasoning") and c.delta.content)  # reasoning, then content
                if extra.get("reasoning"):
                    assert not parts[c.index][1], "reasoning after content"
                    parts[c.index][0] += extra["reasoning"]
                parts[c.index][1] += c.delta.content or ""
                if c.finish_reason:
                    finish[c.index] = c.finish_reason
        await client.close()
        return parts, finish, usage

    parts, finish, usage = asyncio.run(stream())
    expected = ref.chat(MESSAGES, PARAMS, use_tqdm=False)[0].outputs
    for i, want in enumerate(expected):
        assert parts[i] == [want.thinking_text, want.solution_text]
        assert finish[i] == want.finish_reason
    assert usage.completion_tokens == sum(len(c.token_ids) for c in expected)


def test_completions_stream_and_not(client, ref):
    prompt = "Once upon a time"
    want = ref.generate(prompt, SamplingParams(n=2, seed=3, max_tokens=12), use_tqdm=False)[0].outputs
    reply = client.completions.create(model=MODEL, prompt=prompt, n=2, seed=3, max_tokens=12, logprobs=0)
    assert [c.text for c in reply.choices] == [w.text for w in want]
    assert reply.choices[0].logprobs.token_logprobs == pytest.approx(want[0].logprobs, abs=1e-5)
    texts = ["", ""]
    for chunk in client.completions.create(model=MODEL, prompt=prompt, n=2, seed=3, max_tokens=12, stream=True):
        for c in chunk.choices:
            texts[c.index] += c.text
    assert texts == [w.text for w in want]
    # Two prompts of token ids: choices come prompt by prompt.
    ids = [ref.encode("a b c"), ref.encode("d e")]
    reply = client.completions.create(model=MODEL, prompt=ids, seed=1, max_tokens=4)
    want = ref.generate(ids, SamplingParams(seed=1, max_tokens=4), use_tqdm=False)
    assert [c.text for c in reply.choices] == [o.outputs[0].text for o in want]


def test_stop_strings_cut_the_solution(client, ref):
    free = ref.chat(MESSAGES, SamplingParams(seed=11, think_budget=4, solution_budget=24), use_tqdm=False)[0]
    content = free.outputs[0].solution_text
    assert len(content) > 6
    stop = content[3:6]  # a string the solution is known to contain
    cut = content[: content.index(stop)]
    for stream in (False, True):
        reply = client.chat.completions.create(model=MODEL, messages=MESSAGES, seed=11, stop=[stop], stream=stream,
                                               extra_body={"thinking_budget": 4, "solution_budget": 24})
        if stream:
            text, finish = "", None
            for chunk in reply:
                for c in chunk.choices:
                    text += c.delta.content or ""
                    finish = c.finish_reason or finish
        else:
            text, finish = reply.choices[0].message.content, reply.choices[0].finish_reason
        assert (text, finish) == (cut, "stop")


# -- /generate and the rollout client -----------------------------------------------------------


def test_generate_equals_generate_tensors(url, ref):
    prompts = [ref.encode_chat(MESSAGES), ref.encode("a b c d")]
    params = SamplingParams(n=3, seed=5, think_budget=5, solution_budget=4, temperature=1.0, top_k=50)
    got = RolloutClient(url).generate(prompts, params)
    want = ref.generate_tensors(prompts, params)
    for name in ("completion_ids", "completion_mask", "forced_mask", "think_tokens", "solution_tokens", "forced_end",
                 "truncated", "prompt_index"):
        assert torch.equal(getattr(got, name), getattr(want, name)), name
    torch.testing.assert_close(got.logprobs, want.logprobs, rtol=0, atol=1e-5)
    assert got.prompt_ids == want.prompt_ids
    assert (got.thinking_texts, got.solution_texts) == (want.thinking_texts, want.solution_texts)
    assert got.forced_mask.sum() > 0  # the budget forced markers: forced tokens carry logprobs too
    assert RolloutClient(url).encode_chat(MESSAGES) == ref.encode_chat(MESSAGES)


def test_concurrent_clients_are_batched(url, loop, ref):
    before = loop.metrics.largest_batch
    loop.metrics.largest_batch = 0
    n = 32
    prompts = [f"Question {i}: what comes next?" for i in range(n)]

    async def one(client, i):
        reply = await client.completions.create(model=MODEL, prompt=prompts[i], seed=i, max_tokens=16, temperature=1.0)
        return reply.choices[0].text

    async def all_of_them():
        client = openai.AsyncOpenAI(base_url=url + "/v1", api_key="unused", max_retries=0)
        try:
            return await asyncio.gather(*(one(client, i) for i in range(n)))
        finally:
            await client.close()

    texts = asyncio.run(all_of_them())
    want = ref.generate(prompts, [SamplingParams(seed=i, max_tokens=16) for i in range(n)], use_tqdm=False)
    assert texts == [o.outputs[0].text for o in want]
    assert loop.metrics.largest_batch > 1
    loop.metrics.largest_batch = max(before, loop.metrics.largest_batch)
    assert empty(loop)
    allocator = loop.engine.block_manager
    assert allocator.num_free == allocator.allocator.num_blocks


# -- aborts, pause, resume, weights ---------------------------------------------------------------


LONG = {"max_tokens": 400, "ignore_eos": True}


def test_disconnect_mid_stream_aborts(client, loop):
    aborted = loop.metrics.requests_finished.get("abort", 0)
    stream = client.completions.create(model=MODEL, prompt="count", stream=True, extra_body=LONG, max_tokens=400)
    for i, _ in enumerate(stream):
        if i == 3:
            break
    stream.close()
    assert empty(loop)
    assert loop.metrics.requests_finished.get("abort", 0) == aborted + 1


def test_pause_abort_returns_partial_tokens(url, loop):
    thread, box = in_thread(lambda: post(url, "/v1/completions", {"prompt": "go", **LONG}))
    wait_for_tokens(loop, 3)
    assert post(url, "/pause", {"mode": "abort"}) == (200, {"status": "paused", "paused": True, "mode": "abort"})
    thread.join(30)
    status, body = box["value"]
    assert status == 200 and body["choices"][0]["finish_reason"] == "abort"
    assert 0 < body["usage"]["completion_tokens"] < 400
    assert empty(loop, wait=0)
    assert post(url, "/resume", {}) == (200, {"status": "resumed", "paused": False})


def test_pause_wait_drains_and_holds_new_requests(url, loop):
    first, box1 = in_thread(lambda: post(url, "/v1/completions", {"prompt": "go", "max_tokens": 30,
                                                                      "ignore_eos": True}))
    wait_for_tokens(loop, 1)
    assert post(url, "/pause", {"mode": "wait"})[0] == 200
    assert not first.is_alive() or first.join(5) is None
    assert box1["value"][1]["choices"][0]["finish_reason"] == "length"  # it ran to the end
    assert box1["value"][1]["usage"]["completion_tokens"] == 30
    second, box2 = in_thread(lambda: post(url, "/v1/completions", {"prompt": "later", "max_tokens": 4}))
    deadline = time.monotonic() + 30
    while loop.stats()["waiting"] != 1 and time.monotonic() < deadline:  # until the request has arrived
        time.sleep(0.05)
    time.sleep(0.3)
    assert second.is_alive() and loop.stats()["waiting"] == 1  # held while paused, not run
    post(url, "/resume", {})
    second.join(30)
    assert box2["value"][0] == 200 and box2["value"][1]["usage"]["completion_tokens"] == 4


def test_update_weights_in_flight_with_keep(url, loop, tiny_llama, tmp_path):
    """Paused with keep mid-generation, new weights, resumed: the continuation is what a fresh engine
    with the new weights makes from that point (the in-flight K/V is recomputed)."""
    new = make_tiny_checkpoint("llama", tmp_path / "new", tiny_llama, seed=1)
    prompt = [1, 5, 9, 300, 7]
    params = SamplingParams(temperature=0.0, max_tokens=120, ignore_eos=True)
    client = RolloutClient(url)
    thread, box = in_thread(lambda: client.generate([prompt], params))
    wait_for_tokens(loop, 5)
    client.pause("keep")
    done = loop.call(lambda e: [s.output_ids for r in e.requests.values() for s in r.seqs])
    assert len(done) == 1 and 0 < len(done[0]) < 120
    done = done[0]
    from safetensors.torch import load_file

    weights = load_file(str(new / "model.safetensors"))
    assert client.update_weights(weights.items()) == len(weights)
    client.resume()
    thread.join(60)
    got = box["value"].completion_ids[0].tolist()
    fresh = LLM(str(new), **engine_kwargs())
    rest = fresh.generate([prompt + done], SamplingParams(temperature=0.0, max_tokens=120 - len(done),
                                                          ignore_eos=True), use_tqdm=False)[0].outputs[0].token_ids
    assert got == done + rest
    # Back to the original weights, from a checkpoint directory on the server's machine.
    assert client.update_weights_from_path(str(tiny_llama)) > 0
    back = client.generate([prompt], SamplingParams(temperature=0.0, max_tokens=6)).completion_ids[0].tolist()
    assert back == LLM(str(tiny_llama), **engine_kwargs()).generate(
        [prompt], SamplingParams(temperature=0.0, max_tokens=6), use_tqdm=False)[0].outputs[0].token_ids


def test_metrics_in_prometheus_text(url):
    status, body = get(url, "/metrics")
    text = body.decode()
    assert status == 200
    for name in ("running_sequences", "waiting_sequences", "kv_blocks_used", "generation_tokens_total",
                 "forced_ends_total", "request_latency_seconds_bucket", "request_latency_seconds_count"):
        assert f"elastic_decode_{name}" in text
    tokens = next(line for line in text.splitlines() if line.startswith("elastic_decode_generation_tokens_total"))
    assert float(tokens.split()[-1]) > 0


def test_a_failed_step_fails_its_requests_only(url, loop, monkeypatch):
    runner = loop.engine.runner
    real = runner.run
    calls = []

    def broken_once(batch):
        calls.append(1)
        if len(calls) == 1:
            raise RuntimeError("device fell over")
        return real(batch)

    monkeypatch.setattr(runner, "run", broken_once)
    status, reply = post(url, "/v1/completions", {"prompt": "x", "max_tokens": 3})
    assert status == 500 and reply["error"]["type"] == "server_error" and "device fell over" in reply["error"]["message"]
    assert empty(loop)
    status, reply = post(url, "/v1/completions", {"prompt": "x", "max_tokens": 3})
    assert status == 200 and reply["usage"]["completion_tokens"] == 3


def test_trl_rollout_func_over_http(url, ref, tiny_llama):
    pytest.importorskip("trl", reason="the trl extra is not installed")
    from types import SimpleNamespace

    from transformers import AutoModelForCausalLM

    from elastic_decode.integrations.trl import make_rollout_func

    def trainer(model=None):
        model = model or SimpleNamespace(training=True)
        return SimpleNamespace(state=SimpleNamespace(global_step=0), num_generations=2, num_generations_eval=2,
                               model=model, accelerator=SimpleNamespace(unwrap_model=lambda m: m))

    other = [{"role": "user", "content": "hello"}]
    prompts = [MESSAGES, MESSAGES, other, other]  # TRL repeats each prompt num_generations times
    kwargs = dict(think_budget=3, solution_budget=3, seed=4, sync_weights=False)
    over_http = make_rollout_func(RolloutClient(url), **kwargs)(prompts, trainer())
    in_process = make_rollout_func(ref, **kwargs)(prompts, trainer())
    for key in ("prompt_ids", "completion_ids", "env_mask", "think_tokens", "forced_end", "solution_text"):
        assert over_http[key] == in_process[key], key
    # With weight sync: the trainer's (perturbed) weights reach the server before the rollout.
    model = AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    model.training = True
    client = RolloutClient(url)
    try:
        make_rollout_func(client, think_budget=2, solution_budget=2)([MESSAGES], trainer(model))
        prompt = [1, 5, 9, 300, 7]
        ours = client.generate([prompt], SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True))
        x = torch.tensor([prompt])
        theirs = model.eval().generate(x, attention_mask=torch.ones_like(x), max_new_tokens=6, do_sample=False,
                                       pad_token_id=0)[0, len(prompt):].tolist()
        assert ours.completion_ids[0].tolist() == theirs
    finally:
        client.update_weights_from_path(str(tiny_llama))


# -- safety ------------------------------------------------------------------------------------------


def test_api_key(loop):
    with serving(loop, ServerConfig(model_name=MODEL, api_key=KEY)) as url:
        assert get(url, "/health")[0] == 200
        for headers in ({}, {"Authorization": "Bearer wrong"}):
            status, body = get(url, "/v1/models", headers)
            assert status == 401 and json.loads(body)["error"]["type"] == "authentication_error"
            assert post(url, "/generate", {"prompt_token_ids": [1, 2]}, headers)[0] == 401
            assert get(url, "/metrics", headers)[0] == 401
        client = openai.OpenAI(base_url=url + "/v1", api_key=KEY, max_retries=0)
        assert client.completions.create(model=MODEL, prompt="hi", max_tokens=2).usage.completion_tokens == 2
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=url + "/v1", api_key="wrong", max_retries=0).models.list()


CHAT = {"model": MODEL, "messages": MESSAGES}
BAD = [
    ("/v1/chat/completions", {**CHAT, "thinking_budgt": 5}, 400, "thinking_budgt"),
    ("/v1/chat/completions", {**CHAT, "n": 9}, 400, "n"),
    ("/v1/chat/completions", {**CHAT, "n": 0}, 400, "n"),
    ("/v1/chat/completions", {**CHAT, "temperature": -1}, 400, "temperature"),
    ("/v1/chat/completions", {**CHAT, "top_p": 0}, 400, "top_p"),
    ("/v1/chat/completions", {**CHAT, "thinking_budget": -1}, 400, "thinking_budget"),
    ("/v1/chat/completions", {**CHAT, "thinking_token_budget": 2, "min_think": 3}, 400, "min_think"),
    ("/v1/chat/completions", {**CHAT, "solution_budget": 0}, 400, "solution_budget"),
    ("/v1/chat/completions", {**CHAT, "max_tokens": 10_000}, 400, "max_tokens"),
    ("/v1/chat/completions", {**CHAT, "seed": 2**64}, 400, "seed"),
    ("/v1/chat/completions", {**CHAT, "stop_token_ids": [10**7]}, 400, "stop_token_ids"),
    ("/v1/chat/completions", {**CHAT, "presence_penalty": 1.0}, 400, "presence_penalty"),
    ("/v1/chat/completions", {**CHAT, "top_logprobs": 21, "logprobs": True}, 400, "top_logprobs"),
    ("/v1/chat/completions", {**CHAT, "top_logprobs": 2}, 400, "top_logprobs"),
    ("/v1/chat/completions", {**CHAT, "end_think": ""}, 400, "end_think"),
    ("/v1/chat/completions", {**CHAT, "model": "gpt-9"}, 404, "model"),
    ("/v1/chat/completions", {"model": MODEL, "messages": []}, 400, "messages"),
    ("/v1/chat/completions", {"model": MODEL, "messages": [{"role": "robot", "content": "x"}]}, 400, "messages"),
    ("/v1/chat/completions", {"model": MODEL, "messages": [{"role": "user", "content": " "}]}, 400, "messages"),
    ("/v1/chat/completions", {"model": MODEL}, 400, "messages"),
    ("/v1/completions", {"model": MODEL, "prompt": "x " * 600}, 400, "prompt"),
    ("/v1/completions", {"model": MODEL, "prompt": ""}, 400, "prompt"),
    ("/v1/completions", {"model": MODEL, "prompt": [1, -3]}, 400, "prompt"),
    ("/v1/completions", {"model": MODEL, "prompt": "x", "logprobs": 21}, 400, "logprobs"),
    ("/generate", {"prompt_token_ids": [[1, 2], [10**7]]}, 400, "prompt"),
    ("/generate", {"prompt_token_ids": [1, 2], "n": "many"}, 400, "n"),
    ("/generate", {"prompt_token_ids": [1, 2], "think_budget": 2**31}, 400, "think_budget"),
    ("/pause", {"mode": "later"}, 400, "mode"),
    ("/update_weights", {"path": "/nonexistent"}, 400, "path"),
    ("/update_weights", {"where": "/nonexistent"}, 400, "path"),
    ("/tokenize", {}, 400, "prompt"),
    ("/v1/nothing", {}, 404, None),
]


@pytest.mark.parametrize("path,body,status,param", BAD, ids=[f"{p}:{s}:{m}" for p, _, s, m in BAD])
def test_bad_requests_get_json_errors(url, loop, path, body, status, param):
    got, reply = post(url, path, body)
    assert got == status, reply
    error = reply["error"]
    assert error["message"] and error["type"] and "Traceback" not in error["message"]
    if param is not None:
        assert error["param"] == param, error
    assert get(url, "/health")[0] == 200 and empty(loop, wait=5)


def test_malformed_oversized_and_bad_weights(url, loop):
    status, reply = post(url, "/v1/chat/completions", None, raw=b'{"model": "tiny", "messages": [')
    assert status == 400 and "JSON" in reply["error"]["message"]
    status, reply = post(url, "/v1/completions", None, raw=json.dumps({"prompt": "x" * 2**21}).encode())
    assert status == 413 and reply["error"]["code"] == "request_too_large"
    octet = {"Content-Type": "application/octet-stream"}
    status, reply = post(url, "/update_weights", None, headers=octet, raw=b"not safetensors")
    assert status == 400 and "safetensors" in reply["error"]["message"]
    from safetensors.torch import save

    for tensors, words in (({"model.nope.weight": torch.zeros(2)}, "unexpected weight"),
                           ({"model.norm.weight": torch.zeros(3)}, "shape"),
                           ({"model.norm.weight": torch.full((64,), float("nan"))}, "non-finite")):
        status, reply = post(url, "/update_weights", None, headers=octet, raw=save(tensors))
        assert status == 400 and words in reply["error"]["message"], reply
    with pytest.raises(InvalidRequestError, match="n must be"):
        RolloutClient(url).generate([[1, 2]], SamplingParams(n=9))
    assert get(url, "/health")[0] == 200


# -- the command line --------------------------------------------------------------------------------


@pytest.mark.slow
def test_serve_cli_answers_the_openai_client(tiny_llama):
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    sock.close()
    cmd = [sys.executable, "-m", "elastic_decode.serve", "--model", str(tiny_llama), "--port", str(port),
           "--served-model-name", MODEL, "--device", "cpu", "--kv-cache-memory-gb", "0.05", "--log-level", "warning"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            try:
                if get(url, "/health")[0] == 200:
                    break
            except urllib.error.URLError:
                time.sleep(0.2)
        client = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0)
        reply = client.chat.completions.create(model=MODEL, messages=MESSAGES, extra_body=BUDGETS, seed=1)
        assert reply.choices[0].model_extra["budget"]["think_tokens"] <= 6
        # The port is taken now: a second server says so in one line, before loading anything.
        second = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
        assert second.returncode == 2 and f"cannot listen on 127.0.0.1:{port}" in second.stderr
        assert "Traceback" not in second.stderr
    finally:
        proc.send_signal(2)
        out, err = proc.communicate(timeout=30)
    assert proc.returncode == 0, err
    assert "served 1 requests" in err
