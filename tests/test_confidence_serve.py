"""Confidence and early exit over HTTP: the OpenAI routes take SamplingParams' early-stop fields and return each
token's confidence (logprobs extension) and the completion's early exit (the `budget` extension)."""
from __future__ import annotations

import json

import pytest

pytest.importorskip("fastapi", reason="the serve extra is not installed (pip install 'elastic_decode[serve]')")
openai = pytest.importorskip("openai", reason="the test extra is not installed")

from elastic_decode import LLM, SamplingParams  # noqa: E402
from elastic_decode.engine.loop import EngineLoop  # noqa: E402
from elastic_decode.serve.app import ServerConfig  # noqa: E402

from serving import MODEL, engine_kwargs, post, serving  # noqa: E402

MESSAGES = [{"role": "user", "content": "What is 2 + 3?"}]


@pytest.fixture(scope="module")
def served(tiny_llama):
    llm = LLM(str(tiny_llama), **engine_kwargs())
    ref = LLM(str(tiny_llama), **engine_kwargs())  # the reference: the same checkpoint, off the server
    with EngineLoop(llm.engine) as loop:
        with serving(loop, ServerConfig(model_name=MODEL, max_n=8)) as url:
            yield url, loop, ref


def test_a_low_confidence_trace_stops_and_says_where(served):
    url, _, _ = served
    client = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0)
    # A threshold above any confidence: every trace stops at its first full window (2 tokens).
    reply = client.chat.completions.create(
        model=MODEL, messages=MESSAGES, n=2, seed=3, logprobs=True, max_tokens=30,
        extra_body={"thinking_budget": 12, "solution_budget": 4, "min_think": 12, "early_stop": "deepconf",
                    "deepconf_threshold": 1e9, "confidence_window": 2})
    for choice in reply.choices:
        budget = choice.model_extra["budget"]
        assert budget["early_exit"] == "low_confidence" and budget["exit_index"] == 2
        assert choice.finish_reason == "stop" and budget["think_tokens"] == 2
        entries = choice.logprobs.content
        assert len(entries) == 2 and all(e.model_extra["confidence"] > 0 for e in entries)
        assert budget["lowest_group_confidence"] == pytest.approx(sum(e.model_extra["confidence"] for e in entries) / 2)


def test_confidences_equal_the_engines(served):
    url, _, ref = served
    prompt = [5, 17, 42, 9]
    status, body = post(url, "/generate", {"prompt_token_ids": prompt, "max_tokens": 6, "seed": 1, "n": 2,
                                           "confidence": True, "temperature": 0.9})
    assert status == 200, body
    want = ref.generate([prompt], SamplingParams(max_tokens=6, seed=1, n=2, temperature=0.9, confidence=True),
                        use_tqdm=False)[0].outputs
    for got, expected in zip(body["outputs"][0]["completions"], want):
        assert got["token_ids"] == expected.token_ids
        assert got["confidences"] == pytest.approx(expected.confidences, rel=1e-6)
        assert got["lowest_group_confidence"] == pytest.approx(expected.lowest_group_confidence, rel=1e-6)
    status, body = post(url, "/v1/completions", {"model": MODEL, "prompt": "1 + 1 =", "max_tokens": 3, "logprobs": 0,
                                                  "confidence": True})
    assert status == 200 and len(body["choices"][0]["logprobs"]["token_confidences"]) == 3


@pytest.mark.parametrize("fields,param", [({"early_stop": "maybe"}, "early_stop"),
                                          ({"early_stop": "deer"}, "early_stop"),
                                          ({"deepconf_keep": True}, "deepconf_keep"),
                                          ({"deer_transitions": "Wait"}, "deer_transitions")])
def test_bad_early_stop_fields_are_a_400_naming_them(served, fields, param):
    url, _, _ = served
    status, body = post(url, "/v1/chat/completions", {"model": MODEL, "messages": MESSAGES, **fields})
    assert status == 400, body
    assert body["error"]["param"] == param


# -- as a hostile client would use them -------------------------------------------------------------------

HELD = {"n": 4, "early_stop": "deepconf", "deepconf_warmup": 2, "confidence_window": 4, "thinking_budget": 300,
        "min_think": 300, "solution_budget": 50, "max_tokens": 400, "ignore_eos": True}
# Transitions that a random model meets all the time: a probe is almost always pending.
PROBING = {"n": 2, "early_stop": "deer", "deer_transitions": list("aeiost"), "thinking_budget": 300, "min_think": 300,
           "solution_budget": 50, "max_tokens": 400, "ignore_eos": True, "deer_max_probes": 1000}


@pytest.mark.parametrize("fields", [HELD, PROBING], ids=["deepconf-warmup-held", "deer-probes-pending"])
def test_a_vanished_client_leaves_no_trace_or_probe_behind(served, fields):
    from test_serve_faults import raw_request

    from serving import empty, get, wait_for_tokens

    url, loop, _ = served
    sock = raw_request(url, "/v1/completions", json.dumps({"model": MODEL, "prompt": "go", **fields}).encode())
    wait_for_tokens(loop, 20)
    assert loop.stats()["kv_blocks_used"] > 0
    sock.close()
    assert empty(loop, wait=5.0), loop.stats()  # held traces, probes and their shared blocks are all gone
    status, body = get(url, "/metrics")
    assert status == 200 and "elastic_decode_kv_blocks_used 0" in body.decode()


def test_pauses_composed_around_probing_requests_end_with_every_block_back(served):
    from serving import empty, in_thread, wait_for_tokens

    url, loop, _ = served
    short = {**PROBING, "thinking_budget": 40, "min_think": 40, "solution_budget": 4, "max_tokens": 60}
    thread, box = in_thread(lambda: post(url, "/v1/completions", {"model": MODEL, "prompt": "go", **short}))
    wait_for_tokens(loop, 10)
    loop.pause("keep")  # probes and traces stay, frozen
    loop.pause("keep")  # a second pause on top of the first
    loop.resume()
    thread.join(timeout=120)
    status, body = box["value"]
    assert status == 200, body
    assert all(c["finish_reason"] in ("stop", "length") for c in body["choices"])
    assert empty(loop, wait=5.0), loop.stats()
