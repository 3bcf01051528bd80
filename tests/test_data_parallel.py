"""Data parallelism on CPU: N engine replicas (processes with gloo between them) give one engine's
seeded outputs in prompt order, weight updates reach every replica, a replica can itself be
tensor-parallel, and the replica processes end with the LLM."""
from __future__ import annotations

import gc
import signal

import pytest
import torch
from test_tensor_parallel import _alive, _gone

from elastic_decode import LLM, ElasticDecodeError, SamplingParams
from engines import tiny_llm

pytestmark = pytest.mark.slow

PROMPTS = [[1, 2, 3, i] for i in range(5)] + [[9, 8, 7, 6, 5, 4]]
PARAMS = SamplingParams(n=2, seed=5, think_budget=4, solution_budget=4, temperature=1.0)


def _llm(path, **kw) -> LLM:
    return tiny_llm(path, max_model_len=256, **kw)


def _ids(outputs):
    return [[(c.token_ids, c.forced_mask) for c in o.outputs] for o in outputs]


@pytest.fixture(scope="module")
def one(tiny_llama):
    return _llm(tiny_llama)


def test_replicas_give_one_engines_outputs_in_order(tiny_llama, one):
    want = _ids(one.generate(PROMPTS, PARAMS, use_tqdm=False))
    llm = _llm(tiny_llama, data_parallel_size=2)
    try:
        seen = []
        got = llm.generate(PROMPTS, PARAMS, use_tqdm=False, on_finished=lambda i, out: seen.append(i))
        assert _ids(got) == want
        assert [o.prompt_token_ids for o in got] == PROMPTS
        assert sorted(seen) == list(range(len(PROMPTS)))
        assert llm.last_stats.completions == 2 * len(PROMPTS)
        # Weight updates reach every replica: all prompts decode as one engine with the new weights.
        new = {name: p.detach() + 0.05 * torch.randn_like(p) for name, p in one.engine.model.hf_named_parameters()}
        assert llm.load_weights(new.items()) == one.load_weights(new.items())
        assert _ids(llm.generate(PROMPTS, PARAMS, use_tqdm=False)) == _ids(one.generate(PROMPTS, PARAMS,
                                                                                          use_tqdm=False))
        llm.sleep()
        llm.wake_up()
        with pytest.raises(ElasticDecodeError, match="non-finite"):
            llm.load_weights([("model.norm.weight", torch.full_like(new["model.norm.weight"], float("nan")))])
    finally:
        llm.close()


def test_a_replica_can_be_tensor_parallel(tiny_llama, one):
    one.load_weights(_original(tiny_llama))
    want = _ids(one.generate(PROMPTS, PARAMS, use_tqdm=False))
    llm = _llm(tiny_llama, data_parallel_size=2, tensor_parallel_size=2)
    try:
        assert _ids(llm.generate(PROMPTS, PARAMS, use_tqdm=False)) == want
    finally:
        llm.close()


def _original(path):
    from safetensors.torch import load_file

    return load_file(str(path / "model.safetensors")).items()


def test_replicas_end_with_the_llm_and_a_dead_one_is_an_error(tiny_llama):
    llm = _llm(tiny_llama, data_parallel_size=2)
    pids = [p.pid for p in llm.replicas.processes]
    del llm
    gc.collect()
    assert _gone(pids)
    llm = _llm(tiny_llama, data_parallel_size=2)
    replica = llm.replicas.processes[0]
    replica.send_signal(signal.SIGKILL)
    replica.wait(10)
    with pytest.raises(ElasticDecodeError, match="replica 1 exited"):
        llm.generate(PROMPTS, PARAMS, use_tqdm=False)
    llm.close()
    assert not _alive(replica.pid)


def test_bad_data_parallel_settings(tiny_llama):
    with pytest.raises(ElasticDecodeError, match="data_parallel_size must be a positive integer"):
        _llm(tiny_llama, data_parallel_size=0)
    with pytest.raises(ElasticDecodeError, match="two-call"):
        _llm(tiny_llama, data_parallel_size=2, budget_mode="two-call")
