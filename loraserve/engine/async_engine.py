"""The engine loop in a background thread, fed and drained from asyncio.

The event loop never runs model compute: it validates a request (tokenize,
check), hands it to the loop thread through a thread-safe queue, and awaits
outputs on an asyncio.Queue that the loop thread fills with
`call_soon_threadsafe`. Aborts travel the same way.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
from typing import AsyncIterator

from loraserve.engine.llm_engine import LLMEngine
from loraserve.engine.output import RequestOutput
from loraserve.request import Request
from loraserve.sampling import SamplingParams

log = logging.getLogger(__name__)


class AsyncEngine:
    def __init__(self, engine: LLMEngine) -> None:
        self.engine = engine
        self._inbox: queue.Queue[tuple[str, object]] = queue.Queue()
        self._streams: dict[str, tuple[asyncio.AbstractEventLoop, asyncio.Queue]] = {}
        """request id → where its outputs (or an exception) go."""
        self._running = True
        self.draining = False
        """Set on shutdown: running requests finish, new ones are refused."""
        self._thread = threading.Thread(target=self._loop, name="loraserve-engine", daemon=True)
        self._thread.start()

    # -- event-loop side ---------------------------------------------------

    def submit(self, prompt: str | list[int], sampling: SamplingParams, adapter: str | None,
               request_id: str) -> AsyncIterator[RequestOutput]:
        """Validate and queue a request now (raising ValueError / KeyError /
        RuntimeError before anything is queued); returns its outputs as they
        come. Stopping the iteration early aborts the request."""
        if self.draining:
            raise RuntimeError("the server is shutting down")
        req = self.engine.make_request(prompt, sampling, adapter, request_id)
        outputs: asyncio.Queue[RequestOutput | Exception] = asyncio.Queue()
        self._streams[req.request_id] = (asyncio.get_running_loop(), outputs)
        self._inbox.put(("add", req))
        return self._outputs(req.request_id, outputs)

    async def _outputs(self, request_id: str, outputs: asyncio.Queue) -> AsyncIterator[RequestOutput]:
        finished = False
        try:
            while not finished:
                out = await outputs.get()
                if isinstance(out, Exception):
                    finished = True
                    raise out
                finished = out.finished
                yield out
        finally:
            if not finished:  # the consumer went away: free its blocks
                self.abort(request_id)
            self._streams.pop(request_id, None)

    def abort(self, request_id: str) -> None:
        """Abort a submitted request (a no-op once it has finished)."""
        if self._streams.pop(request_id, None) is not None:
            self._inbox.put(("abort", request_id))

    async def call(self, fn, *args):
        """Run fn(*args) on the loop thread, between steps (engine state is the
        loop thread's alone); returns its result or raises its exception."""
        loop = asyncio.get_running_loop()
        future = loop.create_future()
        self._inbox.put(("call", (loop, future, fn, args)))
        return await future

    def num_unfinished(self) -> int:
        return len(self._streams)

    def shutdown(self) -> None:
        self._running = False
        self._inbox.put(("wake", None))
        self._thread.join(timeout=10)

    # -- loop thread -------------------------------------------------------

    def _loop(self) -> None:
        while self._running:
            self._drain_inbox(block=not self.engine.has_unfinished())
            if not self.engine.has_unfinished():
                self.engine.idle_tick()  # the swapper's idle timer: prefetch while nothing runs
                continue
            try:
                outputs = self.engine.step()
            except Exception:  # a bug in a step must not kill the server silently
                log.exception("engine step failed")
                raise
            for out in outputs:
                self._deliver(out.request_id, out)

    def _deliver(self, request_id: str, item: RequestOutput | Exception) -> None:
        target = self._streams.get(request_id)
        if target is not None:
            loop, q = target
            loop.call_soon_threadsafe(q.put_nowait, item)

    def _drain_inbox(self, block: bool) -> None:
        try:
            item = self._inbox.get(timeout=0.1) if block else self._inbox.get_nowait()
        except queue.Empty:
            return
        while True:
            self._apply(*item)
            try:
                item = self._inbox.get_nowait()
            except queue.Empty:
                return

    def _apply(self, kind: str, payload: object) -> None:
        if kind == "add":
            assert isinstance(payload, Request)
            if payload.adapter is not None and not self.engine.adapter_loaded(payload.adapter):
                # unloaded between validation and now
                self._deliver(payload.request_id, KeyError(f"no adapter named {payload.adapter_name!r}"))
            else:
                self.engine.scheduler.add(payload)
        elif kind == "abort":
            self.engine.abort(str(payload))
        elif kind == "call":
            loop, future, fn, args = payload
            try:
                result = fn(*args)
            except Exception as e:  # handed to the awaiting coroutine
                loop.call_soon_threadsafe(_settle, future, None, e)
            else:
                loop.call_soon_threadsafe(_settle, future, result, None)


def _settle(future: asyncio.Future, result, error: Exception | None) -> None:
    if not future.done():
        future.set_exception(error) if error is not None else future.set_result(result)
