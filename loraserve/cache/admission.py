"""What requests hold: their matched path, private blocks and pending copies.

`prepare` matches a request's adapter and longest cached prefix and pins them,
so nothing it will read can move while it runs; what is not on the device is
brought there first (the request waits, blocking nobody). A running request's
block table is its pinned path followed by private blocks; `commit` offers
each newly filled block to its adapter's trie, so history outlives the request.
A non-local adapter (see `Node.local`) is always on the device: its requests
never wait for it, and only its KV is matched and cached.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from loraserve.cache.copies import Copies
from loraserve.cache.ledger import DEVICE, Ledger
from loraserve.cache.manager import Readiness, blocks_for
from loraserve.cache.swapper import Swapper
from loraserve.cache.tree import BASE, Node
from loraserve.request import Request


@dataclass(eq=False)  # by identity: copies keep the holds waiting on them in sets
class Held:
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


class Admission:
    def __init__(self, ledger: Ledger, copies: Copies, swapper: Swapper) -> None:
        self.ledger = ledger
        self.copies = copies
        self.swapper = swapper
        self.held: dict[str, Held] = {}

    def prepare(self, req: Request) -> Readiness:
        ledger = self.ledger
        held = self.held.get(req.request_id)
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
        adapter = ledger.tree.adapters[req.adapter or BASE]
        if adapter.tier is not DEVICE and not adapter.in_transfer and not self.swapper.room(ledger.region(adapter),
                                                                                             adapter.num_blocks):
            return Readiness.NO_ROOM  # decided before matching: a queue that waits for room stays cheap
        path = []
        if ledger.policy.keep_history:
            # never the whole sequence: its last token must be computed to sample from
            path = ledger.tree.match(adapter, req.token_ids, ledger.block_size,
                                     (req.num_tokens - 1) // ledger.block_size)
        held = Held(adapter, path, waited_adapter=waited[0], waited_kv=waited[1])
        self.held[req.request_id] = held
        ledger.pin([adapter, *path], +1)
        # the adapter first: without it nothing else is worth moving
        if adapter.tier is not DEVICE or adapter.in_transfer:
            if not self._bring(held, adapter):
                self._release(req.request_id)
                return Readiness.NO_ROOM
            held.waited_adapter = True
        for i, node in enumerate(path):
            if node.tier is not DEVICE or node.in_transfer:
                # a node moves up only behind its parent; a parent still leaving
                # the device is waited for, then the whole match is redone
                if node.parent.tier is not DEVICE or not self._bring(held, node):
                    ledger.pin(path[i:], -1)
                    del path[i:]
                    break
                held.waited_kv = True
        if held.waiting_on:
            return Readiness.WAITING
        self._ready(req, held)
        return Readiness.READY

    def _bring(self, held: Held, node: Node) -> bool:
        """Get a pinned node moving to the device (or wait for its copy in flight)."""
        if node.in_transfer:
            job_id = self.copies.job_of[node]
        else:
            blocks = self.swapper.alloc_device(self.ledger.region(node), node.num_blocks)
            if blocks is None:
                return False
            job_id = self.copies.submit(node, DEVICE, blocks, [])
        self.copies.add_waiter(job_id, held)
        return True

    def _ready(self, req: Request, held: Held) -> None:
        ledger = self.ledger
        now = ledger.clock.now()
        held.ready = True
        for node in [held.adapter, *held.path]:
            node.visits += 1
            node.last_use = now
        req.block_ids = [node.blocks[0] for node in held.path]
        req.num_computed_tokens = len(held.path) * ledger.block_size
        if req.num_cached_tokens is None:
            req.num_cached_tokens = req.num_computed_tokens
        held.num_committed = len(held.path)
        ledger.counters["kv_hit_tokens"] += req.num_computed_tokens
        ledger.counters["prompt_tokens"] += req.num_tokens
        if held.adapter.local:  # the base model and remote adapters take no local slot
            ledger.counters["adapter_hits" if not held.waited_adapter else "adapter_misses"] += 1
            self.swapper.cost.record_admission(req.adapter, now)

    def copies_done(self, req: Request) -> bool:
        """Whether a WAITING request's copies have all landed (prepare it again then)."""
        held = self.held.get(req.request_id)
        return held is None or not held.waiting_on

    def waited_for(self, req: Request) -> tuple[bool, bool]:
        """(adapter, kv): what the request's pending time was spent waiting for."""
        held = self.held.get(req.request_id)
        return (held.waited_adapter, held.waited_kv) if held else (False, False)

    def _new_blocks(self, req: Request, num_new_tokens: int) -> int:
        need = blocks_for(req.num_computed_tokens + num_new_tokens, self.ledger.block_size)
        return max(0, need - len(req.block_ids))

    def can_allocate(self, req: Request, num_new_tokens: int) -> bool:
        n = self._new_blocks(req, num_new_tokens)
        return not n or self.swapper.room(self.ledger.kv_region(), n)

    def allocate(self, req: Request, num_new_tokens: int) -> None:
        n = self._new_blocks(req, num_new_tokens)
        if not n:  # most decode steps: the last block still has room
            return
        blocks = self.swapper.alloc_device(self.ledger.kv_region(), n)
        if blocks is None:
            raise MemoryError("allocate after can_allocate failed")
        self.held[req.request_id].private.update(blocks)
        req.block_ids.extend(blocks)

    def commit(self, req: Request) -> None:
        """Offer the request's newly filled blocks to its adapter's trie."""
        ledger = self.ledger
        held = self.held.get(req.request_id)
        if held is None or not ledger.policy.keep_history or held.diverged:
            return
        bs = ledger.block_size
        full = req.num_computed_tokens // bs
        if full <= held.num_committed:
            return
        now = ledger.clock.now()
        parent = held.path[-1] if held.path else held.adapter
        for i in range(held.num_committed, full):
            tokens = tuple(req.token_slice(i * bs, (i + 1) * bs))
            node = parent.children.get(tokens)
            if node is None:
                block = req.block_ids[i]
                node = ledger.tree.add_kv(parent, tokens, DEVICE, block, ledger.block_bytes, now)
                node.pins = 1
                ledger.acct(node, +1)
                held.private.discard(block)
            elif node.tier is DEVICE and not node.in_transfer:
                ledger.pin((node,), +1)  # someone cached it meanwhile; ours stays private
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
        held = self.held.pop(rid, None)
        if held is None:
            return
        now = self.ledger.clock.now()
        nodes = [held.adapter, *held.path]
        if held.ready:  # before unpinning: a node's LRU key must not change while it is movable
            for node in nodes:
                node.last_use = now
        self.ledger.pin(nodes, -1)
        self.ledger.device[self.ledger.kv_region()].free(list(held.private))
        self.copies.remove_waiter(held)

    def num_running_private(self) -> int:
        return sum(len(h.private) for h in self.held.values())
