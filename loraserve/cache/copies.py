"""Copy jobs: a node's move between tiers, from submission to landing.

At submission the node already counts as where it is going (its new blocks
taken, the books moved) and is marked in transfer so nothing moves it again;
its source blocks stay taken until the mover reports the copy done, since they
are still being read until then. Requests waiting on a copy register here and
are released when it lands. Data moves only through the `Mover`; no torch here.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

from loraserve.cache.ledger import DEVICE, DISK, Ledger
from loraserve.cache.mover import CopyJob, Mover
from loraserve.cache.tree import Kind, Node, Tier


class Waiter(Protocol):
    """A request's hold (`admission.Held`), seen only as the jobs it waits on."""

    waiting_on: set[int]


@dataclass
class _Job:
    node: Node
    src: Tier
    src_blocks: list[int]
    pinned: list[Node]
    """Ancestors pinned for the flight of a swap-in, so they cannot leave first."""


class Copies:
    def __init__(self, ledger: Ledger, mover: Mover) -> None:
        self.ledger = ledger
        self.mover = mover
        self.jobs: dict[int, _Job] = {}
        self.job_of: dict[Node, int] = {}
        self._waiters: dict[int, set[Waiter]] = {}
        self._next_job = 0
        self.bytes_in_flight = 0
        """Bytes of every copy submitted and not yet landed: how much link time is
        already promised (a new copy queues behind them)."""

    def submit(self, node: Node, dst: Tier, dst_blocks: list[int], pinned: list[Node]) -> int:
        """Start moving a node to dst_blocks on dst; returns the job id."""
        ledger = self.ledger
        job_id, self._next_job = self._next_job, self._next_job + 1
        src, src_blocks = node.tier, node.blocks
        ledger.note("move", node, src, dst)
        ledger.acct(node, -1)
        ledger.tree.move(node, dst, dst_blocks)
        node.in_transfer = True
        ledger.acct(node, +1)
        self.jobs[job_id] = _Job(node, src, src_blocks, pinned)
        self.job_of[node] = job_id
        self.bytes_in_flight += node.num_bytes
        if src is DEVICE:
            ledger.outgoing[ledger.region(node)] += node.num_blocks
        ledger.counters["swap_in_bytes" if dst is DEVICE else "swap_out_bytes"] += node.num_bytes
        self.mover.submit(CopyJob(job_id, src.value, dst.value, tuple(src_blocks), tuple(dst_blocks),
                                  node.num_bytes, adapter=node.key if node.kind is Kind.LORA else None))
        return job_id

    def poll(self) -> None:
        """Apply finished copies: free their source blocks, release what waited on them."""
        ledger = self.ledger
        for job_id in self.mover.poll():
            job = self.jobs.pop(job_id)
            node = job.node
            del self.job_of[node]
            self.bytes_in_flight -= node.num_bytes
            ledger.acct(node, -1)
            node.in_transfer = False
            ledger.acct(node, +1)
            if job.src is not DISK:
                ledger.pool(job.src, node).free(job.src_blocks)
            if job.src is DEVICE:
                ledger.outgoing[ledger.region(node)] -= node.num_blocks
            ledger.pin(job.pinned, -1)
            for waiter in self._waiters.pop(job_id, ()):
                waiter.waiting_on.discard(job_id)

    def wait(self, node: Node) -> None:
        """Let the node's copy in flight (if any) land."""
        job_id = self.job_of.get(node)
        if job_id is not None:
            self.mover.wait(job_id)
            self.poll()

    def land_outgoing(self, region: str) -> None:
        """Let every copy off the device from a region land: its blocks are needed now."""
        for node, job_id in list(self.job_of.items()):
            if self.jobs[job_id].src is DEVICE and self.ledger.region(node) == region:
                self.mover.wait(job_id)
        self.poll()

    def add_waiter(self, job_id: int, waiter: Waiter) -> None:
        waiter.waiting_on.add(job_id)
        self._waiters.setdefault(job_id, set()).add(waiter)

    def remove_waiter(self, waiter: Waiter) -> None:
        for job_id in waiter.waiting_on:
            self._waiters.get(job_id, set()).discard(waiter)

    def drop(self, node: Node) -> None:
        """Forget a node and its subtree; their blocks go back to their pools.
        Copies in flight finish first: they hold blocks too."""
        self.ledger.note("drop", node, node.tier, None)
        nodes = self.ledger.tree.subtree(node)
        for n in nodes:
            self.wait(n)
        for n in nodes:
            self.ledger.forget(n)
