"""The Ray Serve request router: Serve's extension point, deciding with the
project's routing policy (`loraserve.router.Router`), the same object the
simulator's cluster calls.

What it decides on never makes a request wait:
- each replica's last report (`record_routing_stats`, every few hundred ms
  through Serve's controller): resident adapters, sessions, requests held;
- what this router sent since: requests in flight (counted down as they end)
  and, for `recent_s` seconds, the adapters and sessions it sent where (a
  report older than the decision cannot show them yet).

A call with a pinned `RouteKey` goes to that replica alone: how the endpoint
broadcasts adapter loads and gathers each replica's stats through Serve.
"""

from __future__ import annotations

import time
from collections import Counter

from ray.serve.request_router import PendingRequest, ReplicaResult, RequestRouter, RunningReplica

from loraserve.cluster.calls import RouteKey
from loraserve.router import Bound, InstanceLoad, Router

class ReplicaRouter(RequestRouter):
    def initialize_state(self, policy: str = "affinity", slack: int = 2, ratio: float = 0.25,
                         recent_s: float = 2.0) -> None:
        self.policy = Router(policy, Bound(slack, ratio))
        # Serve probes a chosen replica's queue length with an RPC before each request unless its cache
        # has one: we keep the cache filled with our own counts (below), which saves that round trip
        self._use_replica_queue_len_cache = True
        self.recent_s = recent_s
        self.in_flight: Counter[str] = Counter()
        self.tokens: Counter[str] = Counter()
        self.recent: dict[str, dict[tuple[str, str], float]] = {}
        """Replica → (kind, key) → when this router last sent it there."""

        self.routed: Counter[tuple[str, str]] = Counter()
        """(replica, reason) → requests sent there for that reason (loraserve.router.REASONS)."""

        self._choices: dict[str, tuple[str, str, int, float]] = {}
        """Request id → (replica, reason, tokens, when) of its choice, counted as in flight there
        at once: a burst is routed before Serve has assigned any of it, and must see itself."""
        from loraserve.cluster import live  # at run time: see live.py

        live.ROUTERS[f"{self._deployment_id.app_name}/{self._deployment_id.name}"] = self

    async def choose_replicas(self, candidate_replicas: list[RunningReplica],
                              pending_request: PendingRequest | None = None) -> list[list[RunningReplica]]:
        route = (pending_request.kwargs.get("route") if pending_request else None) or RouteKey()
        if route.pin is not None:
            return [[r for r in candidate_replicas if r.replica_id.unique_id == route.pin]]
        now = time.monotonic()
        self._forget(now)
        key = pending_request.metadata.internal_request_id if pending_request is not None else None
        if key in self._choices:  # chosen before, and Serve asks again (that replica was full): choose anew
            rid, _, tokens, _ = self._choices.pop(key)
            self._count(rid, tokens, -1)
        # in a fixed order (Serve's changes with each report), so that ties always go the same way
        candidates = sorted(candidate_replicas, key=lambda r: r.replica_id.unique_id)
        choice = self.policy.pick([self._load(r, now) for r in candidates], route.adapter, route.session)
        chosen = candidates[choice.index]
        for r in candidates:
            self.replica_queue_len_cache.update(r.replica_id, max(0, self.in_flight[r.replica_id.unique_id]))
        if key is not None:
            rid = chosen.replica_id.unique_id
            self._choices[key] = (rid, choice.reason, route.tokens, now)
            self._count(rid, route.tokens, +1)
            self._sent(rid, route, now)
        # the rest only if the chosen one's queue is full (Serve then tries the next rank)
        return [[chosen], [r for r in candidate_replicas if r is not chosen]]

    def on_request_routed(self, pending_request: PendingRequest, replica_id, result: ReplicaResult) -> None:
        route = pending_request.kwargs.get("route") or RouteKey()
        choice = self._choices.pop(pending_request.metadata.internal_request_id, None)
        if route.pin is not None or choice is None:
            return
        rid, reason, tokens, _ = choice
        if rid != replica_id.unique_id:  # Serve sent it to another rank's replica
            self._count(rid, tokens, -1)
            rid = replica_id.unique_id
            self._count(rid, tokens, +1)
            self._sent(rid, route, time.monotonic())
        self.routed[rid, reason] += 1
        result.add_done_callback(lambda _: self._count(rid, tokens, -1))

    def _sent(self, rid: str, route: RouteKey, now: float) -> None:
        sent = self.recent.setdefault(rid, {})
        if route.adapter is not None:
            sent[("adapter", route.adapter)] = now
        if route.session is not None:
            sent[("session", route.session)] = now

    def _count(self, rid: str, tokens: int, sign: int) -> None:
        self.in_flight[rid] += sign
        self.tokens[rid] += sign * tokens

    def _forget(self, now: float) -> None:
        """Drop choices Serve never assigned (their requests were cancelled while queued)."""
        for key in [k for k, c in self._choices.items() if now - c[3] > 60.0]:
            rid, _, tokens, _ = self._choices.pop(key)
            self._count(rid, tokens, -1)

    def replica_ids(self) -> list[str]:
        return [r.unique_id for r in self.curr_replicas]

    def _load(self, replica: RunningReplica, now: float) -> InstanceLoad:
        rid = replica.replica_id.unique_id
        stats = replica.routing_stats or {}
        sent = self.recent.get(rid, {})
        for key in [k for k, t in sent.items() if now - t > self.recent_s]:
            del sent[key]
        adapters = set(stats.get("adapters", ())) | {k for kind, k in sent if kind == "adapter"}
        sessions = set(stats.get("sessions", ())) | {k for kind, k in sent if kind == "session"}
        return InstanceLoad(max(self.in_flight[rid], stats.get("requests", 0)), self.tokens[rid],
                            adapters, sessions, {k for _, k in sent})
