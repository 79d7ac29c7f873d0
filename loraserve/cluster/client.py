"""The endpoint's engine client over a Ray Serve deployment of replicas: the
interface `server/app.py` uses (that of `AsyncEngine`), so the endpoint is the
single-process server's own app and speaks the same API.

A request goes to the replica `ReplicaRouter` chooses, over that replica's
data channel (`channel.py`); its n choices stream back together and are
handed out one iterator each. Adapter loads go to every
live replica (pinned calls through the same router) after the adapter set
actor has recorded them, so a replica that starts meanwhile catches up.
Tokenizing (chat templates, token text) happens here, with the model's own
tokenizer, as in one process.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Sequence
from dataclasses import fields
from pathlib import Path

from ray import serve
from ray.serve.handle import DeploymentHandle

from loraserve.cluster.calls import Refusal, RouteKey, raise_refusal
from loraserve.cluster.channel import Call, EndpointChannel
from loraserve.cluster.live import ROUTERS
from loraserve.engine.async_engine import EngineStats, RequestSpec, queued_outputs
from loraserve.engine.output import RequestOutput
from loraserve.errors import Draining, Unavailable, UnknownModel
from loraserve.lora.files import AdapterError
from loraserve.lora.registry import AdapterInfo, check_name
from loraserve.server.metrics import ReplicaView
from loraserve.tokenizer import Tokenizer

log = logging.getLogger(__name__)

RETRIES = 3
"""Tries of a request whose replica died before accepting it (it goes elsewhere)."""


class ReplicaSetClient:
    def __init__(self, app: str, deployment: str, adapter_set, describe: dict, timeout_s: float = 60.0) -> None:
        """`describe`: one replica's `describe()`; `timeout_s`: the longest a control call (load, stats) waits."""
        self.app, self.adapter_set, self.timeout_s = app, adapter_set, timeout_s
        self.lora_server = None
        """The LoRA server actor's handle, in the disaggregated layout (held: it lives while a handle does)."""
        self.deployment = f"{app}/{deployment}"
        self._deployment_name = deployment
        self._handle: DeploymentHandle | None = None
        self.model_root: str = describe["model_root"]
        self.info: dict[str, str] = describe["info"]
        self.adapters_remote: bool = describe["adapters_remote"]
        self.max_model_len: int = describe["max_model_len"]
        self.tokenizer = Tokenizer(self.model_root)
        self._adapters: tuple[AdapterInfo, ...] = tuple(describe["adapters"])
        self.channel = EndpointChannel()
        self._ready = False
        self._calls: dict[str, Call] = {}
        """Request id → the call carrying it (aborting stops the call once all its choices are gone)."""
        self._open: dict[int, RouteKey] = {}
        """Accepted calls not yet finished (each counted in flight by the router until then)."""
        self._stats = EngineStats()
        self._replica_stats: dict[str, EngineStats] = {}
        self._pids: dict[str, int] = {describe["id"]: describe["pid"]}
        self.dead: str | None = None
        self.draining = False
        self.on_death = None

    # -- requests ----------------------------------------------------------------

    async def submit(self, specs: list[RequestSpec], session: str | None = None) -> list[AsyncIterator[RequestOutput]]:
        """As AsyncEngine.submit; `session` routes the request to where the session's history is."""
        if self.draining:
            raise Draining("the server is shutting down")
        adapter = specs[0][2]
        tokens = sum((len(p) if isinstance(p, list) else len(p) // 4) + s.max_tokens for p, s, _, _ in specs)
        route = RouteKey(adapter, session, tokens)
        router = await self._router()
        for attempt in range(RETRIES):
            down = self.channel.down()
            if down:  # links to replicas Serve has since replaced are closed
                self.channel.forget(set(router.replica_ids()))
            target = router.choose(route, down)
            if target is None:
                raise Unavailable("no replica is reachable")
            call = None
            try:
                call = await self.channel.open(target, specs, session)
                answer = await asyncio.shield(call.answer)
            except BaseException:  # refused before it was sent (too big), or the client went away meanwhile
                if call is not None:
                    self.channel.abort(call)
                router.release(target.replica, route)
                raise
            if answer is None:
                router.took(target)
                break
            router.release(target.replica, route)
            if isinstance(answer, Refusal):
                raise_refusal(answer)
            if attempt + 1 == RETRIES:  # LOST: the replica went away before it took the request
                raise Unavailable("no replica could take the request")
            await asyncio.sleep(0.1 * (attempt + 1))
        ids = [spec[3] for spec in specs]
        for request_id in ids:
            self._calls[request_id] = call
        self._open[call.id] = route

        def done(request_id: str) -> None:
            self._calls.pop(request_id, None)
            if not any(i in self._calls for i in ids):
                self._finish(call)

        return [queued_outputs(q, lambda r=request_id: self.abort(r), lambda r=request_id: done(r))
                for request_id, q in zip(ids, call.queues)]

    def abort(self, request_id: str) -> None:
        call = self._calls.pop(request_id, None)
        if call is not None and not any(c is call for c in self._calls.values()):
            self.channel.abort(call)  # the replica aborts its requests
            self._finish(call)  # a choice whose stream never started never calls its `done`

    def _finish(self, call: Call) -> None:
        """Once per accepted call, however it ends: it leaves the channel and the router's in-flight count."""
        route = self._open.pop(call.id, None)
        if route is not None:
            self.channel.close(call)
            ROUTERS[self.deployment].release(call.replica, route)

    def num_unfinished(self) -> int:
        return len(self._calls)

    # -- adapters ----------------------------------------------------------------

    def adapters(self) -> tuple[AdapterInfo, ...]:
        return self._adapters

    async def load_adapter(self, name: str, path: str | Path, within: Sequence[Path] = ()) -> AdapterInfo:
        """Load on one replica (which validates it: a bad adapter changes nothing),
        record it in the set, then load it on every other live replica."""
        check_name(name)
        if any(a.name == name for a in self._adapters):
            raise AdapterError(f"an adapter named {name!r} is already loaded", "lora_name")
        first, *rest = await self._replicas()
        dirs = [str(d) for d in within]
        info = _unpack(await self._pinned(first, "load_adapter", name, str(path), dirs))
        await self.adapter_set.add.remote(name, str(path))
        results = await asyncio.gather(*(self._pinned(r, "load_adapter", name, str(path), dirs) for r in rest),
                                       return_exceptions=True)
        failed = [r for r in results if isinstance(r, (Refusal, Exception))]
        if failed:  # e.g. one replica's device pool is too small: all or nothing
            await self._unload_everywhere(name)
            _unpack(failed[0])
            raise Unavailable(f"a replica could not load {name!r}: {failed[0]}")
        self._adapters += (info,)
        return info

    async def unload_adapter(self, name: str) -> None:
        if not any(a.name == name for a in self._adapters):
            raise UnknownModel(name)
        self._adapters = tuple(a for a in self._adapters if a.name != name)  # new requests are refused at once
        await self._unload_everywhere(name)

    async def _unload_everywhere(self, name: str) -> None:
        await self.adapter_set.remove.remote(name)
        results = await asyncio.gather(*(self._pinned(r, "unload_adapter", name) for r in await self._replicas()),
                                       return_exceptions=True)
        for r in results:
            if isinstance(r, Refusal):
                raise_refusal(r)
            if isinstance(r, Exception):  # a replica that died: its restart reads the set without it
                log.warning("unload of %s: a replica did not answer (%s)", name, r)

    # -- state -------------------------------------------------------------------

    def health(self) -> str:
        return "draining" if self.draining else "ok"

    def stats(self) -> EngineStats:
        return self._stats

    async def refresh_stats(self, timeout: float = 2.0) -> EngineStats:
        """Every live replica's stats, summed (rates recomputed from the summed counts).

        Each replica is asked (a pinned Serve call) for stats as of now. A call not back within
        `timeout` is left behind, not awaited (`asyncio.wait`, not `wait_for`, which waits for a
        cancelled call to finish): after a replica was killed, Serve's pinned calls stalled for
        minutes and every scrape with them. That replica's numbers are then those of its last
        routing report (at most a report period old), and so are the pids of the replicas."""
        router = await self._router()
        reports = {r.replica_id.unique_id: r.routing_stats for r in router.curr_replicas.values()
                   if (r.routing_stats or {}).get("stats") is not None}
        calls = {r: asyncio.ensure_future(self._pinned(r, "stats")) for r in router.replica_ids()}
        if calls:
            await asyncio.wait(calls.values(), timeout=timeout)
        fresh = {}
        for r, call in calls.items():
            if not call.done():
                call.cancel()
                call.add_done_callback(lambda c: c.cancelled() or c.exception())  # (retrieved: no log noise)
            elif not call.cancelled() and call.exception() is None and isinstance(call.result(), EngineStats):
                fresh[r] = call.result()
        self._replica_stats = {**{r: report["stats"] for r, report in reports.items()}, **fresh}
        self._pids.update({r: report["pid"] for r, report in reports.items()})
        if self._replica_stats:
            self._stats = merge_stats(list(self._replica_stats.values()))
        return self._stats

    def replica_view(self) -> ReplicaView:
        """Per replica: where the router sent requests and why, and its stats as of the last scrape."""
        router = ROUTERS.get(self.deployment)
        return ReplicaView(dict(router.routed) if router is not None else {}, dict(self._replica_stats),
                           {r: self._pids[r] for r in self._replica_stats if r in self._pids})

    def chat_prompt(self, messages: list[dict], tools: list[dict] | None = None,
                    template_kwargs: dict | None = None) -> list[int]:
        return self.tokenizer.chat_tokens(messages, tools, template_kwargs=template_kwargs)

    def check_prompt_chars(self, chars: int, field: str) -> None:
        self.tokenizer.check_prompt_chars(chars, field, self.max_model_len)

    def token_text(self, token_id: int) -> str:
        return self.tokenizer.decode([token_id], skip_special_tokens=False)

    def shutdown(self) -> None:
        """Close the data path; called after the server's event loop has ended (the deployment itself is
        `deploy.py`'s to stop, and the replicas abort what still ran for us)."""
        self._calls.clear()
        self._open.clear()
        self.channel.shutdown()

    # -- Serve calls -------------------------------------------------------------

    async def _replicas(self) -> list[str]:
        """The live replicas' ids, as this process's router knows them (waits for the first)."""
        return (await self._router()).replica_ids()

    async def _router(self):
        """This process's router, once it knows of a replica that has reported its channel (waits for one)."""
        router = ROUTERS.get(self.deployment)
        if router is not None and self._ready:
            return router
        self.handle.options(stream=False)  # the router is made when a handle is first set up
        for _ in range(int(self.timeout_s * 20)):
            router = ROUTERS.get(self.deployment)
            if router is not None and any((r.routing_stats or {}).get("data") for r in router.curr_replicas.values()):
                self._ready = True
                return router
            await asyncio.sleep(0.05)
        raise Unavailable("no replica is running")

    @property
    def handle(self) -> DeploymentHandle:
        """Made on first use, on the server's event loop: Serve's router then runs on that loop (see __init__.py)."""
        if self._handle is None:
            self._handle = serve.get_deployment_handle(self._deployment_name, app_name=self.app)
        return self._handle

    async def _pinned(self, replica: str, method: str, *args):
        call = getattr(self.handle.options(stream=False), method).remote(*args, route=RouteKey(pin=replica))
        return await asyncio.wait_for(call, self.timeout_s)


def _unpack(result):
    if isinstance(result, Refusal):
        raise_refusal(result)
    return result


RATIOS = ("_rate", "_fraction", "low_lora")
"""Cache stats that are ratios or expectations: averaged over replicas, not summed."""


def merge_stats(parts: list[EngineStats]) -> EngineStats:
    """Counts and gauges summed, ratios averaged, and the cache's hit rates
    recomputed from the summed counts (what one engine serving it all would say)."""
    summed = {f.name: sum(getattr(p, f.name) for p in parts) for f in fields(EngineStats)
              if isinstance(getattr(parts[0], f.name), (int, float))}
    cache: dict = {}
    for p in parts:
        for k, v in p.cache.items():
            if isinstance(v, (int, float)):
                cache[k] = cache.get(k, 0) + (v / len(parts) if k.endswith(RATIOS) else v)
    admissions = cache.get("adapter_hits", 0) + cache.get("adapter_misses", 0)
    cache["adapter_hit_rate"] = cache.get("adapter_hits", 0) / admissions if admissions else 0.0
    prompt = cache.get("prompt_tokens", 0)
    cache["kv_hit_rate"] = cache.get("kv_hit_tokens", 0) / prompt if prompt else 0.0
    return EngineStats(**summed, cache=cache)
