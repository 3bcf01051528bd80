"""The engine loop without HTTP: deltas add up to what `LLM` returns, pause("wait") called off by a
resume, a callback that raises, close() with requests in flight."""
from __future__ import annotations

import threading
import time

import pytest

from elastic_decode import ElasticDecodeError, SamplingParams
from elastic_decode.engine.loop import EngineLoop
from engines import tiny_llm


_llm = tiny_llm


class Collector:
    def __init__(self):
        self.tokens, self.reasons, self.finished = {}, {}, threading.Event()
        self.updates = 0

    def __call__(self, update):
        self.updates += 1
        for d in update.completions:
            self.tokens.setdefault(d.index, []).extend(d.token_ids)
            if d.finish_reason is not None:
                self.reasons[d.index] = d.finish_reason
        if update.finished:
            self.finished.set()


@pytest.fixture(scope="module")
def pair(tiny_llama):
    return _llm(tiny_llama), _llm(tiny_llama)


def test_deltas_add_up_to_the_llm_output(pair):
    ref, served = pair
    params = SamplingParams(n=3, seed=2, think_budget=5, solution_budget=4)
    prompt = ref.encode("tell me")
    want = ref.generate([prompt], params, use_tqdm=False)[0].outputs
    with EngineLoop(served.engine) as loop:
        got = Collector()
        loop.submit(prompt, params, got)
        assert got.finished.wait(60)
    assert [got.tokens[i] for i in range(3)] == [c.token_ids for c in want]
    assert [got.reasons[i] for i in range(3)] == [c.finish_reason for c in want]
    assert got.updates > 1  # streamed, not all at the end


def test_a_resume_calls_off_a_draining_pause(pair):
    _, served = pair
    with EngineLoop(served.engine) as loop:
        got = Collector()
        loop.submit([1, 2, 3], SamplingParams(max_tokens=300, ignore_eos=True), got)
        errors = []
        waiter = threading.Thread(target=lambda: errors.append(_raises(lambda: loop.pause("wait"))))
        waiter.start()
        time.sleep(0.2)
        loop.resume()
        waiter.join(30)
        assert isinstance(errors[0], ElasticDecodeError) and not loop.paused
        assert got.finished.wait(60) and got.reasons[0] == "length" and len(got.tokens[0]) == 300


def _raises(fn):
    try:
        fn()
    except Exception as e:  # noqa: BLE001 - returned to the test
        return e
    return None


def test_a_raising_callback_aborts_only_its_request(pair):
    _, served = pair

    def bad(update):
        raise RuntimeError("caller bug")

    with EngineLoop(served.engine) as loop:
        good = Collector()
        loop.submit([1, 2, 3], SamplingParams(max_tokens=20, ignore_eos=True), bad)
        loop.submit([4, 5, 6], SamplingParams(max_tokens=20, ignore_eos=True), good)
        assert good.finished.wait(60) and len(good.tokens[0]) == 20
        assert loop.call(lambda e: e.has_unfinished()) is False
        assert loop.stats()["kv_blocks_used"] == 0


def test_close_aborts_what_is_in_flight(pair):
    _, served = pair
    loop = EngineLoop(served.engine).start()
    got = Collector()
    loop.submit([1, 2, 3], SamplingParams(max_tokens=400, ignore_eos=True), got)
    while not got.tokens:
        time.sleep(0.01)
    loop.close()
    assert got.finished.is_set() and got.reasons[0] == "abort" and 0 < len(got.tokens[0]) < 400
    assert not served.engine.has_unfinished()
    with pytest.raises(ElasticDecodeError, match="closed"):
        loop.submit([1], SamplingParams(), got)
    # The LLM API works on the engine again once no loop owns it.
    assert len(served.generate([[1, 2]], SamplingParams(max_tokens=3, ignore_eos=True),
                               use_tqdm=False)[0].outputs[0].token_ids) == 3
