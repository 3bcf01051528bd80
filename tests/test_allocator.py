"""The native block allocator and the scheduler on top of it: no leaks, refcounts return to zero."""
from __future__ import annotations

import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from elastic_decode._C import BlockAllocator, OutOfBlocksError
from elastic_decode.core.block_manager import BlockManager
from elastic_decode.kernels import DONE, FINISH_LENGTH
from elastic_decode.sampling_params import SamplingParams
from elastic_decode.core.scheduler import Scheduler, StepResult
from elastic_decode.core.sequence import Sequence, SequenceStatus


def test_allocate_free_and_exhaustion():
    a = BlockAllocator(4)
    blocks = a.allocate(3)
    assert sorted(blocks) == [0, 1, 2] and a.num_free == 1
    with pytest.raises(OutOfBlocksError, match="2 requested, 1 free of 4"):
        a.allocate(2)
    assert a.num_free == 1  # all or nothing
    a.free(blocks)
    assert a.num_free == 4
    with pytest.raises(ValueError, match="double free"):
        a.free([blocks[0]])
    with pytest.raises(ValueError, match="out of range"):
        a.free([99])


def test_fork_shares_until_the_last_reference_goes():
    a = BlockAllocator(2)
    (b,) = a.allocate(1)
    a.fork([b])
    a.fork([b])
    assert a.refcount(b) == 3
    a.free([b])
    a.free([b])
    assert a.num_free == 1 and a.refcount(b) == 1
    a.free([b])
    assert a.num_free == 2


def test_prefix_hash_reuse_revives_freed_blocks_until_evicted():
    a = BlockAllocator(2)
    h = BlockAllocator.hash_tokens(0, [1, 2, 3, 4])
    assert h == BlockAllocator.hash_tokens(0, [1, 2, 3, 4]) != BlockAllocator.hash_tokens(1, [1, 2, 3, 4])
    (b,) = a.allocate(1)
    a.register_hash(b, h)
    a.free([b])
    assert a.peek(h) == b and a.num_free == 2
    assert a.lookup(h) == b and a.refcount(b) == 1 and a.num_free == 1
    a.free([b])
    a.allocate(2)  # takes every block, evicting the cached one
    assert a.lookup(h) == -1


class Model:
    """A plain-Python model of refcounts, to compare the native allocator against."""

    def __init__(self, n):
        self.ref = [0] * n


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(["alloc", "free", "fork", "lookup"]), st.integers(0, 50)), max_size=80))
def test_random_operations_keep_refcounts_consistent(ops):
    n = 8
    a, model = BlockAllocator(n), Model(n)
    held: list[int] = []
    for op, x in ops:
        if op == "alloc":
            k = x % 3
            if k > a.num_free:
                with pytest.raises(OutOfBlocksError):
                    a.allocate(k)
                continue
            for b in a.allocate(k):
                model.ref[b] += 1
                held.append(b)
                a.register_hash(b, x * 7 + b)
        elif op == "free" and held:
            b = held.pop(x % len(held))
            a.free([b])
            model.ref[b] -= 1
        elif op == "fork" and held:
            b = held[x % len(held)]
            a.fork([b])
            model.ref[b] += 1
            held.append(b)
        elif op == "lookup":
            b = a.lookup(x * 7 + (x % n))
            if b >= 0:
                model.ref[b] += 1
                held.append(b)
        assert [a.refcount(b) for b in range(n)] == model.ref
        assert a.num_free == sum(r == 0 for r in model.ref)
    a.free(held)
    assert a.num_free == n and all(a.refcount(b) == 0 for b in range(n))


def _seq(i, prompt, n_max):
    return Sequence(seq_id=i, request_id=i, sample_index=0, token_ids=list(prompt), num_prompt_tokens=len(prompt),
                    params=SamplingParams(), seed=i, marker=(7,), stop_ids=(2,), max_new_tokens=n_max)


def _fake_step(batch, rng):
    """A StepResult that appends a random token and finishes sequences at random."""
    n = len(batch.seqs)
    finish = [rng.random() < 0.1 or s.num_generated + 1 >= s.max_new_tokens for s in batch.seqs]
    return StepResult(
        tokens=[[rng.randrange(3, 20)] for _ in range(n)], logprobs=[[0.0]] * n, forced=[[0]] * n,
        phase=[DONE if f else s.phase for f, s in zip(finish, batch.seqs)],
        think_count=[0] * n, solution_count=[0] * n, force_pos=[0] * n, recent=[[-1]] * n,
        forced_end=[0] * n, finish=[FINISH_LENGTH if f else 0 for f in finish],
    )


def run_random_workload(seed: int) -> int:
    """Random submits, finishes and preemptions; checks refcounts all along; returns #preemptions."""
    rng = random.Random(seed)
    num_blocks, block_size = 20, 4
    bm = BlockManager(num_blocks, block_size)
    sched = Scheduler(bm, max_num_seqs=6, max_num_batched_tokens=64)
    shared_prefix = [rng.randrange(3, 20) for _ in range(9)]
    seqs = []
    for step in range(400):
        if step < 120 and rng.random() < 0.3:
            prompt = (shared_prefix if rng.random() < 0.5 else []) + [rng.randrange(3, 20) for _ in range(rng.randrange(1, 12))]
            seq = _seq(len(seqs), prompt, n_max=num_blocks * block_size - len(prompt))
            seq.max_new_tokens = min(seq.max_new_tokens, 30)
            seqs.append(seq)
            sched.add(seq)
        if not sched.has_unfinished():
            continue
        batch = sched.schedule()
        for s in batch.seqs:  # every scheduled sequence has room for all its tokens
            assert len(s.block_table) * block_size >= len(s)
        sched.postprocess(batch, _fake_step(batch, rng))
        in_use = [b for s in sched.running for b in s.block_table]
        for b in set(in_use):
            assert bm.allocator.refcount(b) == in_use.count(b)
    while sched.has_unfinished():
        batch = sched.schedule()
        sched.postprocess(batch, _fake_step(batch, rng))
    assert all(s.status is SequenceStatus.FINISHED for s in seqs)
    assert bm.num_free == num_blocks
    assert all(bm.allocator.refcount(b) == 0 for b in range(num_blocks))
    return sched.num_preemptions


def test_scheduler_random_workloads_leak_no_blocks():
    preemptions = [run_random_workload(seed) for seed in range(6)]
    # The workloads are only a test of preemption if they do run out of blocks.
    assert sum(p > 0 for p in preemptions) >= 4, preemptions
