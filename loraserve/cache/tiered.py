"""The tiered cache manager: adapters and KV in one block pool per tier.

Device and host are each one pool of equal-size blocks (one KV block each).
An adapter takes as many blocks as its rank slices need; a KV block is one
node of its adapter's prefix trie. Every policy (`elora`, its ablations,
`vllm`, `slora`) is this one manager with different switches
(`cache/policy.py`), so comparisons between them are one flag apart.

What the scheduler sees:

- `prepare(request)` matches the request's adapter and longest cached prefix,
  pins them, and starts swapping in whatever is not on the device. It answers
  READY (the request's block table now starts with its cached prefix), WAITING
  (copies in flight: the request sits in the pending set, blocking nobody) or
  NO_ROOM (the adapter cannot be placed now).
- `can_allocate` / `allocate` grow a running request's block table, evicting
  cached data on demand when the pool is short.
- `commit(request)` after each step puts newly filled blocks into the tree,
  so history survives the request (unless the policy keeps none).
- `free(request)` unpins; cached nodes stay, private blocks go back.
- `tick(batch_size)` once per step: finish copies, and every `swap_interval`
  run the swapper (evict above the high watermark, prefetch below the low one).

Data moves only through the `Mover` (`cache/mover.py`); no torch here.
"""

from __future__ import annotations

import enum
import heapq
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from loraserve.cache.block_pool import BlockPool
from loraserve.cache.cost import CostModel
from loraserve.cache.manager import blocks_for
from loraserve.cache.mover import CopyJob, Mover
from loraserve.cache.policy import POLICIES
from loraserve.cache.tree import BASE, DependencyTree, Kind, Node, Tier
from loraserve.clock import Clock
from loraserve.request import Request

if TYPE_CHECKING:  # config validates policy names against cache.policy: import it lazily
    from loraserve.config import CacheConfig

DEVICE, HOST, DISK = Tier.DEVICE, Tier.HOST, Tier.DISK


class Readiness(enum.Enum):
    READY = "ready"
    WAITING = "waiting"
    NO_ROOM = "no_room"


@dataclass
class _Held:
    """What one admitted (or pending) request holds."""

    adapter: Node
    path: list[Node] = field(default_factory=list)
    """Pinned KV nodes from the adapter down: the head of the block table."""

    private: set[int] = field(default_factory=set)
    """Device blocks only this request uses (not, or not yet, in the tree)."""

    waiting_on: set[int] = field(default_factory=set)
    waited_adapter: bool = False
    waited_kv: bool = False
    ready: bool = False
    num_committed: int = 0
    """Leading blocks of the block table already offered to the tree."""

    diverged: bool = False
    """Its blocks stopped matching what the tree can take; commit no further."""


@dataclass
class _Job:
    node: Node
    src: Tier
    src_blocks: list[int]
    pinned: list[Node]
    """Ancestors pinned for the flight of a swap-in, so they cannot leave first."""


class TieredCacheManager:
    def __init__(self, config: CacheConfig, num_device_blocks: int, num_host_blocks: int, block_bytes: int,
                 clock: Clock, mover: Mover) -> None:
        self.config = config
        self.policy = POLICIES[config.policy]
        self.block_size = config.block_size
        self.block_bytes = block_bytes
        self.clock = clock
        self.mover = mover
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
        self.base = self.tree.add_adapter(BASE, DEVICE, 0, 0, clock.now())
        t = self.policy.terms
        self.cost = CostModel(t, config.window, config.tau, config.link_bytes_per_s)
        self._held: dict[str, _Held] = {}
        self._jobs: dict[int, _Job] = {}
        self._job_of: dict[Node, int] = {}
        self._waiters: dict[int, set[str]] = {}
        self._next_job = 0
        self._last_swap = float("-inf")
        self.movable: Counter = Counter()
        """Device blocks of movable nodes, by region: what on-demand eviction can free."""
        self._lru: dict[str, list[tuple]] | None = (
            {region: [] for region in self.device} if t.lru and not self.policy.dependency else None)
        """LRU without the dependency rule (vllm): every movable device node is a
        candidate and its key changes only while it is pinned, so one lazy heap per
        region lasts across evictions: an entry goes in whenever a device node turns
        movable, and one whose node moved, got pinned or was used since is skipped
        when popped. Re-scoring every device node per eviction dominated full pools."""
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

    # -- bookkeeping helpers ----------------------------------------------

    def _region_of(self, kind: Kind) -> str:
        """Which device pool holds a kind of node: the one pool, or under a
        static split the adapter or the KV region."""
        return "all" if self.policy.unified else "lora" if kind is Kind.LORA else "kv"

    def _region(self, node: Node) -> str:
        return self._region_of(node.kind)

    def _kv_region(self) -> str:
        return self._region_of(Kind.KV)

    def _acct(self, node: Node, sign: int) -> None:
        """Add (sign=1) or remove (sign=-1) a node's share of the running books;
        every change to a node's tier, pins or transfer state sits between a -1 and a +1."""
        kind = node.kind
        if kind is Kind.ROOT or node is self.base:
            return
        tier = node.tier
        if kind is Kind.LORA:
            self.num_loras[tier] += sign
        if tier is DISK:
            return
        n = sign * node.num_blocks
        self.blocks[(tier, "adapters" if kind is Kind.LORA else "running_kv" if node.pins else "history_kv")] += n
        if tier is DEVICE and not node.pins and not node.in_transfer:
            self.movable[self._region_of(kind)] += n
            if sign > 0 and self._lru is not None:
                self._push_lru(node)

    def _pin(self, nodes: Iterable[Node], delta: int) -> None:
        """Pin (delta=+1) or unpin (-1) nodes. The books change only for a node whose
        pinned state flips: its KV turns running (or history again) and its device
        blocks unmovable (or movable). Admissions and finishes pin whole ~50-node
        paths every step, so the flips are summed here and the books touched once."""
        kv = {DEVICE: 0, HOST: 0}
        movable = dict.fromkeys(self.device, 0)
        base = self.base
        for n in nodes:
            before = n.pins
            n.pins = before + delta
            if before and n.pins or n is base:
                continue
            tier = n.tier
            if n.kind is Kind.KV:
                kv[tier] += n.num_blocks
            if tier is DEVICE and not n.in_transfer:
                movable[self._region_of(n.kind)] += n.num_blocks
                if delta < 0 and self._lru is not None:
                    self._push_lru(n)
        for tier, n in kv.items():
            if n:
                self.blocks[(tier, "history_kv")] -= delta * n
                self.blocks[(tier, "running_kv")] += delta * n
        for region, n in movable.items():
            if n:
                self.movable[region] -= delta * n

    def _note(self, event: str, node: Node, src: Tier, dst: Tier | None) -> None:
        if self.log is not None:
            name = node.key if node.kind is Kind.LORA else (node.adapter, node.depth)
            self.log.append((self.clock.now(), event, name, src.value, dst.value if dst else None))

    def _pool(self, tier: Tier, node: Node) -> BlockPool:
        return self.device[self._region(node)] if tier is DEVICE else self.host

    def _submit(self, node: Node, dst: Tier, dst_blocks: list[int], pinned: list[Node]) -> int:
        job_id, self._next_job = self._next_job, self._next_job + 1
        src, src_blocks = node.tier, node.blocks
        self._note("move", node, src, dst)
        self._acct(node, -1)
        self.tree.move(node, dst, dst_blocks)
        node.in_transfer = True
        self._acct(node, +1)
        self._jobs[job_id] = _Job(node, src, src_blocks, pinned)
        self._job_of[node] = job_id
        if src is DEVICE:
            self.outgoing[self._region(node)] += node.num_blocks
        self.counters["swap_in_bytes" if dst is DEVICE else "swap_out_bytes"] += node.num_bytes
        self.mover.submit(CopyJob(job_id, src.value, dst.value, tuple(src_blocks), tuple(dst_blocks),
                                  node.num_bytes, adapter=node.key if node.kind is Kind.LORA else None))
        return job_id

    def poll(self) -> None:
        """Apply finished copies: free their source blocks, release what waited on them."""
        for job_id in self.mover.poll():
            job = self._jobs.pop(job_id)
            node = job.node
            del self._job_of[node]
            self._acct(node, -1)
            node.in_transfer = False
            self._acct(node, +1)
            if job.src is not DISK:
                self._pool(job.src, node).free(job.src_blocks)
            if job.src is DEVICE:
                self.outgoing[self._region(node)] -= node.num_blocks
            self._pin(job.pinned, -1)
            for rid in self._waiters.pop(job_id, ()):
                held = self._held.get(rid)
                if held is not None:
                    held.waiting_on.discard(job_id)

    def _wait(self, node: Node) -> None:
        job_id = self._job_of.get(node)
        if job_id is not None:
            self.mover.wait(job_id)
            self.poll()

    # -- adapters ------------------------------------------------------------

    def add_adapter(self, key: str, num_bytes: int) -> list[int]:
        """Register an adapter. Returns the host blocks to write its weights into,
        or [] if the host has no room (it stays on disk, read on demand)."""
        n = blocks_for(num_bytes, self.block_bytes)
        region = self.device[self._region_of(Kind.LORA)]
        if n > region.num_blocks:
            raise ValueError(f"the adapter needs {n} blocks of {self.block_bytes} bytes; the device "
                             f"{'pool' if self.policy.unified else 'adapter region'} has {region.num_blocks}")
        node = self.tree.add_adapter(key, DISK, n, num_bytes, self.clock.now())
        if self._host_room(n):
            blocks = self.host.allocate(n)
            self.tree.move(node, HOST, blocks)
        self._acct(node, +1)
        return node.blocks

    def remove_adapter(self, key: str) -> None:
        """Forget an adapter and all KV computed under it (no request may hold it)."""
        node = self.tree.adapters[key]
        if node.pins:
            raise ValueError(f"adapter {key} is in use")
        self._drop(node)

    @property
    def max_request_blocks(self) -> int:
        """The longest block table a request can ever get (its adapter may share the pool)."""
        if not self.policy.unified:
            return self.device["kv"].num_blocks
        return self.num_device_blocks - max((n.num_blocks for n in self.tree.adapters.values()), default=0)

    def check_request_size(self, num_tokens: int) -> None:
        """Reject up front (ValueError) a request of num_tokens (prompt + max_tokens)
        that could never get its blocks: queued, it would wait forever."""
        if blocks_for(num_tokens, self.block_size) > self.max_request_blocks:
            raise ValueError(f"prompt plus max_tokens needs more KV blocks than the device pool has for a request "
                             f"({self.max_request_blocks} of {self.block_size} tokens)")

    def adapter_blocks(self, key: str) -> list[int]:
        """Device blocks of a resident adapter (for loading it into a LoRA slot)."""
        node = self.tree.adapters[key]
        assert node.tier is DEVICE and not node.in_transfer, "adapter is not resident"
        return node.blocks

    # -- requests ------------------------------------------------------------

    def prepare(self, req: Request) -> Readiness:
        held = self._held.get(req.request_id)
        if held is not None:
            if held.waiting_on:
                return Readiness.WAITING
            if held.ready:
                return Readiness.READY
            # every copy it waited on is done: match again from scratch (a copy
            # it waited on may have been an eviction, and more may be cached now)
            waited = (held.waited_adapter, held.waited_kv)
            self._release(req.request_id)
        else:
            waited = (False, False)
        adapter = self.tree.adapters[req.adapter or BASE]
        if adapter.tier is not DEVICE and not adapter.in_transfer and not self._room(self._region(adapter),
                                                                                      adapter.num_blocks):
            return Readiness.NO_ROOM  # decided before matching: a queue that waits for room stays cheap
        path = []
        if self.policy.keep_history:
            # never the whole sequence: its last token must be computed to sample from
            path = self.tree.match(adapter, req.token_ids, self.block_size, (req.num_tokens - 1) // self.block_size)
        held = _Held(adapter, path, waited_adapter=waited[0], waited_kv=waited[1])
        self._held[req.request_id] = held
        self._pin([adapter, *path], +1)
        # the adapter first: without it nothing else is worth moving
        if adapter.tier is not DEVICE or adapter.in_transfer:
            if not self._bring(req.request_id, held, adapter):
                self._release(req.request_id)
                return Readiness.NO_ROOM
            held.waited_adapter = True
        for i, node in enumerate(path):
            if node.tier is not DEVICE or node.in_transfer:
                # a node moves up only behind its parent; a parent still leaving
                # the device is waited for, then the whole match is redone
                if node.parent.tier is not DEVICE or not self._bring(req.request_id, held, node):
                    self._pin(path[i:], -1)
                    del path[i:]
                    break
                held.waited_kv = True
        if held.waiting_on:
            return Readiness.WAITING
        self._ready(req, held)
        return Readiness.READY

    def _bring(self, rid: str, held: _Held, node: Node) -> bool:
        """Get a pinned node moving to the device (or wait for its copy in flight)."""
        if node.in_transfer:
            job_id = self._job_of[node]
        else:
            blocks = self._alloc_device(self._region(node), node.num_blocks)
            if blocks is None:
                return False
            job_id = self._submit(node, DEVICE, blocks, [])
        held.waiting_on.add(job_id)
        self._waiters.setdefault(job_id, set()).add(rid)
        return True

    def _ready(self, req: Request, held: _Held) -> None:
        now = self.clock.now()
        held.ready = True
        for node in [held.adapter, *held.path]:
            node.visits += 1
            node.last_use = now
        req.block_ids = [node.blocks[0] for node in held.path]
        req.num_computed_tokens = len(held.path) * self.block_size
        held.num_committed = len(held.path)
        self.counters["kv_hit_tokens"] += req.num_computed_tokens
        self.counters["prompt_tokens"] += req.num_tokens
        if req.adapter is not None:
            self.counters["adapter_hits" if not held.waited_adapter else "adapter_misses"] += 1
            self.cost.record_admission(req.adapter, now)

    def copies_done(self, req: Request) -> bool:
        """Whether a WAITING request's copies have all landed (prepare it again then)."""
        held = self._held.get(req.request_id)
        return held is None or not held.waiting_on

    def waited_for(self, req: Request) -> tuple[bool, bool]:
        """(adapter, kv): what the request's pending time was spent waiting for."""
        held = self._held.get(req.request_id)
        return (held.waited_adapter, held.waited_kv) if held else (False, False)

    def _new_blocks(self, req: Request, num_new_tokens: int) -> int:
        need = blocks_for(req.num_computed_tokens + num_new_tokens, self.block_size)
        return max(0, need - len(req.block_ids))

    def can_allocate(self, req: Request, num_new_tokens: int) -> bool:
        n = self._new_blocks(req, num_new_tokens)
        return not n or self._room(self._kv_region(), n)

    def allocate(self, req: Request, num_new_tokens: int) -> None:
        n = self._new_blocks(req, num_new_tokens)
        if not n:  # most decode steps: the last block still has room
            return
        blocks = self._alloc_device(self._kv_region(), n)
        if blocks is None:
            raise MemoryError("allocate after can_allocate failed")
        self._held[req.request_id].private.update(blocks)
        req.block_ids.extend(blocks)

    def commit(self, req: Request) -> None:
        """Offer the request's newly filled blocks to its adapter's trie."""
        held = self._held.get(req.request_id)
        if held is None or not self.policy.keep_history or held.diverged:
            return
        full = req.num_computed_tokens // self.block_size
        if full <= held.num_committed:
            return
        now = self.clock.now()
        parent = held.path[-1] if held.path else held.adapter
        bs = self.block_size
        for i in range(held.num_committed, full):
            tokens = tuple(req.token_slice(i * bs, (i + 1) * bs))
            node = parent.children.get(tokens)
            if node is None:
                block = req.block_ids[i]
                node = self.tree.add_kv(parent, tokens, DEVICE, block, self.block_bytes, now)
                node.pins = 1
                self._acct(node, +1)
                held.private.discard(block)
            elif node.tier is DEVICE and not node.in_transfer:
                self._pin((node,), +1)  # someone cached it meanwhile; ours stays private
                node.last_use = now
            else:
                held.diverged = True
                break
            held.path.append(node)
            parent = node
        held.num_committed = full

    def free(self, req: Request) -> None:
        self._release(req.request_id)
        req.block_ids = []

    def _release(self, rid: str) -> None:
        held = self._held.pop(rid, None)
        if held is None:
            return
        now = self.clock.now()
        nodes = [held.adapter, *held.path]
        if held.ready:  # before unpinning: a node's LRU key must not change while it is movable
            for node in nodes:
                node.last_use = now
        self._pin(nodes, -1)
        self.device[self._kv_region()].free(list(held.private))
        for job_id in held.waiting_on:
            self._waiters.get(job_id, set()).discard(rid)

    # -- making room ---------------------------------------------------------

    def _room(self, region: str, n: int) -> bool:
        """Whether n blocks of a region could be had, evicting whatever may move."""
        return self.device[region].num_free + self.movable[region] + self.outgoing[region] >= n

    def _alloc_device(self, region: str, n: int) -> list[int] | None:
        pool = self.device[region]
        if pool.num_free < n:
            if not self._room(region, n):
                return None
            # free at least a slice of the region at once: scoring the candidates
            # costs a pass over them, which per block would dominate a full pool
            batch = min(int(self.config.evict_batch * pool.num_blocks), self.movable[region])
            self._evict(region, max(n - pool.num_free, batch), sync=True)
            if pool.num_free < n:
                return None
        return pool.allocate(n)

    def _eviction_candidates(self, region: str) -> list[Node]:
        nodes = self.tree.device_leaves if self.policy.dependency else self.tree.on_tier[DEVICE]
        return [n for n in nodes if n.movable and self._region(n) == region]

    def _evict(self, region: str, num_blocks: int, sync: bool) -> None:
        """Evict lowest-Eval device nodes of a region until num_blocks are (being) freed."""
        now = self.clock.now()
        low = self.cost.low_lora(now)
        freed = 0
        lru = self._lru is not None
        heap = self._lru[region] if lru else self._heap(self._eviction_candidates(region), now, low, evict=True)
        while freed < num_blocks and heap:
            entry = heapq.heappop(heap)
            node = entry[-1]
            if not (node in self.tree.on_tier[DEVICE] and node.movable
                    and (not self.policy.dependency or not node.num_device_children)) \
                    or lru and entry != self._entry(node, now, low, evict=True):
                continue  # stale entry
            parent = node.parent
            freed += node.num_blocks
            self._move_out(node)
            if node.kind is Kind.LORA and not lru:  # NowLoRA changed: every score changes
                heap = self._heap(self._eviction_candidates(region), now, low, evict=True)
            elif self.policy.dependency and parent in self.tree.device_leaves and parent.movable \
                    and self._region(parent) == region:
                heapq.heappush(heap, self._entry(parent, now, low, evict=True))
        if sync and self.outgoing[region]:  # the caller needs the blocks now: let the copies land
            for node, job_id in list(self._job_of.items()):
                if self._jobs[job_id].src is DEVICE and self._region(node) == region:
                    self.mover.wait(job_id)
            self.poll()

    def _heap(self, nodes: list[Node], now: float, low: float, evict: bool) -> list[tuple]:
        heap = [self._entry(n, now, low, evict) for n in nodes]
        heapq.heapify(heap)
        return heap

    def _push_lru(self, node: Node) -> None:
        """A device node turned movable: enter it into its region's LRU heap (see _lru).
        Stale entries pile up between evictions; past twice the device nodes, rebuild."""
        heap = self._lru[self._region(node)]
        heapq.heappush(heap, self._entry(node, 0.0, 0.0, evict=True))  # LRU keys ignore time and load
        if len(heap) > 2 * len(self.tree.on_tier[DEVICE]) + 64:
            heap[:] = self._heap(self._eviction_candidates(self._region(node)), 0.0, 0.0, evict=True)

    def _entry(self, node: Node, now: float, low: float, evict: bool) -> tuple:
        """Heap entry: lowest first for eviction, highest first for prefetch."""
        loras = self.num_loras[DEVICE]
        if evict:
            return (*self.cost.eviction_key(node, now, low, loras), node.seq, node)
        return (*(-k for k in self.cost.prefetch_key(node, now, low, loras)), node.seq, node)

    def _move_out(self, node: Node) -> None:
        """Device → host if the policy keeps it and the host has room; else drop
        (KV) or fall back to disk (adapters: their directory is their source)."""
        keep = node.kind is Kind.LORA or self.policy.kv_to_host
        if keep and self._host_room(node.num_blocks):
            self._submit(node, HOST, self.host.allocate(node.num_blocks), [])
        elif node.kind is Kind.LORA:
            self._note("move", node, DEVICE, DISK)
            self._acct(node, -1)
            self.device[self._region(node)].free(node.blocks)
            self.tree.move(node, DISK, [])
            self._acct(node, +1)
            self.counters["adapter_drops"] += 1
        else:
            self._drop(node)

    def _host_room(self, n: int) -> bool:
        """Make n host blocks free, dropping cold KV leaves (never adapters)."""
        if self.host is None or n > self.host.num_blocks:
            return False
        if self.host.num_free < n:
            self._drop_host(n - self.host.num_free)
        return self.host.num_free >= n

    def _drop_host(self, num_blocks: int) -> None:
        now = self.clock.now()
        low = self.cost.low_lora(now)
        leaves = [n for n in self.tree.on_tier[HOST] if n.kind is Kind.KV and not n.children and n.movable]
        heap = self._heap(leaves, now, low, evict=True)
        freed = 0
        while heap and freed < num_blocks:
            node = heapq.heappop(heap)[-1]
            if node.children or node.tier is not HOST:
                continue
            parent = node.parent
            freed += 1
            self._drop(node)
            if parent.kind is Kind.KV and parent.tier is HOST and not parent.children and parent.movable:
                heapq.heappush(heap, self._entry(parent, now, low, evict=True))

    def _drop(self, node: Node) -> None:
        """Forget a node and its subtree; their blocks go back to their pools."""
        self._note("drop", node, node.tier, None)
        nodes = self.tree.subtree(node)
        for n in nodes:  # copies in flight finish first (they hold blocks too)
            self._wait(n)
        for n in nodes:
            self._acct(n, -1)
            if n.tier is not DISK and n.blocks:
                self._pool(n.tier, n).free(n.blocks)
            self.tree.remove(n)
            self.counters["dropped_bytes"] += n.num_bytes if n.kind is Kind.KV else 0

    # -- the swapper ---------------------------------------------------------

    def tick(self, batch_size: int) -> None:
        """Once per engine step (and on the idle timer)."""
        self.poll()
        now = self.clock.now()
        self.cost.record_batch(batch_size, now)
        if self.policy.swapper and now - self._last_swap >= self.config.swap_interval:
            self._last_swap = now
            self.swap_pass()

    def swap_pass(self) -> None:
        """Busy: evict lowest-Eval device leaves down to the target watermark.
        Idle: prefetch highest-Eval host roots up to it. Host over its own high
        watermark: drop cold KV leaves down to its target."""
        c = self.config
        for region, pool in self.device.items():
            used = pool.num_used - self.outgoing[region]
            if used > c.high_watermark * pool.num_blocks:
                self._evict(region, used - int(c.target_watermark * pool.num_blocks), sync=False)
            elif used < c.low_watermark * pool.num_blocks:
                self._prefetch(region, int(c.target_watermark * pool.num_blocks) - used)
        if self.host is not None and self.host.num_used > c.host_high_watermark * self.host.num_blocks:
            self._drop_host(self.host.num_used - int(c.host_target_watermark * self.host.num_blocks))

    def _prefetch_candidates(self, region: str) -> list[Node]:
        nodes = self.tree.host_roots if self.policy.dependency else self.tree.on_tier[HOST]
        return [n for n in nodes if n.movable and self._region(n) == region]

    def _prefetch(self, region: str, num_blocks: int) -> None:
        now = self.clock.now()
        low = self.cost.low_lora(now)
        pool = self.device[region]
        heap = self._heap(self._prefetch_candidates(region), now, low, evict=False)
        moved = 0
        while heap and moved < num_blocks:
            node = heapq.heappop(heap)[-1]
            if node.tier is not HOST or not node.movable or node.num_blocks > min(pool.num_free, num_blocks - moved):
                continue
            pinned = list(node.ancestors()) if self.policy.dependency else []
            self._pin(pinned, +1)
            self._submit(node, DEVICE, pool.allocate(node.num_blocks), pinned)
            moved += node.num_blocks
            if node.kind is Kind.LORA:
                heap = self._heap(self._prefetch_candidates(region), now, low, evict=False)

    # -- observability and invariants ----------------------------------------

    def usage(self) -> dict[str, int]:
        used = sum(p.num_used for p in self.device.values())
        return {"used": used, "free": self.num_device_blocks - used, "total": self.num_device_blocks}

    def num_running_private(self) -> int:
        return sum(len(h.private) for h in self._held.values())

    def invalid_kv_fraction(self) -> float:
        """Share of device KV blocks whose adapter or an ancestor is not on the device."""
        kv = [n for n in self.tree.on_tier[DEVICE] if n.kind is Kind.KV]
        if not kv:
            return 0.0
        up: dict[Node, bool] = {self.tree.root: True}
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

    def bytes_by_kind(self) -> dict[str, int]:
        """{tier}_bytes_{total, adapters, history_kv, running_kv} and device_bytes_free:
        cheap (running counters), so it can be sampled often."""
        bb = self.block_bytes
        out = {}
        for tier, total in ((DEVICE, self.num_device_blocks), (HOST, self.host.num_blocks if self.host else 0)):
            t = tier.value
            out[f"{t}_bytes_total"] = total * bb
            for kind in ("adapters", "history_kv", "running_kv"):
                out[f"{t}_bytes_{kind}"] = self.blocks[(tier, kind)] * bb
        out["device_bytes_running_kv"] += self.num_running_private() * bb
        out["device_bytes_free"] = self.usage()["free"] * bb
        return out

    def stats(self) -> dict:
        out = {"policy": self.policy.name, "block_bytes": self.block_bytes, **self.bytes_by_kind()}
        out["device_adapters"] = self.num_loras[DEVICE]
        out["host_adapters"] = self.num_loras[HOST]
        out["low_lora"] = self.cost.low_lora(self.clock.now())
        out["invalid_kv_fraction"] = self.invalid_kv_fraction()
        out["pending_transfers"] = len(self._jobs)
        c = self.counters
        admissions = c["adapter_hits"] + c["adapter_misses"]
        out["adapter_hit_rate"] = c["adapter_hits"] / admissions if admissions else 0.0
        out["kv_hit_rate"] = c["kv_hit_tokens"] / c["prompt_tokens"] if c["prompt_tokens"] else 0.0
        out.update({k: c[k] for k in ("adapter_hits", "adapter_misses", "kv_hit_tokens", "prompt_tokens",
                                      "swap_in_bytes", "swap_out_bytes", "dropped_bytes", "adapter_drops")})
        return out

    def check(self) -> None:
        """Assert every invariant of DESIGN.md and of this manager's own books."""
        nodes = list(self.tree.nodes())
        waiting = {id(n) for h in self._held.values() if not h.ready for n in [h.adapter, *h.path]}
        owned: dict[Tier, list[int]] = {DEVICE: [], HOST: []}
        for n in nodes:
            if n.tier is not DISK:
                owned[n.tier].extend(n.blocks)
            assert n.parent.children.get(n.key) is n, "node not linked under its parent"
            if n.pins:
                assert all(a.pins for a in n.ancestors()), "a pinned node's ancestor is not pinned"
                # off the device only while a pending request waits for it to land
                assert n.tier is DEVICE or n.in_transfer or id(n) in waiting, f"pinned node on {n.tier}"
            if self.policy.dependency and n.tier is DEVICE and n.kind is Kind.KV:
                assert all(a.tier is DEVICE for a in n.ancestors()), "device KV without its adapter/ancestors"
            if n.kind is Kind.KV:
                assert n.num_blocks == 1 and len(n.blocks) == 1 or n.tier is DISK
        for job in self._jobs.values():
            if job.src is not DISK:
                owned[job.src].extend(job.src_blocks)
        for held in self._held.values():
            owned[DEVICE].extend(held.private)
            assert all(n.adapter == held.adapter.key for n in held.path), "KV matched across adapters"
        for tier, pools in ((DEVICE, list(self.device.values())), (HOST, [self.host] if self.host else [])):
            assert len(owned[tier]) == len(set(owned[tier])), f"a {tier.value} block has two owners"
            assert len(owned[tier]) == sum(p.num_used for p in pools), f"{tier.value} blocks leaked"
            for p in pools:
                assert p.num_used + p.num_free == p.num_blocks
        # the incremental books agree with a recount
        movable, blocks, loras = Counter(), Counter(), Counter()
        for n in nodes:
            if n.key == BASE:
                continue
            if n.kind is Kind.LORA:
                loras[n.tier] += 1
            if n.tier is not DISK:
                kind = "adapters" if n.kind is Kind.LORA else "running_kv" if n.pins else "history_kv"
                blocks[(n.tier, kind)] += n.num_blocks
            if n.tier is DEVICE and n.movable:
                movable[self._region(n)] += n.num_blocks
        assert +movable == +self.movable and +blocks == +self.blocks and +loras == +self.num_loras, "books drift"
        leaves = {n for n in nodes if n.key != BASE and n.tier is DEVICE and not n.num_device_children}
        assert leaves == self.tree.device_leaves, "device-leaf index drift"
        roots = {n for n in nodes if n.tier is HOST and n.parent.tier is DEVICE}
        assert roots == self.tree.host_roots, "host-root index drift"
        for n in nodes:
            assert n.num_device_children == sum(c.tier is DEVICE for c in n.children.values())
        if self._lru is not None:
            entered = {e[-1] for heap in self._lru.values() for e in heap if e == self._entry(e[-1], 0.0, 0.0, True)}
            assert all(n in entered for n in nodes if n.tier is DEVICE and n.movable), "LRU heap misses a node"
