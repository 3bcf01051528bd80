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

from elastic_decode.kernels import DONE, FINISH_NONE, FINISH_STOP, RECENT_PAD, THINKING

from . import confidence
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
            before = None if seq.conf_threshold is None else (
                seq.num_generated, seq.phase, seq.think_count, seq.solution_count, list(seq.recent), seq.force_pos,
                seq.forced_end)  # the state a DeepConf stop rewinds to
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
            if result.confidence is not None and seq.params.wants_confidence:
                seq.confidences += result.confidence[i]
                if before is not None:
                    self._check_confidence(seq, before)
            if seq.phase == DONE:
                seq.status = SequenceStatus.FINISHED
                self._free(seq)
                finished.append(seq)
        if finished:
            done = {id(s) for s in finished}
            self.running = [s for s in self.running if id(s) not in done]
        return finished

    # -- early exit (core/confidence.py) ------------------------------------------------------------------------

    def _check_confidence(self, seq: Sequence, before: tuple) -> None:
        """DeepConf's online stop over the tokens the chunk just added: at the first whose full window's mean is
        below the threshold, the trace is cut back to it and stopped, or (deepconf_action "answer") its thinking
        is ended by the forced marker there. Only tokens sampled while thinking are checked (every token of a
        request without a thinking phase): in a chunk that left the thought, the ones before the marker."""
        start, phase0, think0 = before[0], before[1], before[2]
        eligible = seq.num_generated - start
        if seq.params.think_budget is not None:
            if phase0 != THINKING:
                return
            if seq.phase != THINKING:  # the chunk left the thought: its forced marker, or the model's own
                forced = seq.forced_mask[start:]
                eligible = forced.index(1) if 1 in forced else seq.think_count - think0
        window = seq.params.confidence_window
        at, running = confidence.first_low_window(seq.confidences[: start + eligible], start, window,
                                                  seq.conf_threshold, seq.conf_running)
        seq.conf_running = running
        if at is None:
            return
        seq.conf_threshold = None  # decided: one exit per trace
        answer = seq.params.deepconf_action == "answer"
        seq.discarded += self.rewind(seq, at + 1, before, goes_on=answer)
        seq.exit_index = at + 1
        if answer:
            seq.early_exit = confidence.LOW_CONFIDENCE_ANSWER
            self.end_thinking(seq)
        else:
            seq.early_exit = confidence.LOW_CONFIDENCE
            seq.phase, seq.finish = DONE, FINISH_STOP

    def end_thinking(self, seq: Sequence) -> None:
        """End a thinking trace's thought now: the marker is forced from its next token (its thinking limit drops to
        what it has; its device row is written again)."""
        seq.think_limit = seq.think_count
        seq.epoch += 1

    def rewind(self, seq: Sequence, keep: int, before: tuple | None = None, goes_on: bool = True) -> int:
        """Cut a trace's output back to its first `keep` tokens, as if the later ones had never been sampled; its
        device row is written again at the next chunk. The kept tokens must all have been sampled while thinking
        (solving, for a request without a thinking phase). `before` (output length, phase, think count, solution
        count, thinking window, force position, forced end) is the state before the chunk that ran past `keep`:
        the state at `keep` is that plus the kept tokens of the chunk. Without it (the cut tokens were all
        sampled in the phase the trace is still in) the counters step back one per cut token. `goes_on`: the trace
        decodes on (else it is about to finish). Returns the number of tokens cut."""
        cut = seq.num_generated - keep
        if cut <= 0:
            return 0
        del seq.token_ids[seq.num_prompt_tokens + keep :]
        del seq.logprobs[keep:], seq.forced_mask[keep:], seq.confidences[keep:]
        if seq.top_logprobs:
            del seq.top_logprobs[keep:]
        seq.weight_versions = [(i, v) for i, v in seq.weight_versions if i < keep]
        width = len(seq.marker)
        if before is not None:
            start, phase, think, solution, recent, force_pos, forced_end = before
            seq.phase, seq.force_pos, seq.forced_end, seq.finish = phase, force_pos, forced_end, FINISH_NONE
            if seq.params.think_budget is not None:
                seq.think_count, seq.solution_count = think + keep - start, solution
                tail = [RECENT_PAD] * width + list(recent) + seq.output_ids[start:]
                seq.recent = tail[len(tail) - width :]
            else:
                seq.solution_count = solution + keep - start
        elif seq.params.think_budget is not None:
            seq.think_count -= cut
            tail = [RECENT_PAD] * width + seq.output_ids
            seq.recent = tail[len(tail) - width :]
        else:
            seq.solution_count -= cut
        seq.epoch += 1  # the device row holds the cut tokens' state: write it again
        if goes_on and seq.num_prompt_tokens + keep < seq.hashed_tokens and seq.status is SequenceStatus.RUNNING:
            # A re-prefill made blocks past the cut findable by their old tokens: writing new ones into them would
            # poison the prefix cache. The trace is computed again instead (its old blocks keep their content).
            self.running = [s for s in self.running if s is not seq]
            self._free(seq)
            seq.status = SequenceStatus.WAITING
            self.waiting.appendleft(seq)
        return cut
