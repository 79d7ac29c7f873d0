"""The swapper: what leaves the device, what comes back, what the host drops.

One eviction order (the cost model's Eval, or plain LRU) serves both the
watermark pass that runs every `swap_interval` and the on-demand eviction of
an admission or a growing request, so the two never disagree about what is
cold. Under the dependency rule evictions start at device leaves and
prefetches at host roots, which keeps every device KV node's ancestors on the
device. The host makes room by dropping cold KV leaves, never adapters.
"""

from __future__ import annotations

import heapq

from loraserve.cache.copies import Copies
from loraserve.cache.cost import CostModel
from loraserve.cache.ledger import DEVICE, DISK, HOST, Ledger
from loraserve.cache.tree import Kind, Node


class Swapper:
    def __init__(self, ledger: Ledger, copies: Copies) -> None:
        self.ledger = ledger
        self.copies = copies
        c, t = ledger.config, ledger.policy.terms
        self.cost = CostModel(t, c.window, c.tau, c.link_bytes_per_s)
        self._last_swap = float("-inf")
        self._prefetching: set[str] = set()
        """Regions whose last pass wanted more prefetched than the link could take at once."""
        self.lru: dict[str, list[tuple]] | None = (
            {region: [] for region in ledger.device} if t.lru and not ledger.policy.dependency else None)
        """LRU without the dependency rule (vllm): every movable device node is a
        candidate and its key changes only while it is pinned, so one lazy heap per
        region lasts across evictions: an entry goes in whenever a device node turns
        movable, and one whose node moved, got pinned or was used since is skipped
        when popped. Re-scoring every device node per eviction dominated full pools."""
        if self.lru is not None:
            ledger.on_movable = self._push_lru

    # -- making room on demand -------------------------------------------------

    def room(self, region: str, n: int) -> bool:
        """Whether n blocks of a region could be had, evicting whatever may move."""
        ledger = self.ledger
        return ledger.device[region].num_free + ledger.movable[region] + ledger.outgoing[region] >= n

    def alloc_device(self, region: str, n: int) -> list[int] | None:
        pool = self.ledger.device[region]
        if pool.num_free < n:
            if not self.room(region, n):
                return None
            # free at least a slice of the region at once: scoring the candidates
            # costs a pass over them, which per block would dominate a full pool
            batch = min(int(self.ledger.config.evict_batch * pool.num_blocks), self.ledger.movable[region])
            self._evict(region, max(n - pool.num_free, batch), sync=True)
            if pool.num_free < n:
                return None
        return pool.allocate(n)

    def host_room(self, n: int) -> bool:
        """Make n host blocks free, dropping cold KV leaves (never adapters)."""
        host = self.ledger.host
        if host is None or n > host.num_blocks:
            return False
        if host.num_free < n:
            self._drop_host(n - host.num_free)
        return host.num_free >= n

    # -- eviction order -----------------------------------------------------------

    def _eviction_candidates(self, region: str) -> list[Node]:
        ledger = self.ledger
        nodes = ledger.tree.device_leaves if ledger.policy.dependency else ledger.tree.on_tier[DEVICE]
        return [n for n in nodes if n.movable and ledger.region(n) == region]

    def _evict(self, region: str, num_blocks: int, sync: bool) -> None:
        """Evict lowest-Eval device nodes of a region until num_blocks are (being) freed."""
        ledger = self.ledger
        dependency = ledger.policy.dependency
        now = ledger.clock.now()
        low = self.cost.low_lora(now)
        freed = 0
        lru = self.lru is not None
        heap = self.lru[region] if lru else self._heap(self._eviction_candidates(region), now, low, evict=True)
        while freed < num_blocks and heap:
            entry = heapq.heappop(heap)
            node = entry[-1]
            if not (node in ledger.tree.on_tier[DEVICE] and node.movable
                    and (not dependency or not node.num_device_children)) \
                    or lru and entry != self.entry(node, now, low, evict=True):
                continue  # stale entry
            parent = node.parent
            freed += node.num_blocks
            self._move_out(node)
            if node.kind is Kind.LORA and not lru:  # NowLoRA changed: every score may change
                if not self.cost.lora_flat(low, ledger.num_loras[DEVICE] - 1):
                    heap = self._heap(self._eviction_candidates(region), now, low, evict=True)
            elif dependency and parent in ledger.tree.device_leaves and parent.movable \
                    and ledger.region(parent) == region:
                heapq.heappush(heap, self.entry(parent, now, low, evict=True))
        if sync and ledger.outgoing[region]:  # the caller needs the blocks now: let the copies land
            self.copies.land_outgoing(region)

    def _heap(self, nodes: list[Node], now: float, low: float, evict: bool) -> list[tuple]:
        """Entries of `nodes`, heapified. A node's key is a function of its kind, size, visits,
        last use and depth alone (`CostModel`), so nodes alike in those are scored once: a
        replica's thousand adapters that no request has touched yet are all alike, and scoring
        each of them on every prefetch pass dominated a simulated cluster."""
        heap, memo = [], {}
        loras = self.ledger.num_loras[DEVICE]
        key = self.cost.eviction_key if evict else self.cost.prefetch_key
        for n in nodes:
            like = (n.kind, n.num_bytes, n.visits, n.last_use, n.depth)
            k = memo.get(like)
            if k is None:
                k = memo[like] = key(n, now, low, loras) if evict else tuple(-x for x in key(n, now, low, loras))
            heap.append((*k, n.seq, n))
        heapq.heapify(heap)
        return heap

    def _push_lru(self, node: Node) -> None:
        """A device node turned movable: enter it into its region's LRU heap (see lru).
        Stale entries pile up between evictions; past twice the device nodes, rebuild."""
        region = self.ledger.region(node)
        heap = self.lru[region]
        heapq.heappush(heap, self.entry(node, 0.0, 0.0, evict=True))  # LRU keys ignore time and load
        if len(heap) > 2 * len(self.ledger.tree.on_tier[DEVICE]) + 64:
            heap[:] = self._heap(self._eviction_candidates(region), 0.0, 0.0, evict=True)

    def entry(self, node: Node, now: float, low: float, evict: bool) -> tuple:
        """Heap entry: lowest first for eviction, highest first for prefetch."""
        loras = self.ledger.num_loras[DEVICE]
        if evict:
            return (*self.cost.eviction_key(node, now, low, loras), node.seq, node)
        return (*(-k for k in self.cost.prefetch_key(node, now, low, loras)), node.seq, node)

    def _move_out(self, node: Node) -> None:
        """Device → host if the policy keeps it and the host has room; else drop
        (KV) or fall back to disk (adapters: their directory is their source)."""
        ledger = self.ledger
        keep = node.kind is Kind.LORA or ledger.policy.kv_to_host
        if keep and self.host_room(node.num_blocks):
            self.copies.submit(node, HOST, ledger.host.allocate(node.num_blocks), [])
        elif node.kind is Kind.LORA:
            ledger.note("move", node, DEVICE, DISK)
            ledger.acct(node, -1)
            ledger.device[ledger.region(node)].free(node.blocks)
            ledger.tree.move(node, DISK, [])
            ledger.acct(node, +1)
            ledger.counters["adapter_drops"] += 1
        else:
            self.copies.drop(node)

    def _drop_host(self, num_blocks: int) -> None:
        now = self.ledger.clock.now()
        low = self.cost.low_lora(now)
        leaves = [n for n in self.ledger.tree.on_tier[HOST] if n.kind is Kind.KV and not n.children and n.movable]
        heap = self._heap(leaves, now, low, evict=True)
        freed = 0
        while heap and freed < num_blocks:
            node = heapq.heappop(heap)[-1]
            if node.children or node.tier is not HOST:
                continue
            parent = node.parent
            freed += 1
            self.copies.drop(node)
            if parent.kind is Kind.KV and parent.tier is HOST and not parent.children and parent.movable:
                heapq.heappush(heap, self.entry(parent, now, low, evict=True))

    # -- the watermark pass ----------------------------------------------------

    def tick(self, batch_size: int) -> None:
        """Once per engine step (and on the idle timer): land copies, run a pass
        when the policy has a swapper and `swap_interval` has passed, and go on
        with a prefetch the pass left for later (see `_prefetch`)."""
        self.copies.poll()
        now = self.ledger.clock.now()
        self.cost.record_batch(batch_size, now)
        if self.ledger.policy.swapper and now - self._last_swap >= self.ledger.config.swap_interval:
            self._last_swap = now
            self.swap_pass()
        elif self._prefetching:
            for region in list(self._prefetching):
                self._prefetch(region)

    def swap_pass(self) -> None:
        """Busy: evict lowest-Eval device leaves down to the target watermark.
        Idle: prefetch highest-Eval host roots up to it. Host over its own high
        watermark: drop cold KV leaves down to its target."""
        ledger, c = self.ledger, self.ledger.config
        for region, pool in ledger.device.items():
            used = pool.num_used - ledger.outgoing[region]
            if used > c.high_watermark * pool.num_blocks:
                self._prefetching.discard(region)
                self._evict(region, used - int(c.target_watermark * pool.num_blocks), sync=False)
            elif used < c.low_watermark * pool.num_blocks:
                self._prefetching.add(region)
            if region in self._prefetching:
                self._prefetch(region)
        host = ledger.host
        if host is not None and host.num_used > c.host_high_watermark * host.num_blocks:
            self._drop_host(host.num_used - int(c.host_target_watermark * host.num_blocks))

    def _prefetch_candidates(self, region: str) -> list[Node]:
        ledger = self.ledger
        nodes = ledger.tree.host_roots if ledger.policy.dependency else ledger.tree.on_tier[HOST]
        if ledger.policy.unified:  # one region: every node is in it
            return [n for n in nodes if n.movable]
        return [n for n in nodes if n.movable and ledger.region(n) == region]

    def _prefetch(self, region: str) -> None:
        """Prefetch highest-Eval host roots until the region's use reaches the
        target watermark, without queueing more than `prefetch_horizon` of link
        time ahead of whatever a request may need next: the link serves copies
        in order, and a prefetch guesses while a demand load has a request
        waiting. Once the link holds that much, the region stays in
        `_prefetching` and every tick goes on as copies land, so a burst (every
        host adapter at start-up) goes out at the link's pace instead of
        standing in front of the first cold request."""
        ledger, c = self.ledger, self.ledger.config
        pool = ledger.device[region]
        want = int(c.target_watermark * pool.num_blocks) - (pool.num_used - ledger.outgoing[region])
        budget = c.prefetch_horizon * c.link_bytes_per_s - self.copies.bytes_in_flight
        if want <= 0:
            self._prefetching.discard(region)
            return
        if budget <= 0 and self.copies.bytes_in_flight:
            return  # the link is busy: go on once it drains
        now = ledger.clock.now()
        low = self.cost.low_lora(now)
        heap = self._heap(self._prefetch_candidates(region), now, low, evict=False)
        moved = 0

        def fits(node: Node) -> bool:
            return node.tier is HOST and node.movable and node.num_blocks <= min(pool.num_free, want - moved)

        while heap and moved < want:
            node = heapq.heappop(heap)[-1]
            if not fits(node):
                continue
            if node.num_bytes > budget and self.copies.bytes_in_flight:
                return  # the rest when the link has drained
            pinned = list(node.ancestors()) if ledger.policy.dependency else []
            ledger.pin(pinned, +1)
            self.copies.submit(node, DEVICE, pool.allocate(node.num_blocks), pinned)
            moved += node.num_blocks
            budget -= node.num_bytes
            if budget < 0 and self.copies.bytes_in_flight and moved < want:
                # every node is over the budget now, so whichever fits next ends the pass here: whether
                # one does is all that is left to know, and scoring every candidate again to pop it
                # was the hot spot of a replica with a thousand adapters waiting on its host
                rest = self._prefetch_candidates(region) if node.kind is Kind.LORA else [e[-1] for e in heap]
                if any(fits(n) for n in rest):
                    return
                break
            if node.kind is Kind.LORA:
                heap = self._heap(self._prefetch_candidates(region), now, low, evict=False)
        self._prefetching.discard(region)  # the target is reached, or nothing more fits
