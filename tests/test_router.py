"""Two servers behind SGLang's router (PyPI sglang-router, a Rust load balancer), all on loopback: the router
admits them as workers, spreads requests over both, forwards OpenAI and SGLang-native requests with the
fields it adds (the budgets honoured through it), each server takes a weight update, and when one server
is killed the router keeps serving from the other. docs/serving.md, "Many servers behind a router".

What sglang-router 0.3.2 forwards (measured with a server that logs bodies): /v1/completions keeps every
field; /v1/chat/completions and /generate are re-serialised from its own types, so unknown fields are dropped
(the budget fields, SGLang's own sampling_params.custom_params too) and its defaults added. The budgets
reach the servers through it on completions as top-level fields, on chat in chat_template_kwargs, and on
/generate as the servers' default budgets (--thinking-budget, --solution-budget)."""
from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
import urllib.error

import pytest

pytest.importorskip("sglang_router", reason="sglang-router is not installed (the test extra installs it on Linux)")
openai = pytest.importorskip("openai", reason="the test extra is not installed")

from serving import MODEL, get, post  # noqa: E402
from test_rl_frameworks import free_port  # noqa: E402

pytestmark = pytest.mark.slow


def wait_until_up(url: str, path: str, proc: subprocess.Popen, seconds: float = 120) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"{proc.args[:3]} exited with {proc.returncode}: {proc.stderr.read()[-3000:]}")
        try:
            if get(url, path)[0] == 200:
                return
        except (urllib.error.URLError, ConnectionError):
            pass
        time.sleep(0.2)
    raise AssertionError(f"{url}{path} did not answer in {seconds} s")


def start_server(model) -> tuple[str, subprocess.Popen]:
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "elastic_decode.serve", "--model", str(model), "--port", str(port),
                             "--served-model-name", MODEL, "--device", "cpu", "--dtype", "float32",
                             "--kv-cache-memory-gb", "0.05", "--max-model-len", "512", "--log-level", "warning",
                             "--thinking-budget", "5", "--solution-budget", "4"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    return f"http://127.0.0.1:{port}", proc


@pytest.fixture(scope="module")
def cluster(tiny_llama):
    procs = []
    try:
        workers = [start_server(tiny_llama) for _ in range(2)]
        procs += [p for _, p in workers]
        for url, proc in workers:
            wait_until_up(url, "/health", proc)
        port = free_port()
        router = subprocess.Popen(
            [sys.executable, "-m", "sglang_router.launch_router", "--worker-urls", *[u for u, _ in workers],
             "--host", "127.0.0.1", "--port", str(port), "--policy", "round_robin", "--log-level", "warn",
             "--health-check-interval-secs", "1", "--health-failure-threshold", "1", "--prometheus-port",
             str(free_port()), "--prometheus-host", "127.0.0.1"],
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, start_new_session=True)
        procs.append(router)
        router_url = f"http://127.0.0.1:{port}"
        wait_until_up(router_url, "/health", router)
        yield router_url, workers
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.send_signal(signal.SIGINT)
        for proc in procs:
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()


def served(worker_url: str) -> int:
    """Requests a server has finished (its Prometheus counter)."""
    _, text = get(worker_url, "/metrics")
    return sum(int(float(line.split()[-1])) for line in text.decode().splitlines()
               if line.startswith("elastic_decode_requests_finished_total"))


def test_requests_spread_over_both_with_budgets_honoured(cluster):
    router, workers = cluster
    before = [served(u) for u, _ in workers]
    client = openai.OpenAI(base_url=router + "/v1", api_key="unused", max_retries=0)
    direct = openai.OpenAI(base_url=workers[0][0] + "/v1", api_key="unused", max_retries=0)
    for i in range(4):
        ask = dict(model=MODEL, messages=[{"role": "user", "content": f"{i} + 2?"}], max_tokens=40, seed=i,
                   extra_body={"chat_template_kwargs": {"thinking_budget": 3, "solution_budget": 6}})
        chat = client.chat.completions.create(**ask)
        budget = chat.choices[0].model_extra["budget"]
        assert budget["think_tokens"] <= 3 and budget["solution_tokens"] <= 6, budget
        assert chat.choices[0].message.content == direct.chat.completions.create(**ask).choices[0].message.content
        text = client.completions.create(model=MODEL, prompt=f"Count to {i}:", max_tokens=40,
                                         extra_body={"thinking_budget": 2, "solution_budget": 3})
        assert text.choices[0].model_extra["budget"]["think_tokens"] <= 2
        assert text.choices[0].model_extra["budget"]["solution_tokens"] <= 3
    # /generate: the router drops custom_params, so the servers' default budgets (5 and 4) apply
    status, out = post(router, "/generate", {"text": "Hello", "return_logprob": True, "sampling_params": {
        "max_new_tokens": 60, "temperature": 0.0, "custom_params": {"thinking_budget": 2}}})
    assert status == 200, out
    meta = out["meta_info"]
    assert meta["think_tokens"] <= 5 and meta["solution_tokens"] <= 4 and len(meta["output_token_logprobs"]) <= 60
    after = [served(u) for u, _ in workers]
    assert all(b > a for a, b in zip(before, after)), (before, after)  # both servers took requests
    # a misspelt budget stays a 400 through the router (completions forward it)
    status, out = post(router, "/v1/completions", {"model": MODEL, "prompt": "x", "thinking_budgt": 3})
    assert status == 400 and "thinking_budgt" in json.dumps(out)


def test_a_weight_update_to_each_server(cluster, tiny_llama):
    router, workers = cluster
    for i, (url, _) in enumerate(workers):
        status, out = post(url, "/update_weights_from_disk", {"model_path": str(tiny_llama), "weight_version": "w1"})
        assert status == 200 and out["success"], out
    for _ in range(4):
        status, out = post(router, "/generate", {"text": "Hi", "sampling_params": {"max_new_tokens": 3}})
        assert status == 200 and out["meta_info"]["weight_version"] == "w1"


def test_the_router_keeps_serving_when_a_server_dies(cluster):
    router, workers = cluster
    workers[0][1].kill()
    workers[0][1].wait(timeout=30)
    client = openai.OpenAI(base_url=router + "/v1", api_key="unused", max_retries=0)
    answered = 0
    deadline = time.monotonic() + 60
    while answered < 6 and time.monotonic() < deadline:
        try:
            client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "2+2?"}],
                                           max_tokens=6, extra_body={"thinking_budget": 2})
            answered += 1
        except openai.APIError:
            assert answered == 0, "a request failed after the router had moved to the live server"
            time.sleep(0.5)
    assert answered == 6
    assert workers[1][1].poll() is None
