"""Which deltas the LoRA server runs together, and how long it waits for more
(policy: no tensors, no sockets, time from a Clock).

A delta is a (layer, projection) of one instance's forward pass; its
`position` is where that projection comes in the pass. Deltas of the same
(layer, projection) from several instances run as one batched kernel. The
server waits up to `window_s` after the oldest pending delta, and only while
some instance active in the last second is *behind* a pending delta in its
forward pass (its latest delta had an earlier position and its current step
sends that position), so its rows are on the way. Waiting for it puts
instances in step and their deltas batch from then on; an instance already
past that position will not send it before its next step, and waiting for it
would only add latency.

The real server (`lora_server/server.py`) and the simulator's LoRA server
(`sim/lora_server.py`) both call this class, so the simulator batches as the
server does.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Hashable, Iterable
from typing import TypeVar

from loraserve.clock import Clock

ACTIVE_S = 1.0
"""An instance with no delta for this long is not waited for."""

D = TypeVar("D")


class BatchWindow:
    def __init__(self, clock: Clock, window_s: float) -> None:
        self.clock = clock
        self.window_s = window_s
        self.last_seen: dict[Hashable, tuple[float, int]] = {}
        """Instance → when its latest delta arrived, and that delta's position."""
        self.plans: dict[Hashable, frozenset[int]] = {}
        """Instance → the positions its current step sends deltas for."""

    def arrived(self, peer: Hashable, position: int, at: float, plan: Iterable[int] | None = None) -> None:
        """A delta of `peer` at `position` arrived at time `at` (with the step's plan, if it came with one)."""
        if plan is not None:
            self.plans[peer] = frozenset(plan)
        self.last_seen[peer] = (at, position)

    def coming(self, pending: Iterable[tuple[Hashable, int]]) -> bool:
        """Whether an active instance is behind some pending (peer, position)."""
        now = self.clock.now()
        for peer in [p for p, (t, _) in self.last_seen.items() if now - t > ACTIVE_S]:
            del self.last_seen[peer]
        pending = list(pending)
        waiting = set(pending)
        for peer_d, position_d in pending:
            for peer, (_, position) in self.last_seen.items():
                if (peer != peer_d and position < position_d and position_d in self.plans.get(peer, ())
                        and (peer, position_d) not in waiting):
                    return True
        return False

    def deadline(self, pending: list[tuple[Hashable, int, float]]) -> float | None:
        """Until when to wait for more deltas before computing (peer, position, arrival)
        triples; None: compute now."""
        if not pending or not self.window_s:
            return None
        end = min(at for _, _, at in pending) + self.window_s
        if end <= self.clock.now() or not self.coming((p, pos) for p, pos, _ in pending):
            return None
        return end

    def expire(self) -> None:
        """Forget the plans of instances no longer active."""
        for peer in [p for p in self.plans if p not in self.last_seen]:
            del self.plans[peer]


def form_batches(deltas: list[D], key: Callable[[D], Hashable], adapters: Callable[[D], Iterable[str]],
                 max_adapters: int) -> list[tuple[Hashable, list[D]]]:
    """Group pending deltas by (layer, projection) in arrival order, and cut each
    group into batches of at most `max_adapters` distinct adapters (a batch has
    at least one delta): the server's kernels, in the order it runs them."""
    groups: dict[Hashable, list[D]] = defaultdict(list)
    for d in deltas:
        groups[key(d)].append(d)
    out = []
    for k, group in groups.items():
        while group:
            batch, group = _fit(group, adapters, max_adapters)
            out.append((k, batch))
    return out


def run_ready(batch: list[D], run: Callable[[list[D]], list[D]], ready: Callable[[D], bool]) -> list[D]:
    """Run a batch (`run` returns the deltas that must wait: some adapter's
    weights are not in a slot yet); if it cannot run whole, run the deltas whose
    weights are all in place, so one instance's cold adapter (a load from disk
    takes a third of a second) does not hold back other instances' deltas that
    happened to batch with it. Returns the deltas that wait."""
    rest = run(batch)
    if len(rest) < 2:
        return rest
    go = [d for d in rest if ready(d)]
    if not go:
        return rest
    return [d for d in rest if not any(d is g for g in go)] + run(go)


def _fit(deltas: list[D], adapters: Callable[[D], Iterable[str]], max_adapters: int) -> tuple[list[D], list[D]]:
    """The longest prefix of `deltas` using at most `max_adapters` distinct adapters (at least one delta)."""
    seen: set[str] = set()
    for i, d in enumerate(deltas):
        names = set(adapters(d))
        if i and len(seen | names) > max_adapters:
            return deltas[:i], deltas[i:]
        seen |= names
    return deltas, []
