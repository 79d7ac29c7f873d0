"""The invariant checker: the cache's rules, and its books against a recount.

Every invariant of DESIGN.md (pinned nodes stay put, device KV keeps its
ancestors on the device, no block has two owners, no block leaks) and every
incremental index (books, device leaves, host roots, the LRU heap) is asserted
from scratch here, so the property tests catch drift the moment it happens.
Read-only, and too slow for the serving path.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping
from typing import TYPE_CHECKING

from loraserve.cache.copies import Copies
from loraserve.cache.ledger import DEVICE, DISK, HOST, Ledger
from loraserve.cache.swapper import Swapper
from loraserve.cache.tree import DependencyTree, Kind, Node, Tier

if TYPE_CHECKING:
    from loraserve.cache.admission import Held


def invalid_kv_fraction(tree: DependencyTree) -> float:
    """Share of device KV blocks whose adapter or an ancestor is not on the device."""
    kv = [n for n in tree.on_tier[DEVICE] if n.kind is Kind.KV]
    if not kv:
        return 0.0
    up: dict[Node, bool] = {tree.root: True}
    """node → whether it and all its ancestors are on the device (memoized: one pass)."""
    for n in kv:
        path, a = [], n.parent
        while a not in up:
            path.append(a)
            a = a.parent
        ok = up[a]
        for a in reversed(path):
            ok = up[a] = ok and a.tier is DEVICE
    return sum(not up[n.parent] for n in kv) / len(kv)


def check_invariants(ledger: Ledger, copies: Copies, swapper: Swapper, held: Mapping[str, Held]) -> None:
    """Assert every invariant of DESIGN.md and of the manager's own books."""
    policy = ledger.policy
    nodes = list(ledger.tree.nodes())
    waiting = {id(n) for h in held.values() if not h.ready for n in [h.adapter, *h.path]}
    owned: dict[Tier, list[int]] = {DEVICE: [], HOST: []}
    for n in nodes:
        if n.tier is not DISK:
            owned[n.tier].extend(n.blocks)
        assert n.parent.children.get(n.key) is n, "node not linked under its parent"
        if n.pins:
            assert all(a.pins for a in n.ancestors()), "a pinned node's ancestor is not pinned"
            # off the device only while a pending request waits for it to land
            assert n.tier is DEVICE or n.in_transfer or id(n) in waiting, f"pinned node on {n.tier}"
        if policy.dependency and n.tier is DEVICE and n.kind is Kind.KV:
            assert all(a.tier is DEVICE for a in n.ancestors()), "device KV without its adapter/ancestors"
        if n.kind is Kind.KV:
            assert n.num_blocks == 1 and len(n.blocks) == 1 or n.tier is DISK
        if not n.local:
            assert n.kind is Kind.LORA and n.tier is DEVICE and not n.blocks and not n.num_blocks, \
                "a non-local adapter holds blocks or left the device"
    for job in copies.jobs.values():
        if job.src is not DISK:
            owned[job.src].extend(job.src_blocks)
    for h in held.values():
        owned[DEVICE].extend(h.private)
        assert all(n.adapter == h.adapter.key for n in h.path), "KV matched across adapters"
    for tier, pools in ((DEVICE, list(ledger.device.values())), (HOST, [ledger.host] if ledger.host else [])):
        assert len(owned[tier]) == len(set(owned[tier])), f"a {tier.value} block has two owners"
        assert len(owned[tier]) == sum(p.num_used for p in pools), f"{tier.value} blocks leaked"
        for p in pools:
            assert p.num_used + p.num_free == p.num_blocks
    # the incremental books agree with a recount
    movable, blocks, loras = Counter(), Counter(), Counter()
    for n in nodes:
        if not n.local:
            continue
        if n.kind is Kind.LORA:
            loras[n.tier] += 1
        if n.tier is not DISK:
            kind = "adapters" if n.kind is Kind.LORA else "running_kv" if n.pins else "history_kv"
            blocks[(n.tier, kind)] += n.num_blocks
        if n.tier is DEVICE and n.movable:
            movable[ledger.region(n)] += n.num_blocks
    assert +movable == +ledger.movable and +blocks == +ledger.blocks and +loras == +ledger.num_loras, "books drift"
    leaves = {n for n in nodes if n.local and n.tier is DEVICE and not n.num_device_children}
    assert leaves == ledger.tree.device_leaves, "device-leaf index drift"
    roots = {n for n in nodes if n.tier is HOST and n.parent.tier is DEVICE}
    assert roots == ledger.tree.host_roots, "host-root index drift"
    for n in nodes:
        assert n.num_device_children == sum(c.tier is DEVICE for c in n.children.values())
    if swapper.lru is not None:
        entered = {e[-1] for heap in swapper.lru.values() for e in heap if e == swapper.entry(e[-1], 0.0, 0.0, True)}
        assert all(n in entered for n in nodes if n.tier is DEVICE and n.movable), "LRU heap misses a node"
