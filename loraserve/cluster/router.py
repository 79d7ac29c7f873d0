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
        self.recent_s = recent_s
        self.in_flight: Counter[str] = Counter()
        self.tokens: Counter[str] = Counter()
        self.recent: dict[str, dict[tuple[str, str], float]] = {}
        """Replica → (kind, key) → when this router last sent it there."""

        self.routed: Counter[tuple[str, str]] = Counter()
        """(replica, reason) → requests sent there for that reason (loraserve.router.REASONS)."""
        self._choices: dict[str, str] = {}
        """Request id → the reason of the choice, until Serve says where it went."""
        from loraserve.cluster import live  # at run time: see live.py

        live.ROUTERS[f"{self._deployment_id.app_name}/{self._deployment_id.name}"] = self

    async def choose_replicas(self, candidate_replicas: list[RunningReplica],
                              pending_request: PendingRequest | None = None) -> list[list[RunningReplica]]:
        route = (pending_request.kwargs.get("route") if pending_request else None) or RouteKey()
        if route.pin is not None:
            return [[r for r in candidate_replicas if r.replica_id.unique_id == route.pin]]
        now = time.monotonic()
        choice = self.policy.pick([self._load(r, now) for r in candidate_replicas], route.adapter, route.session)
        if pending_request is not None:
            self._choices[pending_request.metadata.request_id] = choice.reason
        chosen = candidate_replicas[choice.index]
        # the rest only if the chosen one's queue is full (Serve then tries the next rank)
        return [[chosen], [r for r in candidate_replicas if r is not chosen]]

    def on_request_routed(self, pending_request: PendingRequest, replica_id, result: ReplicaResult) -> None:
        route = pending_request.kwargs.get("route") or RouteKey()
        reason = self._choices.pop(pending_request.metadata.request_id, None)
        if route.pin is not None or reason is None:
            return
        rid = replica_id.unique_id
        self.routed[rid, reason] += 1
        self.in_flight[rid] += 1
        self.tokens[rid] += route.tokens
        now = time.monotonic()
        sent = self.recent.setdefault(rid, {})
        if route.adapter is not None:
            sent[("adapter", route.adapter)] = now
        if route.session is not None:
            sent[("session", route.session)] = now

        def done(_) -> None:
            self.in_flight[rid] -= 1
            self.tokens[rid] -= route.tokens

        result.add_done_callback(done)

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
                            adapters, sessions)
