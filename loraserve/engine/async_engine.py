"""The engine loop in a background thread, and the client interface the HTTP
server uses (nothing else of the engine).

The event loop never runs model compute: it validates requests (on a worker
thread, since tokenizing a long prompt takes a while), hands them to the loop
thread through a thread-safe queue, and awaits outputs on an asyncio.Queue
that the loop thread fills with `call_soon_threadsafe`. Aborts and adapter
changes travel the same way. What other threads read of the engine's state
is a snapshot the loop thread publishes (`stats`, `adapters`).

A failure on behalf of one request ends that request (the engine isolates
it). If the loop itself dies, the engine is `dead`: every request waiting on
it ends with EngineDead at once, new ones are refused, and `on_death` tells
the server to exit so that a supervisor restarts it.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import os
import queue
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import AsyncIterator, Callable, Sequence

from loraserve.engine.llm_engine import LLMEngine
from loraserve.engine.output import RequestOutput
from loraserve.errors import Draining, EngineDead, Overloaded, UnknownModel
from loraserve.lora.adapter import AdapterError
from loraserve.lora.registry import AdapterInfo, check_name
from loraserve.request import Request
from loraserve.sampling import SamplingParams
from loraserve.threads import alone_pool

log = logging.getLogger(__name__)

RequestSpec = tuple[str | list[int], SamplingParams, str | None, str]
"""(prompt, sampling, adapter name or None, request id): what `submit` takes."""


@dataclass(frozen=True)
class EngineStats:
    """The engine's state as of its last step (or idle tick), for metrics and admission."""

    running: int = 0
    waiting: int = 0
    pending: int = 0
    preemptions: int = 0
    running_kv_blocks: int = 0
    adapters_loaded: int = 0
    lora_slots_used: int = 0
    lora_slot_hits: int = 0
    lora_slot_loads: int = 0
    lora_bank_bytes: int = 0
    """Adapter weights in this process's LoRA slots (0 with a LoRA server)."""

    remote_lora_wait_s: float = 0.0
    """Seconds steps spent waiting for deltas from the LoRA server, in all."""

    remote_lora_steps: int = 0
    """Steps that sent deltas to the LoRA server."""

    remote_lora_step_waits: tuple = ()
    """Per step, the seconds waited for deltas: (Prometheus buckets, sum); () without a LoRA server."""

    cache: dict = field(default_factory=dict)


class AsyncEngine:
    def __init__(self, engine: LLMEngine, on_death: Callable[[], None] | None = None,
                 max_waiting: int = 1024) -> None:
        """`max_waiting`: queue length past which new requests are refused (Overloaded)."""
        self.engine = engine
        self.on_death = on_death
        """Called on the loop thread once the loop has died (the server exits)."""
        self.max_waiting = max_waiting
        self.model_root = engine.config.model
        self._inbox: queue.Queue[tuple[str, object]] = queue.Queue()
        self._streams: dict[str, tuple[asyncio.AbstractEventLoop, asyncio.Queue]] = {}
        """request id → where its outputs (or an exception) go."""
        self._running = True
        self.draining = False
        """Set on shutdown: running requests finish, new ones are refused."""
        self.dead: str | None = None
        """Why the engine loop stopped, once it has."""
        self._stats = EngineStats()
        self._publish()
        self._side = alone_pool(min(32, (os.cpu_count() or 1) + 4), "loraserve-side")  # asyncio.to_thread's size
        """Validation and adapter reads, off the event loop; the loop thread alone computes with a team."""
        self._thread = threading.Thread(target=self._loop, name="loraserve-engine", daemon=True)
        self._thread.start()

    # -- the client interface (event-loop side) ---------------------------------

    async def submit(self, specs: list[RequestSpec], session: str | None = None) -> list[AsyncIterator[RequestOutput]]:
        """Validate every request off the event loop, then queue them together
        (so they batch from the first step); returns each one's outputs as they
        come. Raises (InvalidRequest, UnknownModel, Overloaded, Draining,
        EngineDead) before anything is queued. Stopping an iteration early
        aborts its request. `session` is for a router (one engine has
        nowhere else to send it: its prefix cache finds the history anyway)."""
        self._check_open()
        self._check_room()
        made = await self._aside(lambda: [self.engine.make_request(*spec) for spec in specs])
        self._check_open()
        self._check_room()  # again: others were accepted while this one was validated
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

    def abort(self, request_id: str) -> None:
        """Abort a submitted request (a no-op once it has finished)."""
        if self._streams.pop(request_id, None) is not None:
            self._inbox.put(("abort", request_id))

    @property
    def adapters_remote(self) -> bool:
        """Whether adapters live on a LoRA server (loads are forwarded there, with its paths)."""
        return self.engine.remote is not None

    @property
    def info(self) -> dict[str, str]:
        """What the engine computes in: its dtype (`auto` resolved), device, and what adapter
        weights are stored in here (`remote`: on the LoRA server)."""
        lora = "remote" if self.engine.remote is not None else str(self.engine.lora_dtype).removeprefix("torch.")
        return {"dtype": self.engine.dtype, "device": self.engine.config.device,
                "requested_dtype": self.engine.config.dtype, "lora_dtype": lora}

    def adapters(self) -> tuple[AdapterInfo, ...]:
        return self.engine.adapters.listing

    async def load_adapter(self, name: str, path: str | Path, within: Sequence[Path] = ()) -> AdapterInfo:
        """Read and validate an adapter (a worker thread), then name it (the
        loop thread). Raises AdapterError with the reason. `within`: the
        directories its files must lie in (see `load_adapter`)."""
        check_name(name)
        if any(a.name == name for a in self.adapters()):
            raise AdapterError(f"an adapter named {name!r} is already loaded", "lora_name")
        adapter = await self._aside(self.engine.read_adapter, name, path, within)
        try:
            await self.call(self.engine.register_adapter, name, adapter)
        except AdapterError:
            raise
        except ValueError as e:  # e.g. too big for the device pool
            raise AdapterError(str(e)) from e
        return AdapterInfo(name, adapter.id, adapter.path, adapter.rank)

    async def unload_adapter(self, name: str) -> None:
        """Refuse new requests for it at once; return once its running requests
        have finished and its weights are gone. Raises UnknownModel."""
        info = next((a for a in self.adapters() if a.name == name), None)
        if info is None:
            raise UnknownModel(name)
        await self.call(self.engine.remove_adapter, name)  # UnknownModel if a concurrent unload won
        while self.engine.adapter_loaded(info.id) and not self.engine.adapters.is_named(info.id):
            self._check_alive()  # a dead engine never finishes them
            await asyncio.sleep(0.05)
        await self._aside(self.engine.unload_remote, name)

    def health(self) -> str:
        """"ok", "draining" or "dead" (then `dead` says why)."""
        return "dead" if self.dead is not None else "draining" if self.draining else "ok"

    def stats(self) -> EngineStats:
        """The snapshot of the last step (or idle tick)."""
        return self._stats

    async def refresh_stats(self, timeout: float = 2.0) -> EngineStats:
        """A snapshot taken now, between steps, so a scrape sees the state at
        scrape time also when the engine is idle; the last one if the engine
        is dead or still in a step after `timeout` seconds."""
        def take() -> None:
            self.engine.snapshot_stats(period=0.0)
            self._publish()

        if self.dead is None:
            try:
                await asyncio.wait_for(self.call(take), timeout)
            except (asyncio.TimeoutError, EngineDead):
                pass
        return self._stats

    def chat_prompt(self, messages: list[dict], tools: list[dict] | None = None,
                    template_kwargs: dict | None = None) -> list[int]:
        """The chat prompt's token ids, as transformers' apply_chat_template gives
        them (ValueError or jinja2.TemplateError on what the template refuses)."""
        return self.engine.tokenizer.chat_tokens(messages, tools, template_kwargs=template_kwargs)

    def check_prompt_chars(self, chars: int, field: str) -> None:
        """InvalidRequest if a text of `chars` characters cannot fit the context (cheap: no tokenizing)."""
        self.engine.check_prompt_chars(chars, field)

    def token_text(self, token_id: int) -> str:
        return self.engine.tokenizer.decode([token_id], skip_special_tokens=False)

    async def call(self, fn, *args):
        """Run fn(*args) on the loop thread, between steps (engine state is the
        loop thread's alone); returns its result or raises its exception."""
        self._check_alive()
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
        self._side.shutdown(wait=False)

    async def _aside(self, fn, *args):
        """fn(*args) on a side thread (as asyncio.to_thread, on threads that compute alone)."""
        try:
            future = asyncio.get_running_loop().run_in_executor(self._side, functools.partial(fn, *args))
        except RuntimeError:  # the pool is shut down: the server is exiting
            raise Draining("the server is shutting down") from None
        return await future

    def _check_room(self) -> None:
        """Refuse when `max_waiting` requests wait. Counted here, on the event
        loop, as accepted minus running (the engine's count lags a burst by a
        step: 2,000 requests at once would all pass it)."""
        if len(self._streams) - self._stats.running >= self.max_waiting:
            raise Overloaded(f"too many waiting requests (--max-waiting {self.max_waiting}); retry later")

    def _check_alive(self) -> None:
        if self.dead is not None:
            raise self._dead_error()

    def _check_open(self) -> None:
        self._check_alive()
        if self.draining:
            raise Draining("the server is shutting down")

    def _dead_error(self) -> EngineDead:
        return EngineDead(f"the engine has stopped ({self.dead}); the server is exiting to be restarted")

    def _outputs(self, request_id: str, outputs: asyncio.Queue) -> AsyncIterator[RequestOutput]:
        return queued_outputs(outputs, lambda: self.abort(request_id),  # the consumer went away: free its blocks
                              lambda: self._streams.pop(request_id, None))

    # -- loop thread -------------------------------------------------------

    def _loop(self) -> None:
        try:
            while self._running:
                self._drain_inbox(block=not self.engine.has_unfinished())
                if not self.engine.has_unfinished():
                    self.engine.idle_tick()  # the swapper's idle timer: prefetch while nothing runs
                else:
                    for out in self.engine.step():
                        self._deliver(out.request_id, out)
                self._publish()
        except BaseException as e:  # the engine itself is broken: say so everywhere, then go
            self._die(e)

    def _publish(self) -> None:
        """Snapshot what other threads may read (lengths and counters, and the
        cache stats the engine refreshes at most once a second)."""
        e, s = self.engine, self.engine.scheduler
        self._stats = EngineStats(
            running=len(s.running), waiting=len(s.waiting), pending=len(s.pending), preemptions=s.num_preemptions,
            running_kv_blocks=sum(len(r.block_ids) for r in s.running), adapters_loaded=len(e.adapters.by_id),
            lora_slots_used=len(e.slots.resident()), lora_slot_hits=s.num_lora_hits,
            lora_slot_loads=s.num_lora_loads, lora_bank_bytes=e.lora.bank.num_bytes if e.remote is None else 0,
            remote_lora_wait_s=getattr(e.lora, "wait_s", 0.0), remote_lora_steps=getattr(e.lora, "steps", 0),
            remote_lora_step_waits=e.lora.step_waits.cumulative() if e.remote is not None else (),
            cache=e.cache_stats)

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
            self._deliver(req.request_id, UnknownModel(req.adapter_name, (  # unloaded since it was validated
                f"the model {req.adapter_name!r} was unloaded before this request could start; "
                "see GET /v1/models")))
            return
        try:
            self.engine.queue(req)
        except ValueError as e:  # e.g. a request id already in use: this request's fault alone
            self._deliver(req.request_id, e)


async def queued_outputs(outputs: asyncio.Queue, abort: Callable[[], None],
                         done: Callable[[], None]) -> AsyncIterator[RequestOutput]:
    """One request's outputs from its queue until the finished one (an Exception put there is
    raised); `abort` if the consumer stops before that, then `done` however it ends."""
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
        if not finished:
            abort()
        done()


def _settle(future: asyncio.Future, result, error: BaseException | None) -> None:
    if not future.done():
        future.set_exception(error) if error is not None else future.set_result(result)
