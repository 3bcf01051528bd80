"""An engine that runs on its own: a background thread owns an LLMEngine and steps it while
requests come and go (continuous batching across callers, as vLLM's AsyncLLM does).

Callers on any thread submit requests, abort them, pause, resume and update weights; each call
is a command the loop thread runs between two steps, so the engine keeps one owner (docs/architecture.md, "Who owns what")
and no step sees a half-applied change. After every step each live request hears, through its
callback (called on the loop thread), what its completions gained: new token ids with their
logprobs and forced flags, and the budget machine's counts.

Pausing (`pause(mode)`, as RL trainers pause a rollout server to update it):
- "abort": in-flight requests end at once with finish_reason "abort" and their partial tokens;
- "wait": in-flight requests run to completion, then the loop pauses;
- "keep": in-flight requests stay where they are and continue after `resume()`.
Requests submitted while paused wait for `resume()` (and while asleep, for `wake_up_async()`). A
weight update (`update_weights`, paused or not) copies the weights in place and prefills the
in-flight sequences again, so from that point they continue exactly as a fresh engine with the
new weights would (PipelineRL's in-flight update, with the stale K/V recomputed rather than kept).
"""
from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable, Iterable
from concurrent.futures import Future
from dataclasses import dataclass, field

import torch

from elastic_decode.kernels import FORCING

from ..core.sequence import SequenceStatus
from ..errors import ElasticDecodeError, InvalidRequestError
from ..sampling_params import SamplingParams
from .llm_engine import LLMEngine, Request

log = logging.getLogger("elastic_decode")

PAUSE_MODES = ("abort", "wait", "keep")
ABORT_CAUSES = ("request", "client", "pause", "shutdown", "error")  # why a request was aborted (metrics)


class PauseConflict(ElasticDecodeError):
    """A pause that cannot be done in the loop's state (a `wait` while requests are held by a `keep`)."""


@dataclass(frozen=True)
class CompletionDelta:
    """What one completion gained since its last delta, and where its budget machine stands."""

    index: int  # which of the request's n completions
    token_ids: list[int]  # new tokens
    logprobs: list[float]  # of the new tokens (forced ones too)
    forced_mask: list[int]  # 1 where a new token was forced
    num_tokens: int  # all tokens so far
    think_tokens: int  # so far, the rollout's (a resubmitted rollout's prompt may hold some: core/resume.py)
    solution_tokens: int  # so far, the rollout's
    thinking: bool  # still before the end-of-thinking marker (THINKING or FORCING)
    forcing: bool  # the marker is being forced: thinking tokens are final
    marker_len: int
    forced_end: bool
    finish_reason: str | None  # None while it runs; "stop", "length" or "abort"
    # Where the output's parts lie: its thinking tokens so far and the marker tokens it holds once the thought
    # closes (both 0 when the prompt closed it), and the solution tokens the prompt held.
    output_think: int
    output_marker: int
    prompt_solution: int
    top_logprobs: list[list[tuple[int, float]]] | None = None  # of the new tokens, with params.logprobs
    weight_versions: tuple[tuple[int, str], ...] = ()  # every token's weights so far: (first index, version)
    confidences: list[float] = field(default_factory=list)  # of the new tokens (core/confidence.py)
    early_exit: tuple[str | None, int | None, int] = (None, None, 0)  # (why, output index, DEER probes) so far
    group_confidence: tuple[float | None, float | None] = (None, None)  # (lowest group, tail), on the last delta
    # On a completion's last delta: the prompt's logprobs and alternatives (with params.prompt_logprobs), the
    # prompt tokens the prefix cache held.
    prompt_logprobs: list | None = None
    prompt_top_logprobs: list | None = None
    cached_tokens: int = 0


@dataclass(frozen=True)
class RequestUpdate:
    completions: list[CompletionDelta]  # the completions that changed
    finished: bool  # the last update of this request
    error: Exception | None = None  # the request failed (the engine step raised)


@dataclass(eq=False)
class _Live:
    """A submitted request as the loop tracks it."""

    prompt_ids: list[int]
    params: SamplingParams
    callback: Callable[[RequestUpdate], None]
    submitted: float
    request: Request | None = None  # set once the engine holds it
    sent: list[int] = field(default_factory=list)  # tokens reported, per completion
    done: list[bool] = field(default_factory=list)  # completion ended (reported as such)


@dataclass
class LoopMetrics:
    """Counters since start (read by /metrics; written by the loop thread only)."""

    requests_finished: dict[str, int] = field(default_factory=dict)  # by finish reason of the request
    requests_failed: int = 0
    aborts: dict[str, int] = field(default_factory=dict)  # aborted requests by cause (ABORT_CAUSES)
    output_tokens: int = 0
    forced_tokens: int = 0
    forced_ends: int = 0
    steps: int = 0
    prefill_steps: int = 0
    step_seconds: float = 0.0  # inside engine steps: over the wall time, how busy the engine was
    batch_sequences: int = 0  # summed over steps: the mean batch is this / steps
    largest_batch: int = 0
    # Request latency (submit to last token) as a cumulative histogram, Prometheus-style.
    latency_buckets: tuple[float, ...] = (0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)
    latency_counts: list[int] = field(default_factory=lambda: [0] * 12)  # one per bucket, then +Inf
    latency_sum: float = 0.0

    def observe_latency(self, seconds: float) -> None:
        for i, bound in enumerate((*self.latency_buckets, float("inf"))):
            if seconds <= bound:
                self.latency_counts[i] += 1
        self.latency_sum += seconds


class EngineLoop:
    """Owns `engine` on a background thread. `start()` it (or use it as a context manager)."""

    def __init__(self, engine: LLMEngine):
        self.engine = engine
        self.metrics = LoopMetrics()
        self._commands: queue.SimpleQueue[tuple[Callable, Future]] = queue.SimpleQueue()
        self._live: dict[int, _Live] = {}  # handle -> request
        self._held: list[int] = []  # handles submitted while paused
        self._next_handle = 0
        self._handle_lock = threading.Lock()
        self._paused = False
        self._draining: list[Future] = []  # pause("wait") calls waiting for in-flight requests
        self._closed = False
        self._thread = threading.Thread(target=self._run, name="elastic-decode-engine", daemon=True)

    # -- lifecycle ------------------------------------------------------------------------

    def start(self) -> EngineLoop:
        self._thread.start()
        return self

    def close(self) -> None:
        """Stop the loop; requests still in flight end with finish_reason "abort"."""
        if self._thread.is_alive():
            self._call(self._close_in_loop).result()
            self._thread.join()

    def __enter__(self) -> EngineLoop:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.close()

    @property
    def paused(self) -> bool:
        return self._paused

    # -- requests -------------------------------------------------------------------------

    def submit(self, prompt_ids: list[int], params: SamplingParams,
               callback: Callable[[RequestUpdate], None]) -> int:
        """Queue a request; returns its handle. The request is checked here (InvalidRequestError
        for what the engine cannot serve), so a bad one never reaches the loop."""
        self.engine.check_request(prompt_ids, params)
        with self._handle_lock:
            handle = self._next_handle
            self._next_handle += 1
        live = _Live(list(prompt_ids), params, callback, time.perf_counter(),
                     sent=[0] * params.n, done=[False] * params.n)
        self._call(lambda: self._admit(handle, live))
        return handle

    def abort(self, handle: int, cause: str = "request") -> None:
        """End a request now (its blocks are freed); it reports finish_reason "abort". Ending an
        unknown or finished request does nothing. `cause` (ABORT_CAUSES) is counted in the metrics."""
        self._call(lambda: self._end(handle, "abort", cause=cause))

    def abort_all(self, cause: str = "request") -> Future:
        """End every request in flight or held (a future that resolves once they are ended)."""
        return self._call(lambda: self._end_all(cause))

    def stop_completion(self, handle: int, index: int) -> None:
        """End one completion as a stop would (its caller found a stop string in its text)."""
        self._call(lambda: self._stop_one(handle, index))

    # -- control --------------------------------------------------------------------------

    def pause(self, mode: str = "keep") -> None:
        """Pause the loop (see the module docstring); returns once paused."""
        self.pause_async(mode).result()

    def pause_async(self, mode: str = "keep") -> Future:
        """`pause` as a future (resolved once paused), for callers that must not block a thread on it. A
        `wait` while requests are held by an earlier `keep` fails with PauseConflict at once: they cannot
        finish while the loop is paused."""
        if mode not in PAUSE_MODES:
            raise InvalidRequestError(f"mode must be one of {', '.join(PAUSE_MODES)}, got {mode!r}", param="mode")
        done: Future = Future()

        def failed(command: Future) -> None:  # the command itself raised: the pause fails with it
            if command.exception() is not None and not done.done():
                done.set_exception(command.exception())

        self._call(lambda: self._pause(mode, done)).add_done_callback(failed)
        return done

    def resume(self) -> None:
        self.resume_async().result()

    def resume_async(self) -> Future:
        return self._call(self._resume)

    def update_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]], version: str | None = None) -> int:
        """Copy HF-named weights in place between two steps, all or nothing; in-flight sequences
        continue under the new weights (their K/V recomputed). Returns how many were copied."""
        return self.update_weights_async(named_tensors, version).result()

    def update_weights_async(self, named_tensors: Iterable[tuple[str, torch.Tensor]],
                             version: str | None = None) -> Future:
        return self._call(lambda: self.engine.load_weights(named_tensors, version))

    def sleep_async(self, abort: bool = False) -> Future:
        """Free the KV cache (a trainer's backward pass needs the memory), ending the requests in flight first
        where `abort` (else ElasticDecodeError while any runs). Requests that arrive while asleep wait for
        `wake_up_async`; nothing steps meanwhile."""
        def sleep() -> None:
            if abort:
                self._end_all("pause")
            self.engine.sleep()
        return self._call(sleep)

    def wake_up_async(self) -> Future:
        """Allocate the KV cache again; requests held while asleep start (unless paused)."""
        def wake() -> None:
            self.engine.wake_up()
            self._release_held()
        return self._call(wake)

    def call(self, fn: Callable[[LLMEngine], object]) -> object:
        """Run `fn(engine)` on the loop thread between two steps; returns its result."""
        return self.call_async(fn).result()

    def call_async(self, fn: Callable[[LLMEngine], object]) -> Future:
        """`call` as a future, for callers that must not block a thread on it."""
        return self._call(lambda: fn(self.engine))

    def stats(self) -> dict[str, int]:
        """What the engine holds now (read without stopping the loop): sequences running and waiting, KV
        blocks, and requests in flight (`requests_running`), held before they started (`requests_waiting`)
        and stopped mid-generation by a pause (`requests_paused`)."""
        stats = self.engine.stats()
        live = list(self._live.values())
        started = sum(1 for r in live if r.request is not None)
        return {**stats, "waiting": stats["waiting"] + len(self._held),
                "requests_running": 0 if self._paused else started, "requests_waiting": len(live) - started,
                "requests_paused": started if self._paused else 0}

    # -- the loop thread ------------------------------------------------------------------

    def _call(self, fn: Callable) -> Future:
        if self._closed:
            raise ElasticDecodeError("the engine loop is closed")
        future: Future = Future()
        self._commands.put((fn, future))
        return future

    def _run(self) -> None:
        while not self._closed:
            busy = not self._paused and not self.engine.sleeping and self.engine.has_unfinished()
            try:
                command = self._commands.get_nowait() if busy else self._commands.get()
            except queue.Empty:
                command = None
            if command is not None:
                fn, future = command
                try:
                    future.set_result(fn())
                except BaseException as e:  # the caller gets it; the loop goes on
                    future.set_exception(e)
                continue  # every waiting command runs before the next step
            self._step()

    def _step(self) -> None:
        engine = self.engine
        start = time.perf_counter()
        try:
            engine.step()  # finished requests are read from their sequences below
        except Exception as e:  # noqa: BLE001 - one failed step fails its requests, not the loop
            log.error("engine step failed: %s: %s", type(e).__name__, e)
            for handle in list(self._live):
                if self._live[handle].request is not None:
                    self._end(handle, "abort", error=e, cause="error")
            return
        self.metrics.step_seconds += time.perf_counter() - start
        batch = len(engine.last_batch.seqs)
        self.metrics.prefill_steps += engine.last_batch.is_prefill
        self.metrics.steps += 1
        self.metrics.batch_sequences += batch
        self.metrics.largest_batch = max(self.metrics.largest_batch, batch)
        for handle in list(self._live):
            if self._live[handle].request is not None:
                self._report(handle)
        self._check_drained()

    def _admit(self, handle: int, live: _Live) -> None:
        self._live[handle] = live
        if self._holding:
            self._held.append(handle)
        else:
            self._add(handle)

    @property
    def _holding(self) -> bool:
        """New requests wait: paused, draining for a pause, or asleep (the memory is the trainer's until
        `wake_up_async`; the engine would wake itself for a request otherwise)."""
        return self._paused or bool(self._draining) or self.engine.sleeping

    def _release_held(self) -> None:
        if not self._holding:
            held, self._held = self._held, []
            for handle in held:
                self._add(handle)

    def _add(self, handle: int) -> None:
        live = self._live[handle]
        try:
            request_id = self.engine.add_request(live.prompt_ids, live.params)
        except Exception as e:  # noqa: BLE001 - e.g. a window that shrank while it was held: this request only
            self._forget(handle)
            self.metrics.requests_failed += 1
            live.callback(RequestUpdate([], True, e))
            return
        live.request = self.engine.request(request_id)

    def _report(self, handle: int, final_reason: str | None = None, error: Exception | None = None) -> None:
        """Send the request's deltas; `final_reason` ends every completion still running."""
        live = self._live[handle]
        deltas = []
        for seq in live.request.seqs:
            i = seq.sample_index
            if live.done[i]:
                continue
            out = seq.output_ids[: seq.settled]  # a DEER probe still deciding may cut the rest back
            new = slice(live.sent[i], len(out))
            ended = seq.status is SequenceStatus.FINISHED and final_reason is None
            reason = final_reason or (seq.finish_reason if ended else None)
            if new.start == new.stop and reason is None:
                continue
            live.sent[i] = len(out)
            live.done[i] = reason is not None
            forced = seq.forced_mask[new]
            self.metrics.output_tokens += len(out) - new.start
            self.metrics.forced_tokens += sum(forced)
            if reason is not None:
                self.metrics.forced_ends += bool(seq.forced_end)
            deltas.append(CompletionDelta(
                index=i, token_ids=out[new], logprobs=seq.logprobs[new], forced_mask=forced, num_tokens=len(out),
                think_tokens=seq.think_tokens, solution_tokens=seq.solution_count, thinking=seq.in_thought,
                forcing=seq.phase == FORCING, marker_len=len(seq.marker), forced_end=bool(seq.forced_end),
                finish_reason=reason, output_think=seq.output_thought[0], output_marker=seq.output_thought[1],
                prompt_solution=seq.prompt_solution,
                top_logprobs=seq.top_logprobs[new] if seq.params.logprobs else None,
                weight_versions=tuple(seq.weight_versions),
                confidences=seq.confidences[new],
                early_exit=(seq.early_exit, seq.exit_index, seq.probes),
                group_confidence=seq.group_confidence if reason is not None else (None, None),
                prompt_logprobs=seq.prompt_logprobs if reason is not None else None,
                prompt_top_logprobs=seq.prompt_top_logprobs if reason is not None else None,
                cached_tokens=seq.cached_tokens or 0))
        finished = all(live.done)
        if finished:
            self._forget(handle)
            if error is not None:
                self.metrics.requests_failed += 1
            else:
                reasons = {d.finish_reason for d in deltas} or {"stop"}
                key = "abort" if "abort" in reasons else "length" if "length" in reasons else "stop"
                self.metrics.requests_finished[key] = self.metrics.requests_finished.get(key, 0) + 1
            self.metrics.observe_latency(time.perf_counter() - live.submitted)
        if deltas or finished:
            try:
                live.callback(RequestUpdate(deltas, finished, error))
            except Exception as e:  # noqa: BLE001 - a caller's bug must not stop the others' requests
                log.error("a request callback raised %s: %s; the request is aborted", type(e).__name__, e)
                if not finished:
                    self._end(handle, "abort")

    def _forget(self, handle: int) -> None:
        del self._live[handle]

    def _end(self, handle: int, reason: str, error: Exception | None = None, cause: str | None = None) -> None:
        live = self._live.get(handle)
        if live is None:
            return
        if cause is not None:
            self.metrics.aborts[cause] = self.metrics.aborts.get(cause, 0) + 1
        if live.request is None:  # held while paused: nothing ran, every completion ends empty
            self._held.remove(handle)
            self._forget(handle)
            ended = [CompletionDelta(index=i, token_ids=[], logprobs=[], forced_mask=[], num_tokens=0, think_tokens=0,
                                     solution_tokens=0, thinking=False, forcing=False, marker_len=0, forced_end=False,
                                     finish_reason=reason, output_think=0, output_marker=0, prompt_solution=0)
                     for i in range(live.params.n)]
            live.callback(RequestUpdate(ended if error is None else [], True, error))
            return
        self.engine.abort_request(live.request.request_id)
        self._report(handle, final_reason=reason, error=error)
        self._check_drained()

    def _end_all(self, cause: str) -> None:
        for handle in list(self._live):
            self._end(handle, "abort", cause=cause)

    def _stop_one(self, handle: int, index: int) -> None:
        live = self._live.get(handle)
        if live is None or live.request is None:
            return
        self.engine.stop_sequence(live.request.request_id, index)
        self._report(handle)
        self._check_drained()

    def _pause(self, mode: str, done: Future) -> None:
        if mode == "abort":
            for handle in [h for h, live in self._live.items() if live.request is not None]:
                self._end(handle, "abort", cause="pause")
        if mode == "wait" and self.engine.has_unfinished():
            if self._paused:
                held = sum(1 for live in self._live.values() if live.request is not None)
                done.set_exception(PauseConflict(
                    f"paused with {held} request(s) kept mid-generation: they cannot finish while paused, so a "
                    "pause with mode wait would never return; resume first, or pause with mode abort"))
                return
            self._draining.append(done)
            return
        self._paused = True
        done.set_result(None)

    def _check_drained(self) -> None:
        if self._draining and not self.engine.has_unfinished():
            self._paused = True
            for done in self._draining:
                done.set_result(None)
            self._draining = []

    def _resume(self) -> None:
        self._paused = False
        for done in self._draining:  # a pause("wait") still draining is called off
            done.set_exception(ElasticDecodeError("resumed before the in-flight requests finished; not paused"))
        self._draining = []
        self._release_held()

    def _close_in_loop(self) -> None:
        for handle in list(self._live):
            self._end(handle, "abort", cause="shutdown")
        for done in self._draining:
            done.set_result(None)
        self._closed = True
