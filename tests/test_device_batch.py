"""The persistent device batch (device_batch.py): resident decode rows updated by deltas.

- The delta logic on its own: random joins, leaves, stale rows (epoch bumps), block-table growth,
  reordered batches and stop lists wider than the default; after every update the resident rows,
  read in batch order, equal the rows built from scratch, and the rows past the batch are padding.
- The engine on it: random workloads (requests arriving between steps, finishes, preemptions,
  n > 1 forks, chunk sizes 1-16) give the completions of one-step decoding with a cache too large
  to preempt, and every row is free afterwards.
"""
from __future__ import annotations

import random

import pytest
import torch

from elastic_decode import LLM, SamplingParams
from elastic_decode.worker.device_batch import DeviceBatch, RowPlanner, decode_fields, upload
from elastic_decode.kernels import DONE
from elastic_decode.core.sequence import Sequence


def _sequence(rng: random.Random, seq_id: int) -> Sequence:
    prompt = [rng.randrange(100) for _ in range(rng.randint(1, 40))]
    params = SamplingParams(temperature=rng.choice([0.0, 0.7, 1.0]), top_k=rng.choice([0, 5]),
                            think_budget=rng.choice([None, 0, 9]), solution_budget=rng.choice([None, 4]))
    stops = tuple(rng.sample(range(100, 200), rng.choice([1, 2, 12])))  # 12: wider than STOP_WIDTH
    marker = tuple(range(300, 300 + rng.randint(1, 4)))
    seq = Sequence(seq_id=seq_id, request_id=seq_id, sample_index=0, token_ids=prompt, num_prompt_tokens=len(prompt),
                   params=params, seed=rng.randrange(2**40), marker=marker, stop_ids=stops, max_new_tokens=50)
    seq.block_table = rng.sample(range(1000), rng.randint(1, 3))
    return seq


def _check(batch: DeviceBatch, seqs: tuple[Sequence, ...]) -> None:
    n = len(seqs)
    full = batch.full
    assert (full.state.phase[n:] == DONE).all() and (full.context_lens[n:] == 1).all()
    assert (full.block_tables[n:] == 0).all()
    if not n:
        return
    view = batch.view(n)
    perm = batch.perm if batch.perm is not None else torch.arange(n)
    expected = upload(decode_fields(seqs, batch.stop_width), torch.device("cpu"))  # rows at full width
    expected["marker"] = torch.cat([torch.full((n, batch.full.params.marker.shape[1] - expected["marker"].shape[1]), -2,
                                               dtype=torch.int32), expected["marker"]], dim=1)
    expected["recent"] = torch.cat([torch.full((n, batch.full.state.recent.shape[1] - expected["recent"].shape[1]), -1,
                                               dtype=torch.int32), expected["recent"]], dim=1)
    got = {**{k: getattr(view, k) for k in ("input_ids", "positions", "context_lens")},
           **vars(view.params), **vars(view.state)}
    for name, value in expected.items():
        assert torch.equal(got[name][perm], value), name
    tables = view.block_tables[perm]
    for i, seq in enumerate(seqs):
        assert tables[i, : len(seq.block_table)].tolist() == seq.block_table


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_updates_keep_the_resident_rows_equal_to_rows_built_from_scratch(seed):
    rng = random.Random(seed)
    planner, batch = RowPlanner(), DeviceBatch(torch.device("cpu"))
    running: list[Sequence] = []
    ids = iter(range(10**6))
    moved = joined = 0
    for _ in range(150):
        for _ in range(rng.choice([0, 0, 1, 3, 9])):  # arrivals (after their prefill)
            running.append(_sequence(rng, next(ids)))
        for seq in rng.sample(running, min(len(running), rng.choice([0, 0, 1, 4]))):  # finished or preempted
            running.remove(seq)
            if rng.random() < 0.5:
                planner.release([seq])  # finished: released as its chunk is read
        for seq in rng.sample(running, min(len(running), rng.choice([0, 1]))):  # freed and prefilled again
            seq.epoch += 1
            seq.token_ids.append(rng.randrange(100))
            seq.think_count += 1
            seq.block_table = rng.sample(range(1000), rng.randint(1, 4))
        for seq in running:  # decoding reserved more blocks
            if rng.random() < 0.3:
                seq.block_table.append(rng.randrange(1000))
        if rng.random() < 0.3:
            rng.shuffle(running)
        seqs = tuple(running)
        update = planner.update(seqs)
        moved += update.keep is not None
        joined += 0 if update.joins is None else len(update.joins[0])
        batch.apply(update)
        assert planner.live == len(seqs)
        _check(batch, seqs)
    assert moved and joined and batch.stop_width == 12 and batch.generation > 1


@pytest.mark.parametrize("k", [1, 4, 16])
def test_random_workloads_give_the_completions_of_rows_built_afresh_and_free_every_row(tiny_models, k):
    """The same schedule twice: resident rows updated by deltas, and rows built from the sequences
    for every chunk (a fresh planner each time: the engine before the persistent batch). Same
    configuration and arrivals in both, since a GEMM's rounding may depend on the batch's size."""
    rng = random.Random(k)
    prompts = [f"{i} " + " ".join(rng.choice(["the", "a", "fox", "1", "2", "+", "why", "is"])
                                  for _ in range(rng.randint(1, 30))) for i in range(14)]
    params = [SamplingParams(temperature=rng.choice([0.0, 0.8]), seed=i, n=rng.choice([1, 1, 3]),
                             think_budget=rng.choice([None, 0, 4, 12]), solution_budget=rng.choice([None, 6]),
                             max_tokens=rng.randint(3, 40), stop_token_ids=tuple(rng.sample(range(5, 60), 2)))
              for i in range(len(prompts))]

    def drive(afresh: bool):
        """Requests arrive a few at a time between steps; completions by prompt."""
        engine = LLM(str(tiny_models["qwen3"]), dtype="float32", device="cpu", block_size=4, num_scheduler_steps=k,
                     max_num_seqs=7, num_kv_blocks=40).engine
        if afresh:
            runner, plan = engine.runner, engine.runner.plan

            def plan_afresh(batch):
                runner.rows = RowPlanner()
                return plan(batch)

            runner.plan = plan_afresh
        arrivals = random.Random(0)
        done, pending, step = {}, list(zip(prompts, params)), 0
        while pending or engine.has_unfinished():
            if pending and step % 3 == 0:
                for prompt, p in pending[: arrivals.randint(1, 4)]:
                    engine.add_request(engine.tokenizer.encode(prompt), p, prompt)
                    pending.remove((prompt, p))
            for out in engine.step():
                done[out.prompt] = [(c.token_ids, c.forced_mask, c.think_tokens, c.finish_reason) for c in out.outputs]
            step += 1
        return engine, done

    engine, resident = drive(afresh=False)
    assert engine.scheduler.num_preemptions > 0
    assert engine.runner.rows.live == 0  # every row free
    assert engine.block_manager.num_free == engine.block_manager.allocator.num_blocks
    assert resident == drive(afresh=True)[1]
