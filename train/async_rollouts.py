"""Rollouts on a thread of their own (`--async-rollouts`): the engine decodes the next steps' rollouts
while the optimizer steps, as PipelineRL, AReaL and TRL's AsyncGRPO overlap the two.

The producer rolls out step s only once the weights of step s - 1 - K are in the engine (K =
`--max-staleness`), so it runs at most K steps ahead of the trainer, and no token it samples comes
from a policy more than K optimizer steps older than the one it trains: the bound is kept by when
rollouts start, and the trainer checks it per token (each token carries the weights that produced it,
updates landing in flight). K = 0 starts step s's rollout after step s - 1's weights are in: the
synchronous trainer, step for step. Finished rollouts wait in a dict keyed by step (at most K + 1);
the producer's failure is raised in the trainer's thread.

Only the producer calls the engine's generate; the trainer hands it weights with
`LLM.load_weights_in_flight`. No collective runs on the producer's thread (data-parallel ranks reduce
their metrics on the trainer's), so each torchrun rank runs its own producer.
"""
from __future__ import annotations

import threading
import time
from collections.abc import Callable


class RolloutProducer:
    def __init__(self, make: Callable[[int], object], first: int, last: int, max_staleness: int):
        """`make(step)` rolls out one step; steps `first`..`last` are made, in order, from a trainer whose
        weights of step `first - 1` are in the engine."""
        self.make, self.last, self.max_staleness = make, last, max_staleness
        self._synced = first - 1  # the last step whose weights are in the engine
        self._ready: dict[int, tuple[object, float]] = {}  # step -> (rollout, seconds the producer waited)
        self._error: BaseException | None = None
        self._stopped = False
        self._cond = threading.Condition()
        self._thread = threading.Thread(target=self._run, args=(first,), name="rollout-producer", daemon=True)
        self._thread.start()

    def _run(self, first: int) -> None:
        try:
            for step in range(first, self.last + 1):
                start = time.perf_counter()
                with self._cond:  # the staleness bound: the weights of step - 1 - K are in
                    self._cond.wait_for(lambda s=step: self._stopped or self._synced >= s - 1 - self.max_staleness)
                    if self._stopped:
                        return
                waited = time.perf_counter() - start
                rollout = self.make(step)
                with self._cond:
                    self._ready[step] = (rollout, waited)
                    self._cond.notify_all()
        except BaseException as e:  # noqa: BLE001 - raised in the trainer's thread
            with self._cond:
                self._error = e
                self._cond.notify_all()

    def get(self, step: int) -> tuple[object, float]:
        """Step `step`'s rollout (waiting for it) and the seconds its producer waited on the staleness bound."""
        with self._cond:
            self._cond.wait_for(lambda: step in self._ready or self._error is not None)
            if step not in self._ready:
                raise self._error
            return self._ready.pop(step)

    def synced(self, step: int) -> None:
        """The weights of `step` are in the engine: rollouts up to step + 1 + K may start."""
        with self._cond:
            self._synced = step
            self._cond.notify_all()

    def stop(self) -> None:
        """No further rollout starts (the one under way goes on: `LLM.cancel_running` ends it)."""
        with self._cond:
            self._stopped = True
            self._cond.notify_all()

    def join(self, timeout: float | None = None) -> None:
        self._thread.join(timeout)
