"""Which instance a request goes to: plain functions over each instance's load.

A real router (an HTTP front or a Ray Serve app) and the simulator's cluster
call the same `route`, so a simulated cluster dispatches as a deployed one
would. Load is what an instance reports: requests it holds (running, waiting
and pending) and tokens still to compute; nothing here reads a clock or a
socket.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class InstanceLoad:
    requests: int
    """Requests the instance holds: running, waiting and pending."""

    tokens: int = 0
    """Tokens still to compute for them (prompt left + output left)."""

    adapters: frozenset[str] = frozenset()
    """Adapters resident in its cache (coupled deployments; empty when a LoRA server holds them)."""


def least_loaded(loads: Sequence[InstanceLoad], adapter: str | None) -> int:
    """The instance holding fewest requests (ties: fewest tokens, then the lowest index)."""
    return min(range(len(loads)), key=lambda i: (loads[i].requests, loads[i].tokens, i))


def least_tokens(loads: Sequence[InstanceLoad], adapter: str | None) -> int:
    """The instance with the least work left (ties: the lowest index)."""
    return min(range(len(loads)), key=lambda i: (loads[i].tokens, loads[i].requests, i))


def adapter_affinity(loads: Sequence[InstanceLoad], adapter: str | None, slack: int = 2) -> int:
    """An instance that has the adapter resident, if one is within `slack`
    requests of the least loaded; else the least loaded. A coupled cluster's
    way to turn misses into hits without piling the hottest adapter on one instance."""
    best = least_loaded(loads, adapter)
    if adapter is None:
        return best
    warm = [i for i, load in enumerate(loads) if adapter in load.adapters
            and load.requests <= loads[best].requests + slack]
    return min(warm, key=lambda i: (loads[i].requests, loads[i].tokens, i)) if warm else best


ROUTERS: dict[str, Callable[[Sequence[InstanceLoad], str | None], int]] = {
    "least-loaded": least_loaded, "least-tokens": least_tokens, "affinity": adapter_affinity}


def route(loads: Sequence[InstanceLoad], adapter: str | None, policy: str = "least-loaded") -> int:
    """The index of the instance to send a request for `adapter` to."""
    if not loads:
        raise ValueError("no instance to route to")
    if policy not in ROUTERS:
        raise ValueError(f"unknown routing policy {policy!r}; choose from {', '.join(ROUTERS)}")
    return ROUTERS[policy](loads, adapter)
