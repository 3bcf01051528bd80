"""Continuous batching: admit waiting sequences, decode running ones, preempt on KV pressure.

`schedule()` picks the next step's batch (a prefill of newly admitted sequences, or a decode
chunk for every running sequence); `postprocess()` applies the step's result. New sequences
join between any two steps.

A decode chunk is up to `num_steps` tokens per sequence run back to back on the device with
no host round trip (multi-step scheduling): every sequence's KV slots for the whole chunk are
reserved first, capped by the tokens it may still emit (its budgets bound its length), so the
device never runs out of room mid-chunk; a sequence that finishes inside the chunk emits
padding for the rest of it. When the cache runs out of blocks a running sequence
is preempted by recompute: its blocks are freed and it goes back to the front of the queue
with its tokens and budget state intact, to be prefilled again later (nano-vllm's split).
"""
from __future__ import annotations

from collections import deque

from elastic_decode.kernels import DONE, FINISH_STOP

from .block_manager import BlockManager
from .sequence import Sequence, SequenceStatus
from .step import ScheduledBatch, StepResult


class Scheduler:
    def __init__(self, block_manager: BlockManager, max_num_seqs: int, max_num_batched_tokens: int,
                 num_steps: int = 1):
        self.block_manager = block_manager
        self.num_steps = num_steps
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.num_preemptions = 0

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    def abort(self, seqs: list[Sequence]) -> None:
        """Remove sequences (waiting, running or finished) and free their blocks."""
        gone = {id(s) for s in seqs}
        self.waiting = deque(s for s in self.waiting if id(s) not in gone)
        self.running = [s for s in self.running if id(s) not in gone]
        for seq in seqs:
            self._free(seq)
            seq.status = SequenceStatus.FINISHED

    def stop(self, seq: Sequence) -> None:
        """End a sequence as if it had met a stop token (its caller found a stop string)."""
        self.abort([seq])
        seq.phase, seq.finish = DONE, FINISH_STOP

    def recompute_running(self) -> None:
        """Send every running sequence back to the front of the queue (in order) with its tokens and
        budget state: its K/V is computed again at its next prefill (after a weight update, the
        cached K/V belong to the old weights)."""
        for seq in reversed(self.running):
            self._free(seq)
            seq.status = SequenceStatus.WAITING
            self.waiting.appendleft(seq)
        self.running = []

    def schedule(self) -> ScheduledBatch:
        admitted: list[Sequence] = []
        num_tokens = 0
        while self.waiting and len(self.running) + len(admitted) < self.max_num_seqs:
            seq = self.waiting[0]
            if admitted and num_tokens + len(seq) > self.max_num_batched_tokens:
                break
            if not self.block_manager.can_allocate(seq):
                break
            self.block_manager.allocate(seq)
            if seq.cached_tokens is None:  # the first admission: what the prefix cache gave its prompt
                seq.cached_tokens = seq.num_cached_tokens
            num_tokens += len(seq) - seq.num_cached_tokens
            seq.status = SequenceStatus.RUNNING
            admitted.append(self.waiting.popleft())
        if admitted:
            self.running.extend(admitted)
            return ScheduledBatch(tuple(admitted), is_prefill=True)

        decoding: list[Sequence] = []
        steps, longest = self.num_steps, 1
        queue = deque(self.running)
        while queue:
            seq = queue.popleft()
            # A running sequence emits at most `left` more tokens (then it is DONE), so a
            # reservation of `left` slots covers any chunk length.
            left = seq.max_new_tokens - seq.num_generated
            ahead = min(self.num_steps, left)
            if not self.block_manager.can_append(seq, ahead):
                ahead = 1  # short of blocks: this chunk is one step; preempt only if even that fails
            while not self.block_manager.can_append(seq, ahead):
                # Preempt the most recently admitted sequence, which has done the least work.
                self._preempt(queue.pop() if queue else seq)
                if seq.status is SequenceStatus.WAITING:
                    break
            else:
                self.block_manager.append_slots(seq, ahead)
                decoding.append(seq)
                longest = max(longest, ahead)
                if ahead < left:  # not sure to be done within its reservation: it bounds the chunk
                    steps = min(steps, ahead)
        self.running = decoding
        if not decoding and self.has_unfinished():
            # Every sequence is capped to fit the cache alone, so this cannot happen.
            raise RuntimeError("scheduler could not make progress (KV cache smaller than one sequence)")
        return ScheduledBatch(tuple(decoding), is_prefill=False, num_steps=min(steps, longest))

    def _free(self, seq: Sequence) -> None:
        """Free a sequence's KV blocks; its device row (if any) is stale from now on."""
        self.block_manager.free(seq)
        seq.epoch += 1

    def _preempt(self, seq: Sequence) -> None:
        self._free(seq)
        seq.status = SequenceStatus.WAITING
        self.waiting.appendleft(seq)
        self.num_preemptions += 1

    def postprocess(self, batch: ScheduledBatch, result: StepResult, weight_version: str = "0") -> list[Sequence]:
        """Apply a step result (its tokens came from the weights of `weight_version`); returns the sequences
        that finished with it."""
        finished = []
        for i, seq in enumerate(batch.seqs):
            if result.tokens[i] and seq.weight_version != weight_version:
                seq.weight_versions.append((seq.num_generated, weight_version))
            if result.prompt_logprobs is not None and i in result.prompt_logprobs:
                seq.prompt_logprobs, seq.prompt_top_logprobs = result.prompt_logprobs[i]
            seq.token_ids += result.tokens[i]
            seq.logprobs += result.logprobs[i]
            seq.forced_mask += result.forced[i]
            if result.top_logprobs is not None and seq.params.logprobs:
                seq.top_logprobs += [row[: seq.params.logprobs] for row in result.top_logprobs[i]]
            seq.phase = result.phase[i]
            seq.think_count = result.think_count[i]
            seq.solution_count = result.solution_count[i]
            seq.force_pos = result.force_pos[i]
            seq.recent = result.recent[i][len(result.recent[i]) - len(seq.marker) :]
            seq.forced_end = result.forced_end[i]
            seq.finish = result.finish[i]
            if seq.phase == DONE:
                seq.status = SequenceStatus.FINISHED
                self._free(seq)
                finished.append(seq)
        if finished:
            done = {id(s) for s in finished}
            self.running = [s for s in self.running if id(s) not in done]
        return finished
