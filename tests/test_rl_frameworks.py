"""The server as the rollout engine of RL frameworks, driven the way their clients drive theirs: SGLang's
native API as slime and AReaL call it, vLLM's RL routes as SkyRL and TRL's AsyncGRPO call them (the
request bodies and sequences are the clients' own, read in their code: see serve/sglang_routes.py and
serve/vllm_routes.py). Tokens are checked against an in-process LLM on the same checkpoint, so "same
tokens" means the route changes nothing; weights through a gloo group come from a separate trainer process.
"""
from __future__ import annotations

import itertools
import json
import socket
import subprocess
import sys
import textwrap
import time
import urllib.request

import pytest

pytest.importorskip("fastapi", reason="the serve extra is not installed (pip install 'elastic_decode[serve]')")

from elastic_decode import LLM, SamplingParams  # noqa: E402
from elastic_decode.engine.loop import EngineLoop  # noqa: E402
from elastic_decode.serve.app import ServerConfig  # noqa: E402

from conftest import make_tiny_checkpoint  # noqa: E402
from serving import MODEL, empty, engine_kwargs, get, in_thread, post, serving, wait_for_tokens  # noqa: E402

MESSAGES = [{"role": "user", "content": "What is 2 + 3?"}]


@pytest.fixture(scope="module")
def served(tiny_llama):
    llm = LLM(str(tiny_llama), **engine_kwargs())
    with EngineLoop(llm.engine) as loop:
        with serving(loop, ServerConfig(model_name=MODEL, max_n=8)) as url:
            yield url, loop, llm


@pytest.fixture(scope="module")
def prompt(ref):
    return ref.encode_chat(MESSAGES)


def reference(ref, prompt, **params):
    return ref.generate([prompt], SamplingParams(**params), use_tqdm=False)[0].outputs[0]


def json_of(status_body):
    status, body = status_body
    assert status == 200, body
    return body


def get_json(url: str, path: str):
    return json.loads(json_of(get(url, path)))


# -- SGLang's native API: slime ------------------------------------------------------------------------


def slime_params(**over) -> dict:
    """What slime's GenerateState sends (sglang_rollout.py), budgets in custom_params."""
    return {"temperature": 1.0, "top_p": 1.0, "top_k": -1, "max_new_tokens": 12, "stop": None, "stop_token_ids": None,
            "skip_special_tokens": False, "no_stop_trim": True, "spaces_between_special_tokens": False,
            "sampling_seed": 11, **over}


def test_slime_generation_gives_the_engines_tokens_and_what_slime_reads(url, ref, prompt):
    body = {"input_ids": prompt, "return_logprob": True,
            "sampling_params": slime_params(custom_params={"thinking_budget": 4, "solution_budget": 5})}
    out = json_of(post(url, "/generate", body))
    want = reference(ref, prompt, temperature=1.0, seed=11, max_tokens=12, think_budget=4, solution_budget=5)
    meta = out["meta_info"]
    assert [t for _, t, _ in meta["output_token_logprobs"]] == want.token_ids == out["output_ids"]
    assert [lp for lp, _, _ in meta["output_token_logprobs"]] == pytest.approx(want.logprobs, abs=1e-5)
    assert all(text is None for _, _, text in meta["output_token_logprobs"])
    assert meta["finish_reason"]["type"] in ("stop", "length")
    assert meta["prompt_tokens"] == len(prompt) and meta["completion_tokens"] == len(want.token_ids)
    assert isinstance(meta["cached_tokens"], int) and isinstance(meta["weight_version"], str)
    # ours, beside SGLang's
    assert meta["think_tokens"] == want.think_tokens <= 4 and meta["forced_mask"] == want.forced_mask
    assert meta["forced_end"] == want.forced_end
    assert out["text"] == ref.engine.tokenizer.decode(want.token_ids, skip_special_tokens=False)


def test_a_batch_of_input_ids_answers_a_list(url, ref, prompt):
    body = {"input_ids": [prompt, prompt[:-1]], "sampling_params": {"temperature": 0.0, "max_new_tokens": 4}}
    out = json_of(post(url, "/generate", body))
    assert isinstance(out, list) and len(out) == 2
    assert out[1]["output_ids"] == reference(ref, prompt[:-1], temperature=0.0, max_tokens=4).token_ids


def test_areal_scores_a_sequence_with_input_token_logprobs(url, ref, prompt):
    """AReaL's recompute: the sequence as input_ids, logprob_start_len 0, nothing new. The prompt's
    logprobs are what the engine gave the same tokens when it sampled them (temperature 1, no filter)."""
    gen = json_of(post(url, "/generate", {"input_ids": prompt, "return_logprob": True,
                                          "sampling_params": {"temperature": 1.0, "max_new_tokens": 6,
                                                              "sampling_seed": 2}}))
    sampled = gen["meta_info"]["output_token_logprobs"]
    seq = prompt + [t for _, t, _ in sampled]
    out = json_of(post(url, "/generate", {"input_ids": seq, "return_logprob": True, "logprob_start_len": 0,
                                          "top_logprobs_num": 2, "sampling_params": {"max_new_tokens": 0}}))
    scored = out["meta_info"]["input_token_logprobs"]
    assert len(scored) == len(seq) and scored[0][0] is None and [t for _, t, _ in scored] == seq
    assert [lp for lp, _, _ in scored[len(prompt):]] == pytest.approx([lp for lp, _, _ in sampled], abs=1e-4)
    assert out["output_ids"] == [] and out["meta_info"]["output_token_logprobs"] == []
    tops = out["meta_info"]["input_top_logprobs"]
    assert tops[0] is None and all(len(row) == 2 and row[0][0] >= row[1][0] for row in tops[1:])


def test_slime_abort_all_then_poll_loads_until_idle(url, loop, prompt):
    """slime's abort: POST /abort_request {"abort_all": true}, then GET /v1/loads until nothing runs; every
    request answers with its partial tokens and finish_reason abort (slime keeps them as ABORTED samples)."""
    body = {"input_ids": prompt, "return_logprob": True,
            "sampling_params": slime_params(max_new_tokens=400, ignore_eos=True)}
    calls = [in_thread(lambda: post(url, "/generate", body)) for _ in range(3)]
    deadline = time.monotonic() + 30
    while loop.stats()["requests_running"] < 3:  # all three in the engine before the abort
        assert time.monotonic() < deadline, loop.stats()
        time.sleep(0.01)
    wait_for_tokens(loop, 6)
    assert json_of(post(url, "/abort_request", {"abort_all": True}))["aborted"] == 3
    deadline = time.monotonic() + 10
    while True:
        load = get_json(url, "/v1/loads?include=core")["loads"][0]
        if load["num_running_reqs"] + load["num_waiting_reqs"] == 0:
            break
        assert time.monotonic() < deadline, load
        time.sleep(0.05)
    for thread, box in calls:
        thread.join(30)
        meta = json_of(box["value"])["meta_info"]
        assert meta["finish_reason"]["type"] == "abort"
        assert len(meta["output_token_logprobs"]) == meta["completion_tokens"] < 400
    assert empty(loop)


def test_slime_weight_update_sequence(url, loop, ref, prompt, tiny_llama, tmp_path):
    """pause_generation (abort) -> GET flush_cache until 200 -> update_weights_from_disk -> continue_generation;
    the aborted rollout is resubmitted as slime does (prompt + its tokens, max_new_tokens less what it
    had) and its budget is the rollout's: thinking counted across both requests."""
    params = slime_params(temperature=0.0, max_new_tokens=300, ignore_eos=True,
                          custom_params={"thinking_budget": 40, "solution_budget": 400})
    thread, box = in_thread(lambda: post(url, "/generate", {"input_ids": prompt, "return_logprob": True,
                                                             "sampling_params": params}))
    wait_for_tokens(loop, 8)
    try:
        paused = json_of(post(url, "/pause_generation", {}))
    except BaseException:
        post(url, "/continue_generation", {})
        raise
    assert paused["status"] == "ok"
    thread.join(30)
    first = json_of(box["value"])["meta_info"]
    assert first["finish_reason"]["type"] == "abort"
    done = [t for _, t, _ in first["output_token_logprobs"]]
    assert 0 < len(done) < 300
    status, text = get(url, "/flush_cache")
    assert status == 200 and b"flushed" in text.lower()
    try:
        update = json_of(post(url, "/update_weights_from_disk", {"model_path": str(tiny_llama), "weight_version": "7"}))
        assert update["success"] is True
    finally:
        assert json_of(post(url, "/continue_generation", {}))["status"] == "ok"
    rest_params = {**params, "max_new_tokens": 300 - len(done)}
    rest = json_of(post(url, "/generate", {"input_ids": prompt + done, "return_logprob": True,
                                           "sampling_params": rest_params}))
    whole = reference(ref, prompt, temperature=0.0, max_tokens=300, ignore_eos=True, think_budget=40,
                      solution_budget=400)
    assert done + rest["output_ids"] == whole.token_ids  # the same weights, reloaded: the same rollout
    assert rest["meta_info"]["think_tokens"] == whole.think_tokens  # not 40 more: the rollout's budget
    assert rest["meta_info"]["weight_version"] == "7"
    assert rest["meta_info"]["weight_versions"] == [[0, "7"]]
    assert get_json(url, "/get_weight_version") == {"weight_version": "7"}


def test_a_rollout_across_an_in_flight_update_names_each_tokens_weights(url, loop, prompt, tiny_llama, tmp_path):
    """Paused in place mid-rollout, weights updated, continued: the tokens before the update name the old
    version, those after the new one (an async trainer's importance weights need to know)."""
    before = loop.engine.weight_version
    body = {"input_ids": prompt, "sampling_params": {"temperature": 0.0, "max_new_tokens": 200, "ignore_eos": True}}
    thread, box = in_thread(lambda: post(url, "/generate", body))
    wait_for_tokens(loop, 5)
    try:
        json_of(post(url, "/pause_generation", {"mode": "in_place"}))
        held = loop.call(lambda e: [len(s.output_ids) for r in e.requests.values() for s in r.seqs])[0]
        new = make_tiny_checkpoint("llama", tmp_path / "new", tiny_llama, seed=5)
        assert json_of(post(url, "/update_weights_from_disk", {"model_path": str(new), "weight_version": "v-next"}))[
            "success"]
    finally:
        json_of(post(url, "/continue_generation", {}))
    thread.join(60)
    try:
        meta = json_of(box["value"])["meta_info"]
        assert meta["weight_versions"] == [[0, before], [held, "v-next"]] and meta["weight_version"] == "v-next"
    finally:
        assert json_of(post(url, "/update_weights_from_disk", {"model_path": str(tiny_llama)}))["success"]


def test_flush_cache_refuses_while_requests_run(url, loop, prompt):
    thread, box = in_thread(lambda: post(url, "/generate", {
        "input_ids": prompt, "sampling_params": {"max_new_tokens": 400, "ignore_eos": True}}))
    wait_for_tokens(loop, 3)
    status, text = get(url, "/flush_cache")
    assert status == 400 and b"in flight" in text
    post(url, "/abort_request", {"abort_all": True})
    thread.join(30)
    assert json_of(box["value"])["meta_info"]["finish_reason"]["type"] == "abort"


def test_abort_request_by_rid(url, loop, prompt):
    body = {"input_ids": prompt, "rid": "rollout-17", "sampling_params": {"max_new_tokens": 400, "ignore_eos": True}}
    thread, box = in_thread(lambda: post(url, "/generate", body))
    wait_for_tokens(loop, 3)
    assert json_of(post(url, "/abort_request", {"rid": "rollout-1"}))["aborted"] == 1  # SGLang matches prefixes
    thread.join(30)
    meta = json_of(box["value"])["meta_info"]
    assert meta["id"] == "rollout-17" and meta["finish_reason"]["type"] == "abort"


def test_info_routes_a_router_and_slime_read(url, loop):
    for path in ("/server_info", "/get_server_info"):
        info = get_json(url, path)
        assert info["tp_size"] == 1 and info["dp_size"] == 1 and info["disaggregation_mode"] == "null"
        assert "model" not in info or "model_id" not in info  # sglang-router refuses both
    for path in ("/model_info", "/get_model_info"):
        info = get_json(url, path)
        assert info["is_generation"] is True and isinstance(info["architectures"], list)
    assert get(url, "/health_generate")[0] == 200
    assert get_json(url, "/get_load")[0]["num_reqs"] == 0


def test_release_and_resume_memory_occupation(url, loop, ref, prompt):
    assert json_of(post(url, "/release_memory_occupation", {})) is None
    assert loop.engine.sleeping
    thread, box = in_thread(lambda: post(url, "/generate", {"input_ids": prompt,
                                                             "sampling_params": {"temperature": 0.0,
                                                                                 "max_new_tokens": 5}}))
    time.sleep(0.3)
    assert thread.is_alive(), box  # waits for the memory
    assert json_of(post(url, "/resume_memory_occupation", {"tags": ["kv_cache", "weights"]})) is None
    thread.join(30)
    assert json_of(box["value"])["output_ids"] == reference(ref, prompt, temperature=0.0, max_tokens=5).token_ids


def sse(url: str, path: str, body) -> list:
    """The `data:` events of a streamed POST, parsed (`[DONE]` as the string)."""
    request = urllib.request.Request(url + path, data=json.dumps(body).encode(), method="POST",
                                     headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=120) as reply:
        lines = reply.read().decode().splitlines()
    return [line[6:] if line[6:] == "[DONE]" else json.loads(line[6:]) for line in lines if line.startswith("data: ")]


def test_sglang_stream_sends_all_so_far_then_done(url, ref, prompt):
    """SGLang's stream (slime's and AReaL's streaming clients): each chunk holds the whole output so far; the
    last names the finish reason, then `[DONE]`."""
    body = {"input_ids": prompt, "stream": True, "return_logprob": True,
            "sampling_params": {"temperature": 0.0, "max_new_tokens": 10, "ignore_eos": True}}
    events = sse(url, "/generate", body)
    assert events[-1] == "[DONE]" and len(events) >= 3
    chunks = events[:-1]
    ids = [c["output_ids"] for c in chunks]
    assert all(a == b[:len(a)] for a, b in itertools.pairwise(ids))  # cumulative, growing
    want = reference(ref, prompt, temperature=0.0, max_tokens=10, ignore_eos=True)
    assert ids[-1] == want.token_ids and chunks[-1]["meta_info"]["finish_reason"]["type"] == "length"
    assert all(c["meta_info"]["finish_reason"] is None for c in chunks[:-1])
    assert len(chunks[-1]["meta_info"]["output_token_logprobs"]) == 10


def test_a_resubmitted_rollout_reports_the_rollouts_counts(url, ref, prompt):
    """A rollout cut after its thought closed, resubmitted: the new request's tokens are all solution, the
    counts are the rollout's (think_tokens from the prompt, solution_tokens both parts), and the text is the
    new tokens' (no reasoning: the prompt holds the thought)."""
    params = {"temperature": 0.0, "max_new_tokens": 30, "ignore_eos": True,
              "custom_params": {"thinking_budget": 4, "solution_budget": 20}}
    whole = json_of(post(url, "/generate", {"input_ids": prompt, "sampling_params": params}))
    k = whole["meta_info"]["think_tokens"] + len(ref.engine.tokenizer.marker(None)) + 3  # 3 solution tokens in
    done = whole["output_ids"][:k]
    rest = json_of(post(url, "/generate", {"input_ids": prompt + done, "sampling_params": {
        **params, "max_new_tokens": 30 - k}}))
    assert done + rest["output_ids"] == whole["output_ids"]
    meta, was = rest["meta_info"], whole["meta_info"]
    assert meta["think_tokens"] == was["think_tokens"] == 4 and meta["forced_end"] == was["forced_end"]
    assert meta["solution_tokens"] == was["solution_tokens"] == 20
    assert rest["text"] == ref.engine.tokenizer.decode(rest["output_ids"], skip_special_tokens=False)
    usage = json_of(post(url, "/v1/completions", {"prompt": prompt + done, "max_tokens": 30 - k, "temperature": 0.0,
                                                  "ignore_eos": True, "thinking_budget": 4, "solution_budget": 20}))
    assert usage["usage"]["completion_tokens_details"]["reasoning_tokens"] == 0  # none generated by this request
    assert usage["choices"][0]["text"] == ref.engine.tokenizer.decode(rest["output_ids"])


def test_a_request_held_by_a_pause_and_aborted_says_abort(url, loop, prompt):
    """Sent while paused, aborted before it started: finish_reason abort on both native routes (not null)."""
    json_of(post(url, "/pause_generation", {"mode": "in_place"}))
    try:
        sgl = in_thread(lambda: post(url, "/generate", {"input_ids": prompt, "rid": "held-sgl",
                                                        "sampling_params": {"max_new_tokens": 5}}))
        vllm = in_thread(lambda: post(url, "/inference/v1/generate", {"token_ids": prompt, "request_id": "held-v",
                                                                        "sampling_params": {"max_tokens": 5}}))
        deadline = time.monotonic() + 10
        while loop.stats()["requests_waiting"] < 2:
            assert time.monotonic() < deadline, loop.stats()
            time.sleep(0.01)
        assert json_of(post(url, "/abort_request", {"abort_all": True}))["aborted"] == 2
        for thread, _ in (sgl, vllm):
            thread.join(30)
    finally:
        json_of(post(url, "/continue_generation", {}))
    assert json_of(sgl[1]["value"])["meta_info"]["finish_reason"]["type"] == "abort"
    assert json_of(vllm[1]["value"])["choices"][0]["finish_reason"] == "abort"


def test_health_generate_answers_while_paused(url, loop):
    json_of(post(url, "/pause_generation", {"mode": "in_place"}))
    try:
        start = time.perf_counter()
        status, body = get(url, "/health_generate")
        assert status == 200 and json.loads(body)["paused"] is True and time.perf_counter() - start < 5
    finally:
        json_of(post(url, "/continue_generation", {}))


# -- vLLM's RL routes: SkyRL, TRL ------------------------------------------------------------------------


def skyrl_params(**over) -> dict:
    """SkyRL's get_vllm_sampling_params (inference_servers/engine_utils.py)."""
    return {"min_tokens": 1, "skip_special_tokens": True, "include_stop_str_in_output": True, "max_tokens": 10,
            "temperature": 1.0, "top_p": 1.0, "top_k": -1, "min_p": 0.0, "logprobs": 0, "stop": None, **over}


def test_skyrl_generate(url, ref, prompt):
    body = {"sampling_params": skyrl_params(seed=4, thinking_token_budget=3), "model": MODEL, "token_ids": prompt}
    out = json_of(post(url, "/inference/v1/generate", body, headers={"X-Session-ID": "s1"}))
    choice = out["choices"][0]
    want = reference(ref, prompt, temperature=1.0, seed=4, max_tokens=10, min_tokens=1, think_budget=3)
    assert choice["token_ids"] == want.token_ids and choice["finish_reason"] in ("stop", "length")
    assert [e["logprob"] for e in choice["logprobs"]["content"]] == pytest.approx(want.logprobs, abs=1e-5)
    assert choice["think_tokens"] == want.think_tokens <= 3 and choice["forced_mask"] == want.forced_mask


def test_skyrl_pause_keep_and_resume_change_no_token(url, loop, ref, prompt):
    body = {"sampling_params": skyrl_params(temperature=0.0, max_tokens=120, ignore_eos=True), "model": MODEL,
            "token_ids": prompt}
    thread, box = in_thread(lambda: post(url, "/inference/v1/generate", body))
    wait_for_tokens(loop, 5)
    try:
        assert json_of(post(url, "/pause?mode=keep&clear_cache=false", None, raw=b""))["status"] == "paused"
        assert get_json(url, "/is_paused") == {"is_paused": True}
        time.sleep(0.2)
        assert thread.is_alive()
    finally:
        assert json_of(post(url, "/resume", None, raw=b""))["status"] == "resumed"
    thread.join(60)
    got = json_of(box["value"])["choices"][0]["token_ids"]
    assert got == reference(ref, prompt, temperature=0.0, max_tokens=120, ignore_eos=True).token_ids


def test_skyrl_sleep_wake_and_reset_cache(url, loop, ref, prompt):
    assert json_of(post(url, "/sleep?level=2", None, raw=b""))["status"] == "sleeping"
    assert get_json(url, "/is_sleeping") == {"is_sleeping": True}
    assert json_of(post(url, "/wake_up?tags=weights", None, raw=b""))["is_sleeping"] is True  # weights never left
    json_of(post(url, "/wake_up?tags=kv_cache", None, raw=b""))
    assert get_json(url, "/is_sleeping") == {"is_sleeping": False}
    assert json_of(post(url, "/reset_prefix_cache", {"reset_running_requests": False}))
    assert get_json(url, "/get_world_size?include_dp=true") == {"world_size": 1}
    out = json_of(post(url, "/inference/v1/generate", {"token_ids": prompt, "sampling_params": skyrl_params(
        temperature=0.0)}))
    assert out["choices"][0]["token_ids"] == reference(ref, prompt, temperature=0.0, max_tokens=10,
                                                       min_tokens=1).token_ids


def test_sleep_with_requests_in_flight_aborts_them(url, loop, prompt):
    thread, box = in_thread(lambda: post(url, "/inference/v1/generate", {
        "token_ids": prompt, "sampling_params": {"max_tokens": 400, "ignore_eos": True}}))
    wait_for_tokens(loop, 3)
    json_of(post(url, "/sleep?level=1", None, raw=b""))
    thread.join(30)
    assert json_of(box["value"])["choices"][0]["finish_reason"] == "abort"
    json_of(post(url, "/wake_up", None, raw=b""))
    assert not loop.engine.sleeping and empty(loop)


def test_vllm_abort_requests_by_id(url, loop, prompt):
    body = {"request_id": "r-9", "token_ids": prompt, "sampling_params": {"max_tokens": 400, "ignore_eos": True}}
    thread, box = in_thread(lambda: post(url, "/inference/v1/generate", body))
    wait_for_tokens(loop, 3)
    assert json_of(post(url, "/abort_requests", {"request_ids": ["r-9"]})) == {"status": "aborted", "aborted": 1}
    thread.join(30)
    out = json_of(box["value"])
    assert out["request_id"] == "r-9" and out["choices"][0]["finish_reason"] == "abort"


def test_older_wait_for_inflight_requests_false_is_abort(url, loop, prompt):
    thread, box = in_thread(lambda: post(url, "/inference/v1/generate", {
        "token_ids": prompt, "sampling_params": {"max_tokens": 400, "ignore_eos": True}}))
    wait_for_tokens(loop, 3)
    try:
        assert json_of(post(url, "/pause?wait_for_inflight_requests=false", None, raw=b""))["mode"] == "abort"
        thread.join(30)
    finally:
        json_of(post(url, "/resume", None, raw=b""))
    assert json_of(box["value"])["choices"][0]["finish_reason"] == "abort"


def test_sleep_wait_keeps_a_pause_the_client_made(url, loop):
    json_of(post(url, "/pause?mode=keep", None, raw=b""))
    try:
        json_of(post(url, "/sleep?mode=wait", None, raw=b""))
        assert get_json(url, "/is_paused") == {"is_paused": True}  # still the client's pause
        json_of(post(url, "/wake_up", None, raw=b""))
        assert get_json(url, "/is_paused") == {"is_paused": True}
    finally:
        json_of(post(url, "/resume", None, raw=b""))
    json_of(post(url, "/sleep?mode=wait", None, raw=b""))
    json_of(post(url, "/wake_up", None, raw=b""))
    assert get_json(url, "/is_paused") == {"is_paused": False}  # the pause it made to drain is undone


def test_trl_async_grpo_completions_with_token_ids(url, ref, prompt):
    """TRL's AsyncGRPO rollout worker: /v1/completions with a token-id prompt, return_token_ids, logprobs 0."""
    models = get_json(url, "/v1/models")
    assert models["data"][0]["max_model_len"] > 0
    body = {"model": MODEL, "prompt": prompt, "max_tokens": 7, "temperature": 0.0, "n": 1, "return_token_ids": True,
            "logprobs": 0}
    choice = json_of(post(url, "/v1/completions", body))["choices"][0]
    want = reference(ref, prompt, temperature=0.0, max_tokens=7)
    assert choice["token_ids"] == want.token_ids and choice["prompt_token_ids"] == prompt
    assert choice["logprobs"]["token_logprobs"] == pytest.approx(want.logprobs, abs=1e-5)
    assert json_of(post(url, "/pause?mode=keep", None, raw=b""))["mode"] == "keep"
    json_of(post(url, "/resume", None, raw=b""))


def test_pause_modes_from_query_and_body_must_agree(url):
    status, body = post(url, "/pause?mode=abort", {"mode": "keep"})
    assert status == 400 and body["error"]["param"] == "mode"
    assert post(url, "/pause?mode=sideways", None, raw=b"")[0] == 400


# -- the OpenAI routes with other engines' fields ---------------------------------------------------------

ROUTER_CHAT = {"logprobs": False, "stream": False, "no_stop_trim": False, "ignore_eos": False,
               "continue_final_message": False, "skip_special_tokens": True, "separate_reasoning": True,
               "stream_reasoning": True, "return_hidden_states": False}  # what sglang-router 0.3.2 adds


def chat(url, **body):
    return json_of(post(url, "/v1/chat/completions", {"model": MODEL, "messages": MESSAGES, **body}))


def test_the_fields_a_router_adds_are_taken(url, ref):
    out = chat(url, **ROUTER_CHAT, seed=3, max_completion_tokens=20,
               chat_template_kwargs={"thinking_budget": 4, "solution_budget": 5})
    want = ref.chat(MESSAGES, SamplingParams(seed=3, max_tokens=20, think_budget=4, solution_budget=5),
                    use_tqdm=False)[0].outputs[0]
    assert out["choices"][0]["message"]["content"] == want.solution_text
    assert out["choices"][0]["budget"]["think_tokens"] == want.think_tokens


def test_stop_kept_reasoning_joined_or_dropped_ids_returned(url, ref):
    budgets = {"thinking_budget": 4, "solution_budget": 24, "seed": 11}
    free = ref.chat(MESSAGES, SamplingParams(seed=11, think_budget=4, solution_budget=24), use_tqdm=False)[0]
    content = free.outputs[0].solution_text
    stop = content[3:6]
    kept = chat(url, **budgets, stop=[stop], no_stop_trim=True)["choices"][0]
    assert kept["message"]["content"] == content[: content.index(stop) + len(stop)]
    assert chat(url, **budgets, stop=[stop], include_stop_str_in_output=True)["choices"][0]["message"] == \
        kept["message"]
    joined = chat(url, **budgets, separate_reasoning=False)["choices"][0]["message"]
    assert "reasoning" not in joined and joined["content"].endswith(content) and len(joined["content"]) > len(content)
    dropped = chat(url, **budgets, include_reasoning=False)["choices"][0]["message"]
    assert "reasoning" not in dropped and dropped["content"] == content
    ids = chat(url, **budgets, return_token_ids=True, rid="mine")
    assert ids["id"] == "mine" and ids["choices"][0]["token_ids"] == free.outputs[0].token_ids


def test_special_tokens_kept_when_asked(url, ref, prompt):
    """A special token as the forced marker (token 1, <|im_start|>): dropped from the text by default, kept with
    skip_special_tokens false; the token ids are the same."""
    special = ref.engine.tokenizer.decode([1], skip_special_tokens=False)
    assert special and not ref.engine.tokenizer.decode([1])
    body = {"model": MODEL, "prompt": prompt, "max_tokens": 5, "temperature": 0.0, "return_token_ids": True,
            "thinking_budget": 2, "end_think": [1]}
    plain = json_of(post(url, "/v1/completions", body))["choices"][0]
    kept = json_of(post(url, "/v1/completions", {**body, "skip_special_tokens": False}))["choices"][0]
    assert plain["token_ids"] == kept["token_ids"] and plain["token_ids"][2] == 1
    assert special in kept["text"] and special not in plain["text"]


# -- one budget vocabulary -------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["thinking_budget", "thinking_token_budget", "think_budget"])
def test_every_route_takes_every_budget_name(url, ref, prompt, name):
    want = reference(ref, prompt, temperature=0.0, max_tokens=12, think_budget=2).token_ids
    chat = json_of(post(url, "/v1/completions", {"prompt": prompt, "max_tokens": 12, "temperature": 0.0,
                                                  "return_token_ids": True, name: 2}))
    assert chat["choices"][0]["token_ids"] == want
    ours = json_of(post(url, "/generate", {"prompt_token_ids": prompt, "max_tokens": 12, "temperature": 0.0,
                                           name: 2}))
    assert ours["outputs"][0]["completions"][0]["token_ids"] == want
    for params in ({"custom_params": {name: 2}}, {name: 2}):
        sgl = json_of(post(url, "/generate", {"input_ids": prompt, "sampling_params": {
            "temperature": 0.0, "max_new_tokens": 12, **params}}))
        assert sgl["output_ids"] == want
    for params in ({"extra_args": {name: 2}}, {name: 2}):
        vllm = json_of(post(url, "/inference/v1/generate", {"token_ids": prompt, "sampling_params": {
            "temperature": 0.0, "max_tokens": 12, **params}}))
        assert vllm["choices"][0]["token_ids"] == want


@pytest.mark.parametrize("path, body", [
    ("/v1/completions", {"prompt": "hi", "thinking_budgt": 2}),
    ("/v1/completions", {"prompt": "hi", "custom_params": {"thinking_budgt": 2}}),
    ("/generate", {"prompt_token_ids": [1, 2], "thinking_budgt": 2}),
    ("/generate", {"input_ids": [1, 2], "sampling_params": {"thinking_budgt": 2}}),
    ("/generate", {"input_ids": [1, 2], "sampling_params": {"custom_params": {"thinking_budgt": 2}}}),
    ("/inference/v1/generate", {"token_ids": [1, 2], "sampling_params": {"thinking_budgt": 2}}),
    ("/inference/v1/generate", {"token_ids": [1, 2], "sampling_params": {"extra_args": {"thinking_budgt": 2}}}),
])
def test_a_misspelt_budget_is_a_400_on_every_route(url, path, body):
    status, reply = post(url, path, body)
    assert status == 400 and "thinking_budgt" in reply["error"]["message"]


def test_two_budget_names_that_disagree_are_a_400(url):
    status, reply = post(url, "/inference/v1/generate", {"token_ids": [1, 2], "sampling_params": {
        "thinking_token_budget": 3, "extra_args": {"thinking_budget": 4}}})
    assert status == 400 and "disagree" in reply["error"]["message"]
    status, reply = post(url, "/generate", {"input_ids": [1, 2], "sampling_params": {
        "thinking_budget": 3, "custom_params": {"thinking_budget": 4}}})
    assert status == 400 and "custom_params.thinking_budget" in reply["error"]["message"]


# -- weights through a torch.distributed group a trainer opens --------------------------------------------

TRAINER = textwrap.dedent('''
    """A trainer as slime and AReaL write theirs: rank 0 of a group built on rendezvous + PrefixStore, the
    server's /init_weights_update_group and /update_weights_from_distributed posted first, then the
    broadcasts, tensor by tensor in the order named."""
    import json, sys, threading, urllib.error, urllib.request
    from datetime import timedelta
    import torch
    from safetensors.torch import load_file
    from torch.distributed.distributed_c10d import (Backend, PrefixStore, _new_process_group_helper, _world,
                                                    rendezvous)
    url, port, checkpoint, version, world = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4], int(sys.argv[5])

    def post(path, body, box):
        request = urllib.request.Request(url + path, data=json.dumps(body).encode(),
                                         headers={"Content-Type": "application/json"}, method="POST")
        try:
            with urllib.request.urlopen(request, timeout=120) as reply:
                box.append(json.loads(reply.read()))
        except urllib.error.HTTPError as e:  # a refused update: {"success": false} with a 400
            box.append(json.loads(e.read()))

    def call_while(path, body, work):
        box = []
        thread = threading.Thread(target=post, args=(path, body, box))
        thread.start()
        work()
        thread.join(120)
        return box[0]

    group = []
    def join():
        store, _, _ = next(rendezvous(f"tcp://127.0.0.1:{port}", 0, world, timeout=timedelta(seconds=60)))
        store = PrefixStore("weight_update_group", store)
        pg, _ = _new_process_group_helper(world, 0, [], Backend("gloo"), store, group_name="weight_update_group",
                                          timeout=timedelta(seconds=60))
        _world.pg_group_ranks[pg] = {i: i for i in range(world)}
        group.append(pg)
    # AReaL sends the port as a string
    joined = call_while("/init_weights_update_group", {"master_address": "127.0.0.1", "master_port": str(port),
                        "rank_offset": 1, "world_size": world, "group_name": "weight_update_group",
                        "backend": "gloo"}, join)
    weights = load_file(checkpoint)
    # first an update the server must refuse after receiving it (a name the model does not have): the
    # group stays in step, and the next update lands
    bogus = {"names": ["model.bogus.weight"], "dtypes": ["float32"], "shapes": [[3]],
             "group_name": "weight_update_group"}
    refused = call_while("/update_weights_from_distributed", bogus,
                         lambda: torch.distributed.broadcast(torch.ones(3), src=0, group=group[0]))
    names = sorted(weights)
    body = {"names": names, "dtypes": [str(weights[n].dtype).replace("torch.", "") for n in names],
            "shapes": [list(weights[n].shape) for n in names], "group_name": "weight_update_group",
            "flush_cache": False, "weight_version": version}
    def send():
        for n in names:
            torch.distributed.broadcast(weights[n].contiguous(), src=0, group=group[0])
    updated = call_while("/update_weights_from_distributed", body, send)
    destroyed = call_while("/destroy_weights_update_group", {"group_name": "weight_update_group"},
                           lambda: torch.distributed.destroy_process_group(group[0]))
    print(json.dumps([joined, refused, updated, destroyed]))
''')


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def update_from_a_trainer(url: str, checkpoint, version: str, world: int, tmp_path) -> None:
    script = tmp_path / "trainer.py"
    script.write_text(TRAINER)
    run = subprocess.run([sys.executable, str(script), url, str(free_port()), str(checkpoint / "model.safetensors"),
                          version, str(world)], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    joined, refused, updated, destroyed = json.loads(run.stdout.strip().splitlines()[-1])
    assert joined["success"] and updated["success"] and destroyed["success"], (joined, updated, destroyed)
    assert refused["success"] is False and "bogus" in refused["message"], refused


@pytest.mark.slow
def test_weights_from_a_trainer_process_over_gloo(url, loop, prompt, tiny_llama, tmp_path):
    new = make_tiny_checkpoint("llama", tmp_path / "new", tiny_llama, seed=3)
    update_from_a_trainer(url, new, "step-3", 2, tmp_path)
    assert loop.engine.weight_version == "step-3"
    out = json_of(post(url, "/generate", {"input_ids": prompt, "sampling_params": {"temperature": 0.0,
                                                                                     "max_new_tokens": 8}}))
    fresh = LLM(str(new), **engine_kwargs())
    assert out["output_ids"] == reference(fresh, prompt, temperature=0.0, max_tokens=8).token_ids
    assert out["meta_info"]["weight_version"] == "step-3"
    # back to the fixture's weights for the other tests
    assert json_of(post(url, "/update_weights_from_disk", {"model_path": str(tiny_llama)}))["success"]


@pytest.mark.slow
def test_weights_from_a_trainer_into_a_tensor_parallel_server(tiny_llama, tmp_path):
    """Tensor parallelism 2: the trainer's group has three ranks (itself, then one per engine rank); every rank
    receives each tensor whole and keeps its slices."""
    llm = LLM(str(tiny_llama), **engine_kwargs(max_model_len=256, tensor_parallel_size=2))
    try:
        with EngineLoop(llm.engine) as loop, serving(loop, ServerConfig(model_name=MODEL)) as url:
            new = make_tiny_checkpoint("llama", tmp_path / "new", tiny_llama, seed=4)
            update_from_a_trainer(url, new, "tp-1", 3, tmp_path)
            prompt = llm.encode_chat(MESSAGES)
            out = json_of(post(url, "/generate", {"input_ids": prompt, "sampling_params": {
                "temperature": 0.0, "max_new_tokens": 8}}))
    finally:
        llm.engine.close()
    fresh = LLM(str(new), **engine_kwargs())
    assert out["output_ids"] == reference(fresh, prompt, temperature=0.0, max_tokens=8).token_ids
    assert out["meta_info"]["weight_version"] == "tp-1"


def test_an_update_with_an_unknown_group_or_dtype_is_refused(url):
    status, reply = post(url, "/update_weights_from_distributed", {"names": ["x"], "dtypes": ["bfloat16"],
                                                                   "shapes": [[1]], "group_name": "nope"})
    assert status == 400 and reply["success"] is False and "nope" in reply["message"]
    status, reply = post(url, "/update_weights_from_distributed", {"names": ["x"], "dtypes": ["bfloat16"],
                                                                   "shapes": [[1]], "load_format": "flattened_bucket"})
    assert status == 400 and "flattened_bucket" in reply["message"]


@pytest.mark.parametrize("change, said", [({"rank_offset": 2}, "do not fit"), ({"rank_offset": 0}, "do not fit"),
                                          ({"backend": "mpi"}, "not supported"), ({"backend": "nccl"}, "CUDA")])
def test_a_join_that_cannot_work_is_refused_before_anyone_waits(url, change, said):
    """Checked on rank 0 before any rank tries to join: an answer at once, not a five-minute rendezvous."""
    start = time.perf_counter()
    status, reply = post(url, "/init_weights_update_group", {"master_address": "127.0.0.1", "master_port": 1,
                                                             "rank_offset": 1, "world_size": 2, "backend": "gloo",
                                                             **change})
    assert status == 400 and reply["success"] is False and said in reply["message"], reply
    assert time.perf_counter() - start < 10
