"""The engine loop in a background thread, fed and drained from asyncio.

The event loop never runs model compute: it validates requests (on a worker
thread, since tokenizing a long prompt takes a while), hands them to the loop
thread through a thread-safe queue, and awaits outputs on an asyncio.Queue
that the loop thread fills with `call_soon_threadsafe`. Aborts travel the same
way.

A failure on behalf of one request ends that request (the engine isolates
it). If the loop itself dies, the engine is `dead`: every request waiting on
it ends with EngineDeadError at once, new ones are refused, and `on_death`
tells the server to exit so that a supervisor restarts it.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
from typing import AsyncIterator, Callable

from loraserve.engine.llm_engine import LLMEngine
from loraserve.engine.output import RequestOutput
from loraserve.request import Request
from loraserve.sampling import SamplingParams

log = logging.getLogger(__name__)

RequestSpec = tuple[str | list[int], SamplingParams, str | None, str]
"""(prompt, sampling, adapter name or None, request id): what `submit` takes."""


class EngineDeadError(RuntimeError):
    """The engine loop has stopped: nothing more will be computed."""


class AsyncEngine:
    def __init__(self, engine: LLMEngine, on_death: Callable[[], None] | None = None) -> None:
        self.engine = engine
        self.on_death = on_death
        """Called on the loop thread once the loop has died (the server exits)."""
        self._inbox: queue.Queue[tuple[str, object]] = queue.Queue()
        self._streams: dict[str, tuple[asyncio.AbstractEventLoop, asyncio.Queue]] = {}
        """request id → where its outputs (or an exception) go."""
        self._running = True
        self.draining = False
        """Set on shutdown: running requests finish, new ones are refused."""
        self.dead: str | None = None
        """Why the engine loop stopped, once it has."""
        self._thread = threading.Thread(target=self._loop, name="loraserve-engine", daemon=True)
        self._thread.start()

    # -- event-loop side ---------------------------------------------------

    async def submit(self, specs: list[RequestSpec]) -> list[AsyncIterator[RequestOutput]]:
        """Validate every request off the event loop, then queue them together
        (so they batch from the first step); returns each one's outputs as they
        come. Raises ValueError / KeyError / RuntimeError before anything is
        queued. Stopping an iteration early aborts its request."""
        self._check_open()
        made = await asyncio.to_thread(lambda: [self.engine.make_request(*spec) for spec in specs])
        self._check_open()
        loop = asyncio.get_running_loop()
        streams = []
        for req in made:
            outputs: asyncio.Queue[RequestOutput | Exception] = asyncio.Queue()
            self._streams[req.request_id] = (loop, outputs)
            streams.append(self._outputs(req.request_id, outputs))
        self._inbox.put(("add", made))
        if self.dead is not None:  # died meanwhile: no one reads the inbox any more
            for req in made:
                self._deliver(req.request_id, self._dead_error())
        return streams

    def _check_open(self) -> None:
        if self.dead is not None:
            raise self._dead_error()
        if self.draining:
            raise RuntimeError("the server is shutting down")

    def _dead_error(self) -> EngineDeadError:
        return EngineDeadError(f"the engine has stopped ({self.dead}); the server is exiting to be restarted")

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
        if self.dead is not None:
            raise self._dead_error()
        loop = asyncio.get_running_loop()
        future = loop.create_future()
        self._inbox.put(("call", (loop, future, fn, args)))
        if self.dead is not None:
            _settle(future, None, self._dead_error())
        return await future

    def num_unfinished(self) -> int:
        return len(self._streams)

    def shutdown(self) -> None:
        self._running = False
        self._inbox.put(("wake", None))
        self._thread.join(timeout=10)

    # -- loop thread -------------------------------------------------------

    def _loop(self) -> None:
        try:
            while self._running:
                self._drain_inbox(block=not self.engine.has_unfinished())
                if not self.engine.has_unfinished():
                    self.engine.idle_tick()  # the swapper's idle timer: prefetch while nothing runs
                    continue
                for out in self.engine.step():
                    self._deliver(out.request_id, out)
        except BaseException as e:  # the engine itself is broken: say so everywhere, then go
            self._die(e)

    def _die(self, error: BaseException) -> None:
        self.dead = f"{type(error).__name__}: {error}"
        log.critical("the engine loop stopped; failing every request and exiting", exc_info=error)
        for request_id in list(self._streams):
            self._deliver(request_id, self._dead_error())
        while True:  # calls queued before `dead` was set would wait forever
            try:
                kind, payload = self._inbox.get_nowait()
            except queue.Empty:
                break
            if kind == "call":
                loop, future, _, _ = payload
                loop.call_soon_threadsafe(_settle, future, None, self._dead_error())
        if self.on_death is not None:
            self.on_death()

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
            assert isinstance(payload, list)
            for req in payload:
                self._add(req)
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

    def _add(self, req: Request) -> None:
        if req.request_id not in self._streams:
            return  # aborted before it reached the loop
        if req.adapter is not None and not self.engine.adapter_loaded(req.adapter):
            # unloaded between validation and now
            self._deliver(req.request_id, KeyError(f"no adapter named {req.adapter_name!r}"))
            return
        try:
            self.engine.scheduler.add(req)
        except ValueError as e:  # e.g. a request id already in use: this request's fault alone
            self._deliver(req.request_id, e)


def _settle(future: asyncio.Future, result, error: BaseException | None) -> None:
    if not future.done():
        future.set_exception(error) if error is not None else future.set_result(result)
