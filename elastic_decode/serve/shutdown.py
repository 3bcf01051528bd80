"""Graceful shutdown on SIGTERM / SIGINT, as vLLM's and uvicorn's users expect.

1. The signal sets the server shutting down: new requests (and /health) get a 503, so a load balancer
   moves traffic away; requests in flight go on.
2. They may take up to `shutdown_timeout_s` (--shutdown-timeout) to finish. Then the ones left are
   aborted with a clean "abort" finish: a stream gets its final chunk and `[DONE]`, a plain request a
   JSON 503 saying how far it got. A second signal skips the wait.
3. Then uvicorn closes the connections and the process exits 0 after printing its summary (uvicorn's
   own server re-raises the signal once it has shut down, which killed the process with 143 before the
   engine loop was closed or the summary printed).
"""
from __future__ import annotations

import contextlib
import logging
import signal
import threading
import time
from collections.abc import Iterator

import uvicorn

from .state import ServerState

log = logging.getLogger("elastic_decode.serve")

SIGNALS = (signal.SIGINT, signal.SIGTERM)
ABORTED_GRACE_S = 5.0  # after the aborts, how long the aborted calls may take to send their answers


class DrainingServer(uvicorn.Server):
    def __init__(self, config: uvicorn.Config, state: ServerState):
        super().__init__(config)
        self.state = state
        self.signalled_at: float | None = None
        self.aborted_at: float | None = None
        self.hurry = False  # a second signal: abort now

    def handle_exit(self, sig: int, frame) -> None:
        if self.signalled_at is not None:
            self.hurry = True
            return
        self.signalled_at = time.monotonic()
        self.state.shutting_down = True
        log.info("shutting down (%s): %d request(s) in flight get up to %.0f s to finish", signal.Signals(sig).name,
                 len(self.state.runs), self.state.config.shutdown_timeout_s)

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        if threading.current_thread() is not threading.main_thread():  # signals reach the main thread only
            yield
            return
        original = {sig: signal.signal(sig, self.handle_exit) for sig in SIGNALS}
        try:
            yield
        finally:
            for sig, handler in original.items():
                signal.signal(sig, handler)

    async def on_tick(self, counter: int) -> bool:
        if self.signalled_at is not None and not self.should_exit:
            self._drain()
        return await super().on_tick(counter)

    def _drain(self) -> None:
        runs, now = self.state.runs, time.monotonic()
        waited = now - self.signalled_at
        if runs and self.aborted_at is None and (self.hurry or waited >= self.state.config.shutdown_timeout_s):
            log.info("aborting %d request(s) still in flight", len(runs))
            for run in list(runs):
                run.abort("shutdown")
            self.aborted_at = now
        if not runs or (self.aborted_at is not None and now - self.aborted_at >= ABORTED_GRACE_S):
            self.should_exit = True
