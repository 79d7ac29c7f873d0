"""The tiered cache manager: adapters and KV in one block pool per tier.

Device and host are each one pool of equal-size blocks (one KV block each).
An adapter takes as many blocks as its rank slices need; a KV block is one
node of its adapter's prefix trie. Every policy (`elora`, its ablations,
`vllm`, `slora`) is this one manager with different switches
(`cache/policy.py`), so comparisons between them are one flag apart.

This class is a facade over the parts, each one idea, imported one way
(admission → swapper → copies → ledger):

- `cache/manager.py`: the interface the scheduler sees and its `Readiness`.
- `cache/admission.py`: `prepare` (READY, WAITING for copies, NO_ROOM),
  `can_allocate` / `allocate`, `commit` of filled blocks into the tree, `free`.
- `cache/swapper.py`: eviction order, on-demand room, the watermark pass
  (`tick` every `swap_interval`), host drops.
- `cache/copies.py`: copy jobs through the `Mover`, from submission to landing.
- `cache/ledger.py`: pools, the tree, and the per-tier books kept over them.
- `cache/check.py`: the invariant checker.

What is an adapter here is its node (identity: the namespace its KV lives
under); whether its weights take local blocks is `Node.local` (residency).
`add_adapter` registers local weights; `add_remote_adapter` one served from
elsewhere, whose requests never wait for it. No torch here.
"""

from __future__ import annotations

from loraserve.cache.admission import Admission
from loraserve.cache.check import check_invariants, invalid_kv_fraction
from loraserve.cache.config import CacheConfig
from loraserve.cache.copies import Copies
from loraserve.cache.ledger import DEVICE, DISK, HOST, Ledger
from loraserve.cache.manager import Readiness, blocks_for
from loraserve.cache.mover import Mover
from loraserve.cache.swapper import Swapper
from loraserve.cache.tree import Kind
from loraserve.clock import Clock
from loraserve.request import Request

__all__ = ["Readiness", "TieredCacheManager"]


def _part(part: str, name: str) -> property:
    """An attribute of one part, read and written through the facade (callers
    set `log`, `mover` and `config` on the manager)."""
    return property(lambda self: getattr(getattr(self, part), name),
                    lambda self, value: setattr(getattr(self, part), name, value))


class TieredCacheManager:
    config = _part("ledger", "config")
    policy = _part("ledger", "policy")
    block_size = _part("ledger", "block_size")
    block_bytes = _part("ledger", "block_bytes")
    clock = _part("ledger", "clock")
    device = _part("ledger", "device")
    num_device_blocks = _part("ledger", "num_device_blocks")
    host = _part("ledger", "host")
    tree = _part("ledger", "tree")
    base = _part("ledger", "base")
    movable = _part("ledger", "movable")
    outgoing = _part("ledger", "outgoing")
    blocks = _part("ledger", "blocks")
    num_loras = _part("ledger", "num_loras")
    counters = _part("ledger", "counters")
    log = _part("ledger", "log")
    mover = _part("copies", "mover")
    cost = _part("swapper", "cost")

    def __init__(self, config: CacheConfig, num_device_blocks: int, num_host_blocks: int, block_bytes: int,
                 clock: Clock, mover: Mover) -> None:
        self.ledger = Ledger(config, num_device_blocks, num_host_blocks, block_bytes, clock)
        self.copies = Copies(self.ledger, mover)
        self.swapper = Swapper(self.ledger, self.copies)
        self.admission = Admission(self.ledger, self.copies, self.swapper)
        self.max_request_blocks = self._max_request_blocks()
        """The longest block table a request can ever get (its adapter may share the
        pool). A plain int, recomputed when adapters come and go, so validation on
        other threads reads it without touching the tree the engine thread mutates."""

    # -- adapters ------------------------------------------------------------

    def add_adapter(self, key: str, num_bytes: int) -> list[int]:
        """Register an adapter. Returns the host blocks to write its weights into,
        or [] if the host has no room (it stays on disk, read on demand)."""
        ledger = self.ledger
        n = blocks_for(num_bytes, ledger.block_bytes)
        region = ledger.device[ledger.region_of(Kind.LORA)]
        if n > region.num_blocks:
            raise ValueError(f"the adapter needs {n} blocks of {ledger.block_bytes} bytes; the device "
                             f"{'pool' if ledger.policy.unified else 'adapter region'} has {region.num_blocks}")
        node = ledger.tree.add_adapter(key, DISK, n, num_bytes, ledger.clock.now())
        if self.swapper.host_room(n):
            blocks = ledger.host.allocate(n)
            ledger.tree.move(node, HOST, blocks)
        ledger.acct(node, +1)
        if ledger.policy.unified:  # what _max_request_blocks gives, without a pass over every adapter per add
            self.max_request_blocks = min(self.max_request_blocks, ledger.num_device_blocks - n)
        return node.blocks

    def add_remote_adapter(self, key: str) -> None:
        """Register an adapter whose weights live elsewhere (a remote LoRA server):
        its KV is keyed, matched and cached under it like any adapter's, but it
        takes no local blocks, so it is always ready and never swapped or counted."""
        self.ledger.tree.add_adapter(key, DEVICE, 0, 0, self.ledger.clock.now(), local=False)

    def remove_adapter(self, key: str) -> None:
        """Forget an adapter and all KV computed under it (no request may hold it)."""
        node = self.ledger.tree.adapters[key]
        if node.pins:
            raise ValueError(f"adapter {key} is in use")
        self.copies.drop(node)
        self.max_request_blocks = self._max_request_blocks()

    def _max_request_blocks(self) -> int:
        ledger = self.ledger
        if not ledger.policy.unified:
            return ledger.device["kv"].num_blocks
        return ledger.num_device_blocks - max((n.num_blocks for n in ledger.tree.adapters.values()), default=0)

    def check_request_size(self, num_tokens: int) -> None:
        """Reject up front (ValueError) a request of num_tokens (prompt + max_tokens)
        that could never get its blocks: queued, it would wait forever."""
        if blocks_for(num_tokens, self.ledger.block_size) > self.max_request_blocks:
            raise ValueError(f"prompt plus max_tokens needs more KV blocks than the device pool has for a request "
                             f"({self.max_request_blocks} of {self.ledger.block_size} tokens)")

    def adapter_blocks(self, key: str) -> list[int]:
        """Device blocks of a resident adapter (for loading it into a LoRA slot)."""
        node = self.ledger.tree.adapters[key]
        assert node.tier is DEVICE and not node.in_transfer, "adapter is not resident"
        return node.blocks

    # -- requests (see cache/admission.py) -----------------------------------

    def prepare(self, req: Request) -> Readiness:
        return self.admission.prepare(req)

    def copies_done(self, req: Request) -> bool:
        return self.admission.copies_done(req)

    def waited_for(self, req: Request) -> tuple[bool, bool]:
        return self.admission.waited_for(req)

    def can_allocate(self, req: Request, num_new_tokens: int) -> bool:
        return self.admission.can_allocate(req, num_new_tokens)

    def allocate(self, req: Request, num_new_tokens: int) -> None:
        self.admission.allocate(req, num_new_tokens)

    def commit(self, req: Request) -> None:
        self.admission.commit(req)

    def free(self, req: Request) -> None:
        self.admission.free(req)

    # -- copies and the swapper ------------------------------------------------

    def poll(self) -> None:
        """Apply finished copies (`tick` does this every step)."""
        self.copies.poll()

    def tick(self, batch_size: int) -> None:
        """Once per engine step (and on the idle timer)."""
        self.swapper.tick(batch_size)

    def swap_pass(self) -> None:
        self.swapper.swap_pass()

    # -- observability and invariants ----------------------------------------

    def usage(self) -> dict[str, int]:
        return self.ledger.usage()

    def num_running_private(self) -> int:
        return self.admission.num_running_private()

    def invalid_kv_fraction(self) -> float:
        return invalid_kv_fraction(self.ledger.tree)

    def bytes_by_kind(self) -> dict[str, int]:
        return self.ledger.bytes_by_kind(self.num_running_private())

    def stats(self) -> dict:
        out = {"policy": self.policy.name, "block_bytes": self.block_bytes, **self.bytes_by_kind()}
        out["device_adapters"] = self.num_loras[DEVICE]
        out["host_adapters"] = self.num_loras[HOST]
        out["low_lora"] = self.cost.low_lora(self.clock.now())
        out["invalid_kv_fraction"] = self.invalid_kv_fraction()
        out["pending_transfers"] = len(self.copies.jobs)
        c = self.counters
        admissions = c["adapter_hits"] + c["adapter_misses"]
        out["adapter_hit_rate"] = c["adapter_hits"] / admissions if admissions else 0.0
        out["kv_hit_rate"] = c["kv_hit_tokens"] / c["prompt_tokens"] if c["prompt_tokens"] else 0.0
        out.update({k: c[k] for k in ("adapter_hits", "adapter_misses", "kv_hit_tokens", "prompt_tokens",
                                      "swap_in_bytes", "swap_out_bytes", "dropped_bytes", "adapter_drops")})
        return out

    def check(self) -> None:
        """Assert every invariant of DESIGN.md and of this manager's own books."""
        check_invariants(self.ledger, self.copies, self.swapper, self.admission.held)
