"""The Ray Serve request router: Serve's extension point, holding the live
replica set and their reports, and deciding with the project's routing policy
(`loraserve.router.Router`), the same object the simulator's cluster calls.

Requests do not travel as Serve calls (see `channel.py`): the endpoint's
client asks `choose` for a replica and its channel address, tells `took`
when the replica accepted, and `release`s it when the request ends. What the choice rests on never makes a request wait:
- each replica's last report (`record_routing_stats`, every few hundred ms
  through Serve's controller): its channel, resident adapters, sessions;
- what this router sent: requests in flight (counted at the choice, so a
  burst sees itself, and until they end: the endpoint is the deployment's
  only client, so this count is exact where a report would lag) and, for
  `recent_s` seconds, the adapters and sessions it sent where (a report older
  than the decision cannot show them yet).

Serve calls (adapter loads, stats) carry a pinned `RouteKey`: each goes to
that replica alone, which is how the endpoint reaches every replica.
"""

from __future__ import annotations

import time
from collections import Counter

from ray.serve.request_router import PendingRequest, RequestRouter, RunningReplica

from loraserve.cluster.calls import RouteKey
from loraserve.cluster.channel import Target
from loraserve.errors import Unavailable
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
        from loraserve.cluster import live  # at run time: see live.py

        live.ROUTERS[f"{self._deployment_id.app_name}/{self._deployment_id.name}"] = self

    async def choose_replicas(self, candidate_replicas: list[RunningReplica],
                              pending_request: PendingRequest | None = None) -> list[list[RunningReplica]]:
        """Serve's calls: pinned to one replica (any replica for an unpinned one).

        A pinned replica that is not among the candidates has died (Serve drops a replica it finds
        dead and never brings its id back): the call fails at once with Unavailable, instead of
        waiting for a replica that will not come. Serve retries a choice that yields no replica
        without awaiting anything unless told to back off, so an empty answer would spin the
        caller's event loop (the endpoint's: nothing else would run again); pinned calls always
        back off, and a call already ended is given any replica, which Serve then passes over."""
        route = (pending_request.kwargs.get("route") if pending_request else None) or RouteKey()
        if route.pin is None:
            return [candidate_replicas]
        pinned = [r for r in candidate_replicas if r.replica_id.unique_id == route.pin]
        if pending_request is None:
            return [pinned]
        pending_request.routing_context.should_backoff = True
        if not pinned and not pending_request.future.done():
            pending_request.future.set_exception(Unavailable(f"replica {route.pin} is gone"))
        return [pinned] if pinned else [candidate_replicas]

    def choose(self, route: RouteKey, down: set[str] = frozenset()) -> Target | None:
        """A request's replica (None: no replica has reported its channel yet), counted in flight there
        until `release`. `down`: replicas the endpoint cannot reach."""
        now = time.monotonic()
        # in a fixed order (Serve's changes with each report), so that ties always go the same way
        candidates = sorted((r for r in self.curr_replicas.values()
                             if (r.routing_stats or {}).get("data") and r.replica_id.unique_id not in down),
                            key=lambda r: r.replica_id.unique_id)
        if not candidates:
            return None
        choice = self.policy.pick([self._load(r, now) for r in candidates], route.adapter, route.session)
        chosen = candidates[choice.index]
        rid = chosen.replica_id.unique_id
        self._count(rid, route.tokens, +1)
        sent = self.recent.setdefault(rid, {})
        if route.adapter is not None:
            sent[("adapter", route.adapter)] = now
        if route.session is not None:
            sent[("session", route.session)] = now
        return Target(rid, chosen.routing_stats["data"], choice.reason)

    def took(self, target: Target) -> None:
        """The replica accepted the request: a routing decision to count."""
        self.routed[target.replica, target.reason] += 1

    def release(self, rid: str, route: RouteKey) -> None:
        """The request chosen for `rid` has ended there (or was never taken)."""
        self._count(rid, route.tokens, -1)

    def _count(self, rid: str, tokens: int, sign: int) -> None:
        self.in_flight[rid] += sign
        self.tokens[rid] += sign * tokens

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
        return InstanceLoad(self.in_flight[rid], self.tokens[rid], adapters, sessions, {k for _, k in sent})
