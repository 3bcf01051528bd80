"""Think with confidence (docs/confidence.md): token confidence on every backend, DeepConf's online stop and votes,
DEER's probes."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from elastic_decode import SamplingParams
from elastic_decode.core import confidence
from elastic_decode.core.block_manager import BlockManager
from elastic_decode.core.scheduler import Scheduler
from elastic_decode.core.sequence import Sequence
from elastic_decode.core.step import StepResult
from elastic_decode.errors import InvalidRequestError
from elastic_decode.kernels import CONF_K, DONE, HAVE_TRITON, SOLVING, THINKING, reference, sampling_batch
from elastic_decode.kernels import cpu as cpu_ops
from elastic_decode.utils.answers import confidence_vote, majority_vote

from engines import tiny_llm


def torch_confidence(logits: torch.Tensor) -> torch.Tensor:
    """The formula as DeepConf states it: minus the mean of the top-k logprobs of the raw distribution."""
    logp = torch.log_softmax(logits.double(), dim=-1)
    return -logp.topk(min(CONF_K, logits.shape[1]), dim=-1).values.mean(dim=-1)


def _rows(kind: str, n: int, vocab: int, gen: torch.Generator) -> torch.Tensor:
    if kind == "randn":
        return torch.randn(n, vocab, generator=gen) * 4
    if kind == "ascending":  # every tile above the last: the gather bound rises tile by tile
        return torch.linspace(-6, 6, vocab).repeat(n, 1) + torch.rand(n, vocab, generator=gen) * 1e-3
    if kind == "flat":  # ties everywhere: the CONF_K-th value is shared by thousands of tokens
        x = torch.zeros(n, vocab)
        x[:, 3] = 2.0
        return x
    if kind == "overflow":  # a tile far above the first one, but for four low columns: its bound stays low
        x = torch.randn(n, vocab, generator=gen)
        x[:, 1024:2048] = 50 + torch.rand(n, 1024, generator=gen)
        x[:, 1024:2048].view(n, 8, 128)[:, :, :4] = -50
        return x
    raise ValueError(kind)


BACKENDS = ["reference", "cpu"] + (["triton"] if HAVE_TRITON else [])


def _sampler(backend: str):
    if backend == "reference":
        return reference.sample_with_budget
    if backend == "cpu":
        return cpu_ops.sample_with_budget
    from elastic_decode.kernels import sample_with_budget
    return sample_with_budget


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kind,vocab,chunks", [("randn", 3001, 2), ("randn", 777, 1), ("randn", 4096, 1),
                                               ("ascending", 5000, 1),
                                               ("flat", 2100, 3), ("overflow", 4096, 1)])
def test_token_confidence_is_the_formula_on_every_backend(backend, kind, vocab, chunks):
    gen = torch.Generator().manual_seed(vocab + chunks)
    n = 4
    logits = _rows(kind, n, vocab, gen)
    # Rows that sample (top-k, top-p, min-p), a greedy one, and one DONE already: the confidence is the raw
    # distribution's whatever the row's filters, and 0 for a DONE row.
    params, state = sampling_batch(n, temperature=0.7, top_k=5, seeds=range(n))
    params.temperature[1] = 0.0
    params.top_k[2], params.top_p[2] = 0, 0.9
    state.phase[3] = DONE
    kwargs = {"num_chunks": chunks} if backend == "triton" else {}
    _sampler(backend)(logits, params, state, confidence=True, **kwargs)
    want = torch_confidence(logits).float()
    assert torch.allclose(state.confidence[:3], want[:3], rtol=1e-5, atol=1e-4), (state.confidence, want)
    assert state.confidence[3] == 0.0


@pytest.mark.parametrize("backend", BACKENDS)
def test_token_confidence_in_bf16_and_while_forcing(backend):
    gen = torch.Generator().manual_seed(5)
    logits = (torch.randn(3, 1500, generator=gen) * 3).bfloat16()
    params, state = sampling_batch(3, temperature=1.0, seeds=range(3))
    state.phase[0] = THINKING
    params.think_budget[0] = 0  # budget spent: the marker is forced, and the step's confidence is still reported
    _sampler(backend)(logits, params, state, confidence=True)
    assert state.forced[0] == 1
    assert torch.allclose(state.confidence, torch_confidence(logits.float()).float(), rtol=1e-5, atol=1e-4)


# -- the trace's scores --------------------------------------------------------------------------------------


def test_group_tail_and_threshold_match_their_statements():
    rng = np.random.default_rng(0)
    values = list(rng.normal(10, 2, 200))
    means = np.convolve(values, np.ones(16) / 16, mode="valid")
    assert confidence.window_means(values, 16) == pytest.approx(list(means))
    assert confidence.lowest_group_confidence(values, 16) == pytest.approx(means.min())
    assert confidence.lowest_group_confidence(values[:10], 16) == pytest.approx(np.mean(values[:10]))
    assert confidence.tail_confidence(values, 16) == pytest.approx(np.mean(values[-16:]))
    scores = list(rng.normal(5, 1, 16))
    for keep in (0.1, 0.5, 0.9):
        assert confidence.warmup_threshold(scores, keep) == pytest.approx(np.percentile(scores, 100 * (1 - keep)))


def test_an_infinite_confidence_keeps_the_windows_finite():
    # A row with fewer than 20 finite logits is infinitely confident; its windows are high, never NaN.
    values = [5.0, 5.0, float("inf"), 5.0, 5.0, 5.0, 1.0, 1.0]
    at, running = confidence.first_low_window(values, 0, 2, 4.0, 0.0)
    assert at == 6 and math.isfinite(running)  # the window (5, 1) is the first below 4
    assert confidence.lowest_group_confidence(values, 2) == pytest.approx(1.0)
    assert confidence.window_means(values, 2)[-1] == pytest.approx(1.0)
    assert confidence.tail_confidence(values, 8) > 1e5


def test_weighted_and_filtered_votes():
    # Three low-confidence traces say 7, two confident ones say 9.
    answers, scores = ["7", "7", "7", "9", "9"], [1.0, 1.0, 1.0, 5.0, 5.0]
    assert majority_vote(answers).answer == "7"
    assert majority_vote(answers, scores).answer == "9"
    assert majority_vote(answers, scores).weight_share == pytest.approx(10 / 13)
    kept = confidence_vote(answers, scores, keep=0.4)  # the top 2 by confidence
    assert kept.answer == "9" and kept.answered == 2 and kept.answers == tuple(answers)
    assert confidence_vote(answers, [None] * 5).answer is None


def test_early_stop_settings_are_checked():
    for bad in [dict(early_stop="maybe"), dict(early_stop="deer"), dict(deepconf_keep=0.0),
                dict(early_stop="deepconf", deepconf_action="answer"), dict(deepconf_action="pause"),
                dict(deer_transitions="Wait"), dict(confidence_window=0), dict(deepconf_consensus=1.5),
                dict(deer_transitions=[]), dict(deer_transitions=["x" * 33]), dict(deer_answer_prefix="The answer is"),
                dict(confidence=1)]:
        with pytest.raises(InvalidRequestError):
            SamplingParams(**bad)
    SamplingParams(early_stop="deer", think_budget=10, deer_transitions=["Wait"])


# -- DeepConf's online stop, scripted ------------------------------------------------------------------------


def _trace(i: int, threshold: float | None, window: int, think: bool = True) -> Sequence:
    params = SamplingParams(think_budget=100 if think else None, confidence_window=window, early_stop="deepconf",
                            deepconf_threshold=threshold)
    seq = Sequence(seq_id=i, request_id=i, sample_index=0, token_ids=[1, 2, 3], num_prompt_tokens=3, params=params,
                   seed=i, marker=(7,), stop_ids=(2,), max_new_tokens=100)
    seq.conf_threshold = threshold
    return seq


def _chunk(seqs, confs: list[list[float]], think: bool = True) -> StepResult:
    """A chunk in which every trace samples len(confs[i]) thinking (or plain) tokens 10, 11, ..."""
    n = len(seqs)
    tokens = [[10 + s.num_generated + j for j in range(len(c))] for s, c in zip(seqs, confs)]
    return StepResult(
        tokens=tokens, logprobs=[[-1.0] * len(c) for c in confs], forced=[[0] * len(c) for c in confs],
        phase=[THINKING if think else SOLVING] * n,
        think_count=[s.think_count + len(c) if think else 0 for s, c in zip(seqs, confs)],
        solution_count=[0 if think else s.solution_count + len(c) for s, c in zip(seqs, confs)],
        force_pos=[0] * n, recent=[[t[-1]] for t in tokens], forced_end=[0] * n, finish=[0] * n, confidence=confs)


@pytest.mark.parametrize("steps", [1, 3, 8])
@pytest.mark.parametrize("think", [True, False])
def test_a_trace_whose_confidence_drops_stops_at_that_token(steps, think):
    window, threshold = 4, 5.0
    confs = [6.0] * 9 + [1.0] + [6.0] * 10  # the four windows holding the 1.0 have mean 4.75: the first ends at 9
    means = confidence.window_means(confs, window)
    stop_at = next(i for i, m in enumerate(means) if m < threshold) + window - 1
    manager = BlockManager(64, 4)
    scheduler = Scheduler(manager, max_num_seqs=4, max_num_batched_tokens=64, num_steps=steps)
    low, steady = _trace(0, threshold, window, think), _trace(1, 0.0, window, think)
    for s in (low, steady):
        scheduler.add(s)
    scheduler.schedule()  # the prefill
    seqs = (low, steady)
    done = 0
    while done < len(confs):
        batch = scheduler.schedule()
        k = min(steps, len(confs) - done)
        live = [s for s in seqs if s in batch.seqs]
        result = _chunk(live, [confs[done : done + k] if s is low else [6.0] * k for s in live], think)
        scheduler.postprocess(batch, result)
        done += k
    assert low.status.name == "FINISHED" and low.early_exit == confidence.LOW_CONFIDENCE
    assert low.num_generated == stop_at + 1 == low.exit_index
    assert low.confidences == confs[: stop_at + 1] and len(low.logprobs) == stop_at + 1
    assert low.output_ids == [10 + j for j in range(stop_at + 1)]
    assert (low.think_count if think else low.solution_count) == stop_at + 1
    chunk_end = min((stop_at // steps + 1) * steps, len(confs))  # the chunk that passed the stop point
    assert stop_at == 9 and low.discarded == chunk_end - (stop_at + 1)
    # The other trace is untouched: every token, every count.
    assert steady.early_exit is None and steady.num_generated == len(confs)
    assert (steady.think_count if think else steady.solution_count) == len(confs)
    assert manager.num_free == 64 - len(steady.block_table)


@pytest.mark.parametrize("steps", [1, 4])
def test_answer_mode_ends_thinking_with_the_marker_where_confidence_drops(tiny_llama, steps):
    llm = tiny_llm(tiny_llama, num_scheduler_steps=steps)
    base = dict(n=2, temperature=1.0, seed=3, confidence=True, think_budget=40, solution_budget=6, min_think=40, ignore_eos=True)
    plain = llm.generate(["12 + 5 ="], SamplingParams(**base))[0]
    trace = plain.outputs[0]
    window = 4
    means = confidence.window_means(trace.confidences, window)
    cut = len(means) // 2
    threshold = sorted(means[:cut + 1])[0] + 1e-6  # the first window mean at or below this is where it exits
    exit_at = next(i for i, m in enumerate(means) if m < threshold) + window - 1
    out = llm.generate(["12 + 5 ="], SamplingParams(**base, early_stop="deepconf", deepconf_threshold=threshold,
                                                     confidence_window=window, deepconf_action="answer"))[0]
    c = out.outputs[0]
    assert c.early_exit == confidence.LOW_CONFIDENCE_ANSWER and c.exit_index == exit_at + 1
    assert c.token_ids[: exit_at + 1] == trace.token_ids[: exit_at + 1]
    assert c.logprobs[: exit_at + 1] == pytest.approx(trace.logprobs[: exit_at + 1])
    assert c.think_tokens == exit_at + 1 and c.forced_end and c.solution_tokens == 6
    assert llm.engine.stats()["kv_blocks_used"] == 0


def test_warmup_sets_the_threshold_from_the_first_traces(tiny_llama):
    llm = tiny_llm(tiny_llama)
    params = SamplingParams(n=6, temperature=1.0, seed=8, think_budget=30, solution_budget=4, min_think=30,
                            early_stop="deepconf", deepconf_warmup=3, deepconf_keep=0.1, confidence_window=4)
    out = llm.generate(["3 * 4 ="], params)[0]
    warm = [confidence.lowest_group_confidence(c.confidences[: c.think_tokens], 4) for c in out.outputs[:3]]
    assert out.deepconf_threshold == pytest.approx(np.percentile(warm, 90))
    assert any(c.early_exit == confidence.LOW_CONFIDENCE for c in out.outputs[3:])
    assert all(c.early_exit is None for c in out.outputs[:3])  # warm-up traces run whole
    for c in out.outputs[3:]:  # a later trace stops exactly where its window first falls below
        means = confidence.window_means(c.confidences, 4)
        first = next((i for i, m in enumerate(means) if m < out.deepconf_threshold), None)
        if c.early_exit == confidence.LOW_CONFIDENCE:
            assert first is not None and c.exit_index == first + 4 == len(c.token_ids)
            assert c.finish_reason == "stop" and c.solution_text == ""
        else:
            assert first is None or first + 4 > c.think_tokens
    assert out.tokens_spent == sum(len(c.token_ids) for c in out.outputs)
    assert llm.engine.stats()["kv_blocks_used"] == 0


# -- DEER ------------------------------------------------------------------------------------------------------


def _transitions(llm, trace) -> tuple[str, ...]:
    """The text of a few tokens a trace thinks (so a rerun meets them as transitions)."""
    texts = [llm.engine.tokenizer.decode([t]).strip() for t in trace.token_ids[3:30]]
    found = tuple(dict.fromkeys(t for t in texts if t))[:3]
    assert found
    return found


DEER_BASE = dict(n=2, temperature=1.0, seed=5, confidence=True, think_budget=40, solution_budget=5, min_think=40,
                 ignore_eos=True)


def test_deer_probes_answer_on_shared_blocks_and_leave_the_trace_as_it_was(tiny_llama, monkeypatch):
    from elastic_decode.engine import early_exit

    llm = tiny_llm(tiny_llama, block_size=4)  # small blocks: every probe shares some and recomputes a partial one
    plain = llm.generate(["7 - 2 ="], SamplingParams(**DEER_BASE))[0]
    probes = []
    judge = early_exit.probe_confidence

    def recorded(probe, decode, depth=1):
        probes.append((list(probe.token_ids[: probe.num_prompt_tokens]), probe.output_ids, probe.cached_tokens))
        assert depth == 2  # the prefix below leaves two braces open
        return judge(probe, decode, depth)

    monkeypatch.setattr(early_exit, "probe_confidence", recorded)
    prefix = "Answer: {\\boxed{"
    params = SamplingParams(**DEER_BASE, early_stop="deer", deer_threshold=1.0, deer_answer_prefix=prefix,
                            deer_transitions=_transitions(llm, plain.outputs[0]))
    never = llm.generate(["7 - 2 ="], params)[0]
    assert probes and sum(c.probes for c in never.outputs) >= len(probes)
    opening = llm.engine.tokenizer.hf(prefix, add_special_tokens=False)["input_ids"]
    marker = list(llm.engine.tokenizer.marker(None))
    assert all(context[-len(opening) - len(marker):] == marker + opening for context, _, _ in probes)
    assert any(cached > 0 for _, _, cached in probes)  # the trace's blocks were shared, not computed again
    # Each probe's greedy answer is what a fresh engine answers to the same context (no shared K/V went wrong).
    fresh = tiny_llm(tiny_llama)
    for context, answer, _ in probes:
        alone = fresh.generate([context], SamplingParams(temperature=0.0, max_tokens=len(answer)), use_tqdm=False)
        assert alone[0].outputs[0].token_ids == answer
    for a, b in zip(plain.outputs, never.outputs):  # no answer was confident enough: the traces are untouched
        assert b.early_exit is None
        assert (b.token_ids, b.forced_mask, b.think_tokens, b.solution_tokens) == \
               (a.token_ids, a.forced_mask, a.think_tokens, a.solution_tokens)
        assert b.logprobs == pytest.approx(a.logprobs)
    assert never.tokens_spent == sum(len(c.token_ids) for c in never.outputs) + sum(len(a) for _, a, _ in probes)
    assert llm.engine.stats()["kv_blocks_used"] == 0


@pytest.mark.parametrize("steps", [1, 4])
def test_a_confident_probe_ends_thinking_at_its_transition(tiny_llama, monkeypatch, steps):
    from elastic_decode.engine import early_exit

    llm = tiny_llm(tiny_llama, num_scheduler_steps=steps)
    plain = llm.generate(["7 - 2 ="], SamplingParams(**DEER_BASE))[0]
    monkeypatch.setattr(early_exit, "probe_confidence", lambda probe, decode, depth=1: 0.99)  # every answer is sure
    params = SamplingParams(**DEER_BASE, early_stop="deer", deer_threshold=0.95,
                            deer_transitions=_transitions(llm, plain.outputs[0]))
    out = llm.generate(["7 - 2 ="], params)[0]
    marker = llm.engine.tokenizer.marker(None)
    exited = [(a, b) for a, b in zip(plain.outputs, out.outputs) if b.early_exit == confidence.DEER]
    assert exited
    for a, b in exited:  # the trace up to the transition, then the forced marker, then its answer
        k = b.exit_index
        assert b.token_ids[:k] == a.token_ids[:k] and b.logprobs[:k] == pytest.approx(a.logprobs[:k])
        assert b.think_tokens == k and b.forced_end and b.token_ids[k : k + len(marker)] == list(marker)
        assert all(b.forced_mask[k : k + len(marker)]) and b.solution_tokens == 5
        assert b.probe_confidences and b.probe_confidences[-1] == (k, 0.99)
    assert out.tokens_spent >= sum(len(c.token_ids) for c in out.outputs)
    assert llm.engine.stats()["kv_blocks_used"] == 0


def test_a_probe_answer_is_scored_up_to_the_brace_that_closes_the_box(tiny_llama):
    from elastic_decode.engine.early_exit import probe_confidence

    llm = tiny_llm(tiny_llama)
    tokenizer = llm.engine.tokenizer
    ids = tokenizer.hf("\\frac{1}{2}} and more", add_special_tokens=False)["input_ids"]
    probe = Sequence(seq_id=0, request_id=0, sample_index=-1, token_ids=[1] + ids, num_prompt_tokens=1,
                     params=SamplingParams(), seed=0, marker=(7,), stop_ids=(), max_new_tokens=20)
    probe.logprobs = [math.log(0.5)] * len(ids)
    closes = next(i for i in range(len(ids)) if tokenizer.decode(ids[: i + 1]).count("}") == 3)
    probe.logprobs[closes + 1 :] = [math.log(0.01)] * (len(ids) - closes - 1)  # after the box: not counted
    assert probe_confidence(probe, lambda t: tokenizer.decode(t)) == pytest.approx(0.5)
    probe.token_ids = [1] + tokenizer.hf("\\frac{1}{2", add_special_tokens=False)["input_ids"]
    assert probe_confidence(probe, lambda t: tokenizer.decode(t)) is None  # never closed: never confident


# -- the command lines ---------------------------------------------------------------------------------------


def test_eval_compares_early_stops_with_tokens_per_problem(tiny_models, tmp_path):
    import json

    from elastic_decode.eval import main

    task = tmp_path / "task.jsonl"
    task.write_text("".join(json.dumps({"prompt": f"What is {a} + 1?", "answer": str(a + 1)}) + "\n" for a in range(3)))
    out = tmp_path / "run"
    code = main(["--model", str(tiny_models["llama"]), "--task", str(task), "--num-problems", "3",
                 "--think-budgets", "8", "--solution-budget", "3", "-n", "4", "--temperature", "1.0", "--seed", "2",
                 "--early-stop", "none,deepconf,deer", "--confidence-window", "2", "--deepconf-warmup", "2",
                 "--deepconf-keep", "0.5", "--deer-threshold", "0.0", "--output-dir", str(out), "--save-completions",
                 "--no-progress", "--kv-cache-memory-gb", "0.05", "--device", "cpu"])
    assert code == 0
    rows = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    assert [r["early_stop"] for r in rows] == ["none", "deepconf", "deer"]
    records = [json.loads(line) for line in (out / "completions.jsonl").read_text().splitlines()]
    for row in rows:
        mine = [r for r in records if r["early_stop"] == row["early_stop"]]
        kept = sum(r["total_tokens"] for r in mine) / 3
        if row["early_stop"] == "none":  # nothing cut, no probes: tokens per problem = the completions' tokens
            assert row["tokens_per_problem"] == pytest.approx(kept) and row["early_exit_rate"] == 0
        else:
            assert row["tokens_per_problem"] >= kept
        assert row["early_exit_rate"] == pytest.approx(sum(r["early_exit"] is not None for r in mine) / len(mine))
    assert "tokens_per_problem" in (out / "results.csv").read_text().splitlines()[0]


def test_generate_votes_under_deepconf_and_rejects_bad_flags(tiny_llama):
    from test_cli import assert_clean_error, run_cli

    result = run_cli("--model", tiny_llama, "--prompt", "2 + 2 =", "-n", "4", "--vote", "--early-stop", "deepconf",
                     "--confidence-window", "2", "--deepconf-warmup", "2", "--think-budget", "6",
                     "--solution-budget", "3", "--seed", "1", "--device", "cpu")
    assert result.returncode == 0, result.stderr
    assert "[confidence-weighted vote:" in result.stdout and "tokens spent in all" in result.stdout
    assert_clean_error(run_cli("--model", tiny_llama, "--prompt", "x", "--early-stop", "deer", "--think-budget",
                               "none", "--device", "cpu"), "needs a think_budget")


def test_a_stream_holds_back_what_a_pending_probe_may_cut():
    seq = _trace(0, None, 4)
    seq.token_ids += [10, 11, 12, 13, 14]
    assert seq.settled == 5
    seq.pending_at = 2  # a probe forked before output token 2 is deciding
    assert seq.settled == 2
    seq.phase = SOLVING  # the thought ended anyway: no probe can cut it back now
    assert seq.settled == 5


def test_a_rewind_below_prefix_cached_blocks_computes_the_trace_again():
    manager = BlockManager(32, 4)
    scheduler = Scheduler(manager, max_num_seqs=4, max_num_batched_tokens=64)
    seq = _trace(0, None, 4)
    seq.token_ids += list(range(20, 30))  # 10 output tokens, as after a preemption
    scheduler.add(seq)
    scheduler.schedule()  # its re-prefill registers the full blocks of the output too
    assert seq.hashed_tokens == 12 and seq.status.name == "RUNNING"
    seq.think_count = 10
    assert scheduler.rewind(seq, 4) == 6  # keeps 3 + 4 tokens: below the 12 registered
    assert seq.status.name == "WAITING" and seq.block_table == [] and seq in scheduler.waiting
    assert seq.output_ids == [20, 21, 22, 23] and seq.think_count == 4
    seq2 = _trace(1, None, 4)
    seq2.token_ids += list(range(20, 30))
    scheduler.add(seq2)
    scheduler.schedule()
    assert scheduler.rewind(seq2, 9) == 1  # keeps 12 tokens: the registered blocks stay as they are
    assert seq2.status.name == "RUNNING" and seq2.block_table
