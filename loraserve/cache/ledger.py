"""The node ledger: the pools, the tree, and the per-tier books kept over them.

The tree says where each node is; the books (`blocks`, `movable`, `outgoing`,
`num_loras`) are running sums over it that eviction and `stats` read every
step, too often to recount. So every change to a node's tier, pins or transfer
state sits between `acct(node, -1)` and `acct(node, +1)`, and `pin` sums the
flips of a whole path before touching them. Nothing here decides what moves:
copies, the swapper and admission all write through this one ledger.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Iterable
from loraserve.cache.block_pool import BlockPool
from loraserve.cache.config import CacheConfig
from loraserve.cache.policy import POLICIES
from loraserve.cache.tree import BASE, DependencyTree, Kind, Node, Tier
from loraserve.clock import Clock

DEVICE, HOST, DISK = Tier.DEVICE, Tier.HOST, Tier.DISK


class Ledger:
    def __init__(self, config: CacheConfig, num_device_blocks: int, num_host_blocks: int, block_bytes: int,
                 clock: Clock) -> None:
        self.config = config
        self.policy = POLICIES[config.policy]
        self.block_size = config.block_size
        self.block_bytes = block_bytes
        self.clock = clock
        if self.policy.unified:
            self.device = {"all": BlockPool(num_device_blocks)}
        else:
            n = max(1, int(num_device_blocks * config.adapter_fraction))
            if n >= num_device_blocks:
                raise ValueError(f"a {num_device_blocks}-block device pool cannot be split for the vllm policy")
            self.device = {"lora": BlockPool(n), "kv": BlockPool(num_device_blocks - n, first=n)}
        self.num_device_blocks = num_device_blocks
        self.host = BlockPool(num_host_blocks) if num_host_blocks else None
        self.tree = DependencyTree()
        self.base = self.tree.add_adapter(BASE, DEVICE, 0, 0, clock.now(), local=False)
        self.movable: Counter = Counter()
        """Device blocks of movable nodes, by region: what on-demand eviction can free."""
        self.outgoing: Counter = Counter()
        """Device blocks of evictions in flight, by region (free once the copy ends)."""
        self.blocks: Counter = Counter()
        """(tier, kind) → blocks, kind in adapters / history_kv / running_kv."""
        self.num_loras: Counter = Counter()
        self.counters: Counter = Counter()
        """Cumulative: adapter_hits/misses, kv_hit_tokens, prompt_tokens, swap bytes, drops."""
        self.log: list[tuple] | None = None
        """When a list: every move and drop is appended as (time, event, node, from, to), a
        node named by its adapter (and trie depth for KV). Comparing two logs shows whether
        two runs (the engine and the simulator) decided alike."""
        self.on_movable: Callable[[Node], None] | None = None
        """Called whenever a device node turns movable (an LRU swapper indexes it then)."""

    # -- regions and pools ----------------------------------------------------

    def region_of(self, kind: Kind) -> str:
        """Which device pool holds a kind of node: the one pool, or under a
        static split the adapter or the KV region."""
        return "all" if self.policy.unified else "lora" if kind is Kind.LORA else "kv"

    def region(self, node: Node) -> str:
        return self.region_of(node.kind)

    def kv_region(self) -> str:
        return self.region_of(Kind.KV)

    def pool(self, tier: Tier, node: Node) -> BlockPool:
        return self.device[self.region(node)] if tier is DEVICE else self.host

    # -- the books ------------------------------------------------------------

    def acct(self, node: Node, sign: int) -> None:
        """Add (sign=1) or remove (sign=-1) a node's share of the running books;
        every change to a node's tier, pins or transfer state sits between a -1 and a +1."""
        kind = node.kind
        if kind is Kind.ROOT or not node.local:
            return
        tier = node.tier
        if kind is Kind.LORA:
            self.num_loras[tier] += sign
        if tier is DISK:
            return
        n = sign * node.num_blocks
        self.blocks[(tier, "adapters" if kind is Kind.LORA else "running_kv" if node.pins else "history_kv")] += n
        if tier is DEVICE and not node.pins and not node.in_transfer:
            self.movable[self.region_of(kind)] += n
            if sign > 0 and self.on_movable is not None:
                self.on_movable(node)

    def pin(self, nodes: Iterable[Node], delta: int) -> None:
        """Pin (delta=+1) or unpin (-1) nodes. The books change only for a node whose
        pinned state flips: its KV turns running (or history again) and its device
        blocks unmovable (or movable). Admissions and finishes pin whole ~50-node
        paths every step, so the flips are summed here and the books touched once."""
        kv = {DEVICE: 0, HOST: 0}
        movable = dict.fromkeys(self.device, 0)
        on_movable = self.on_movable if delta < 0 else None
        for n in nodes:
            before = n.pins
            n.pins = before + delta
            if before and n.pins or not n.local:
                continue
            tier = n.tier
            if n.kind is Kind.KV:
                kv[tier] += n.num_blocks
            if tier is DEVICE and not n.in_transfer:
                movable[self.region_of(n.kind)] += n.num_blocks
                if on_movable is not None:
                    on_movable(n)
        for tier, n in kv.items():
            if n:
                self.blocks[(tier, "history_kv")] -= delta * n
                self.blocks[(tier, "running_kv")] += delta * n
        for region, n in movable.items():
            if n:
                self.movable[region] -= delta * n

    def note(self, event: str, node: Node, src: Tier, dst: Tier | None) -> None:
        if self.log is not None:
            name = node.key if node.kind is Kind.LORA else (node.adapter, node.depth)
            self.log.append((self.clock.now(), event, name, src.value, dst.value if dst else None))

    def forget(self, node: Node) -> None:
        """Take one childless node out of the tree and the books; its blocks go back."""
        self.acct(node, -1)
        if node.tier is not DISK and node.blocks:
            self.pool(node.tier, node).free(node.blocks)
        self.tree.remove(node)
        self.counters["dropped_bytes"] += node.num_bytes if node.kind is Kind.KV else 0

    # -- what the books say ---------------------------------------------------

    def usage(self) -> dict[str, int]:
        used = sum(p.num_used for p in self.device.values())
        return {"used": used, "free": self.num_device_blocks - used, "total": self.num_device_blocks}

    def bytes_by_kind(self, num_running_private: int) -> dict[str, int]:
        """{tier}_bytes_{total, adapters, history_kv, running_kv} and device_bytes_free:
        cheap (running counters), so it can be sampled often. Requests' private
        blocks are not in the tree, so the caller counts them."""
        bb = self.block_bytes
        out = {}
        for tier, total in ((DEVICE, self.num_device_blocks), (HOST, self.host.num_blocks if self.host else 0)):
            t = tier.value
            out[f"{t}_bytes_total"] = total * bb
            for kind in ("adapters", "history_kv", "running_kv"):
                out[f"{t}_bytes_{kind}"] = self.blocks[(tier, kind)] * bb
        out["device_bytes_running_kv"] += num_running_private * bb
        out["device_bytes_free"] = self.usage()["free"] * bb
        return out
