"""Which instance a request goes to: plain Python over what each instance reports.

A real router (the Ray Serve request router, `loraserve/cluster/router.py`) and
the simulator's cluster call the same `Router.pick`, so a simulated cluster
dispatches as a deployed one would. An instance reports its load (requests it
holds, tokens still to compute) and what it has resident: adapters (a coupled
deployment caches them beside its KV) and sessions (whose history KV it holds).
Nothing here reads a clock or a socket, and nothing waits: a report that is a
second old is still the best there is, and the router never blocks on it.

`affinity` prefers, in this order, the instance holding the request's session,
then one with its adapter resident (the one it last went to, if several), then
the least loaded; an instance is only
preferred while it is within the imbalance bound of the least loaded one, so a
hot adapter (or a chatty session) cannot pin all load to one instance.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence, Set
from dataclasses import dataclass

POLICIES = ("affinity", "least-loaded", "least-tokens", "round-robin")

REASONS = ("session", "adapter", "load")
"""Why `affinity` picked an instance: it holds the session's KV, it has the
adapter, or neither was within the bound (a fallback to the least loaded).
Other policies always say "load"."""


@dataclass(frozen=True)
class InstanceLoad:
    requests: int
    """Requests the instance holds: running, waiting and pending."""

    tokens: int = 0
    """Tokens still to compute for them (prompt left + output left)."""

    adapters: Set[str] = frozenset()
    """Adapters resident in its cache (coupled deployments; empty when a LoRA server holds them)."""

    sessions: Set[str] = frozenset()
    """Sessions whose earlier turns it served, so whose history KV it may still hold."""

    recent: Set[str] = frozenset()
    """Adapters and sessions the router sent here moments ago. Among instances that
    hold an adapter, the one it went to last keeps it (with the prefix KV under
    it), rather than the load flipping it between two that are equally warm."""


@dataclass(frozen=True)
class Choice:
    index: int
    reason: str
    """One of REASONS."""


@dataclass(frozen=True)
class Bound:
    """How far past the least loaded instance a preferred one may be: `slack`
    requests, or `ratio` of the least loaded one's requests if that is more (a
    fixed slack of 2 means nothing at 60 requests each)."""

    slack: int = 2
    ratio: float = 0.25

    def __post_init__(self) -> None:
        if self.slack < 0 or self.ratio < 0:
            raise ValueError(f"the imbalance bound must be non-negative, got slack={self.slack} ratio={self.ratio}")

    def allows(self, requests: int, least: int) -> bool:
        return requests <= least + max(self.slack, int(self.ratio * least))


class Router:
    """One routing policy and its state (round robin's turn); the same object
    routes a Ray Serve deployment or a simulated cluster."""

    def __init__(self, policy: str = "affinity", bound: Bound = Bound()) -> None:
        if policy not in POLICIES:
            raise ValueError(f"unknown routing policy {policy!r}; choose from {', '.join(POLICIES)}")
        self.policy, self.bound = policy, bound
        self._turn = itertools.count()

    def pick(self, loads: Sequence[InstanceLoad], adapter: str | None = None, session: str | None = None) -> Choice:
        """The instance for a request for `adapter` (None: the base model) in `session` (None: no session)."""
        if not loads:
            raise ValueError("no instance to route to")
        if self.policy == "round-robin":
            return Choice(next(self._turn) % len(loads), "load")
        if self.policy == "least-tokens":
            return Choice(min(range(len(loads)), key=lambda i: (loads[i].tokens, loads[i].requests, i)), "load")
        best = least_loaded(loads)
        if self.policy == "least-loaded":
            return Choice(best, "load")
        near = [i for i, load in enumerate(loads) if self.bound.allows(load.requests, loads[best].requests)]
        for reason, wanted, held in (("session", session, "sessions"), ("adapter", adapter, "adapters")):
            if wanted is not None:
                warm = [i for i in near if wanted in getattr(loads[i], held)]
                if warm:
                    return Choice(min(warm, key=lambda i: (wanted not in loads[i].recent, loads[i].requests,
                                                           loads[i].tokens, i)), reason)
        return Choice(best, "load")


def least_loaded(loads: Sequence[InstanceLoad], among: Sequence[int] | None = None) -> int:
    """The instance holding fewest requests (ties: fewest tokens, then the lowest index)."""
    indices = range(len(loads)) if among is None else among
    return min(indices, key=lambda i: (loads[i].requests, loads[i].tokens, i))
