"""One HTTP call's requests on the engine loop (one per prompt, n completions each), as they arrive.

A call whose client goes away is aborted at once, its KV blocks freed: a stream notices when its
generator is cancelled (Starlette listens for the disconnect), a plain request by a watcher that waits
on the connection's next message, which is `http.disconnect` once the client closes it (the body has
been read by then), whether or not tokens are flowing.
"""
from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable
from functools import partial

from fastapi import Request

from ..engine.loop import RequestUpdate
from ..errors import InvalidRequestError
from ..sampling_params import SamplingParams
from .errors import Disconnected, ShuttingDown, StepFailed
from .state import ServerState
from .text import CompletionText, TextDelta


class Run:
    def __init__(self, state: ServerState, decode: Callable, prompts: list[list[int]], params: SamplingParams,
                 stop: list[str], stream: bool, keep_stop: bool = False, rid: str | None = None):
        self.state, self.loop = state, state.loop
        self.n = params.n
        self.prompts = prompts
        self.rid = rid  # the client's id for the call (SGLang's /abort_request names it), if it gave one
        self.texts = [[CompletionText(decode, params.think_budget is not None, stop, stream, keep_stop)
                       for _ in range(params.n)] for _ in prompts]
        for k, ids in enumerate(prompts):  # every prompt checked before any is queued
            try:
                self.loop.engine.check_request(ids, params)
            except InvalidRequestError as e:
                where = f"prompt {k}: " if len(prompts) > 1 else ""
                raise InvalidRequestError(where + str(e), param=e.param) from None
        self.queue: asyncio.Queue[tuple[int, RequestUpdate]] = asyncio.Queue()
        self.pending = len(prompts)
        self.shut_down = False  # aborted because the server is shutting down
        aloop = asyncio.get_running_loop()
        self.handles: list[int] = []
        self.started = time.perf_counter()
        state.runs.add(self)
        try:
            for k, ids in enumerate(prompts):
                self.handles.append(self.loop.submit(ids, params, partial(self._post, aloop, k)))
        except BaseException:
            self.abort("request")
            self.close()
            raise

    def _post(self, aloop: asyncio.AbstractEventLoop, k: int, update: RequestUpdate) -> None:
        aloop.call_soon_threadsafe(self.queue.put_nowait, (k, update))  # called on the loop thread

    def abort(self, cause: str) -> None:
        """End every request of the call now ("client": its client left; "shutdown"; "request")."""
        self.shut_down |= cause == "shutdown"
        for handle in self.handles:
            self.loop.abort(handle, cause)

    def close(self) -> None:
        """The call is over (answered, failed or abandoned): it no longer holds the server's shutdown."""
        if self.pending:
            self.abort("client")
        self.state.runs.discard(self)

    async def events(self) -> AsyncIterator[tuple[int, int, TextDelta, int]]:
        """(prompt, completion, new text, tokens before this update) as updates arrive."""
        while self.pending:
            k, update = await self.queue.get()
            if update.error is not None:
                raise StepFailed(f"{type(update.error).__name__}: {update.error}")
            for delta in update.completions:
                text = self.texts[k][delta.index]
                before, was_stopped = len(text.token_ids), text.stopped
                piece = text.feed(delta)
                if text.stopped and not was_stopped and delta.finish_reason is None:
                    self.loop.stop_completion(self.handles[k], delta.index)
                yield k, delta.index, piece, before
            if update.finished:
                self.pending -= 1

    async def finish(self, request: Request) -> None:
        """Wait for every completion; a client that leaves meanwhile has them all aborted (Disconnected), a
        shutdown that aborts them fails the call (ShuttingDown)."""
        try:
            consume = asyncio.ensure_future(self._consume())
            watch = asyncio.ensure_future(_disconnected(request))
            try:
                done, _ = await asyncio.wait({consume, watch}, return_when=asyncio.FIRST_COMPLETED)
            finally:
                watch.cancel()
            if consume not in done:
                self.abort("client")
                consume.cancel()
                raise Disconnected
            consume.result()
            if self.shut_down:
                tokens = sum(len(t.token_ids) for t in self.all_texts())
                raise ShuttingDown(f"the server is shutting down: the request was aborted after {tokens} tokens "
                                   "(--shutdown-timeout)")
        finally:
            self.close()

    async def _consume(self) -> None:
        async for _ in self.events():
            pass

    def all_texts(self) -> list[CompletionText]:
        return [t for row in self.texts for t in row]


async def _disconnected(request: Request) -> None:
    """Returns when the client has closed the connection."""
    while (await request.receive())["type"] != "http.disconnect":
        pass
