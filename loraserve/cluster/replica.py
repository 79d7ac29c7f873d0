"""One replica of the Ray Serve deployment: a whole loraserve engine (the
`LLMEngine` and its `AsyncEngine` loop thread) in a Ray actor.

Requests reach it on its data channel (`channel.py`: a socket of its own, not
a Serve call); adapter loads, stats and its description are Serve calls, each
taking the `route` keyword the request router reads (`calls.RouteKey`). Serve
calls `record_routing_stats` every few hundred milliseconds: what the replica
reports there (its channel's address, resident adapters, sessions it served)
is what the router decides on, with its own count of requests in flight.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections import OrderedDict
from pathlib import Path

import ray
from ray import serve

from loraserve.cluster.calls import Refusal, RouteKey, answer
from loraserve.cluster.channel import ReplicaChannel
from loraserve.config import EngineConfig
from loraserve.engine.async_engine import AsyncEngine, EngineStats
from loraserve.engine.llm_engine import LLMEngine
from loraserve.errors import UnknownModel
from loraserve.lora.registry import AdapterInfo

log = logging.getLogger(__name__)

MAX_SESSIONS = 4096
"""Sessions a replica reports (the most recent): a bounded report, and a session
idle for longer than 4,096 others is unlikely to have its history KV left anyway."""


class EngineReplica:
    def __init__(self, config: EngineConfig, adapter_set: str, namespace: str, threads: int,
                 max_waiting: int) -> None:
        import torch

        torch.set_num_threads(threads)  # a replica owns its share of the cores, not all of them
        self.engine = LLMEngine(config)
        self.engine.memory.prefault()
        self._wait_for_lora_server(config)
        self.adapter_set = ray.get_actor(adapter_set, namespace=namespace)
        self.version, adapters = ray.get(self.adapter_set.current.remote())
        if self.engine.remote is not None:  # the LoRA server loaded the set: its catalogue names them here
            adapters = {}
        for name, path in adapters.items():
            try:
                self.engine.add_adapter(name, path)
            except Exception as e:  # one unreadable adapter must not keep the replica from starting
                log.error("replica: cannot load adapter %s from %s: %s", name, path, e)
        self.client = AsyncEngine(self.engine, max_waiting=max_waiting)
        self.id = serve.get_replica_context().replica_id.unique_id
        self.sessions: OrderedDict[str, None] = OrderedDict()
        self._adapter_lock = asyncio.Lock()
        # on the loop that runs this replica's methods (Serve builds replicas inside it)
        self.channel = ReplicaChannel(self.client, ray.util.get_node_ip_address(), self._served)
        ray.get(self.adapter_set.describe.remote(self.describe(None)))

    async def load_adapter(self, name: str, path: str, within: list[str], route: RouteKey) -> AdapterInfo | Refusal:
        """Idempotent: the broadcast of a load and a replica catching up on the set may meet. One load
        or unload at a time: a broadcast arriving while the catch-up's load of the same adapter was
        still running found it not yet listed, loaded it again and was refused ("already loaded")."""
        async with self._adapter_lock:
            same = next((a for a in self.client.adapters() if a.name == name), None)
            if same is not None and same.path == str(Path(path)):
                return same
            try:
                return await self.client.load_adapter(name, path, [Path(d) for d in within])
            except Exception as e:
                return answer(e)

    async def unload_adapter(self, name: str, route: RouteKey) -> Refusal | None:
        async with self._adapter_lock:
            try:
                await self.client.unload_adapter(name)
            except UnknownModel:
                return None  # already gone here: what the caller wanted
            except Exception as e:
                return answer(e)
            return None

    async def stats(self, route: RouteKey) -> EngineStats:
        return await self.client.refresh_stats()

    def describe(self, route: RouteKey) -> dict:
        """What the endpoint needs to know of the engine without loading it."""
        e = self.engine
        return {"model_root": self.client.model_root, "info": self.client.info, "adapters": self.client.adapters(),
                "adapters_remote": self.client.adapters_remote, "max_model_len": e.max_model_len,
                "id": self.id, "pid": os.getpid()}

    async def record_routing_stats(self) -> dict:
        """Serve's periodic report to the routers; also when the replica catches up with the adapter set.
        Its pid and stats ride along: the endpoint's /metrics falls back to them when a stats call does
        not come back in time (after a replica died, Serve's calls stalled for minutes)."""
        await self._catch_up()
        adapters = await self.client.call(self._resident) if self.client.dead is None else []
        return {"data": self.channel.address, "adapters": adapters, "sessions": list(self.sessions),
                "pid": os.getpid(), "stats": await self.client.refresh_stats()}

    def check_health(self) -> None:
        """Serve replaces a replica whose engine loop has died."""
        if self.client.dead is not None:
            raise RuntimeError(f"the engine has stopped: {self.client.dead}")
        if self.channel.task.done():
            raise RuntimeError("the data channel has stopped")

    def __del__(self) -> None:
        client = getattr(self, "client", None)
        if client is not None:
            self.channel.close()
            client.shutdown()
            self.engine.close()

    def _served(self, session: str) -> None:
        self.sessions[session] = None
        self.sessions.move_to_end(session)
        while len(self.sessions) > MAX_SESSIONS:
            self.sessions.popitem(last=False)

    def _wait_for_lora_server(self, config: EngineConfig) -> None:
        """With a LoRA server, be up only once it answers: the adapter set is loaded through it, and the
        endpoint lists the adapters this replica names when it starts."""
        remote = self.engine.remote
        deadline = time.monotonic() + 6 * config.lora_server.timeout_s if remote is not None else 0
        while remote is not None and not remote.up and time.monotonic() < deadline:
            time.sleep(0.1)

    def _resident(self) -> list[str]:
        """Names of the adapters on the device tier (the loop thread's: it owns the cache tree)."""
        ids = self.engine.cache.tree.resident
        return sorted(a.name for a in self.engine.adapters.listing if a.id in ids)

    async def _catch_up(self) -> None:
        """Apply the adapter set's changes this replica missed (it started, or
        restarted, while a load or unload was broadcast). With a LoRA server there is nothing to catch up
        with: its catalogue is what this replica serves."""
        if self.engine.remote is not None or await self.adapter_set.version_now.remote() == self.version:
            return
        version, wanted = await self.adapter_set.current.remote()
        have = {a.name for a in self.client.adapters()}
        for name in have - wanted.keys():
            await self.unload_adapter(name, RouteKey())
        for name in wanted.keys() - have:
            result = await self.load_adapter(name, wanted[name], [], RouteKey())
            if isinstance(result, Refusal):
                log.error("replica: cannot load adapter %s from %s: %s", name, wanted[name], result.message)
        self.version = version

