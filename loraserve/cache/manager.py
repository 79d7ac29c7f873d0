"""The scheduler's view of device memory, as a protocol, with its answer type.

`TieredCacheManager` (`cache/tiered.py`) implements it for every policy; the
simulator drives the same class. The scheduler only ever asks these questions,
so this module depends on nothing else in the cache package.
"""

from __future__ import annotations

import enum
from typing import Protocol

from loraserve.request import Request


class Readiness(enum.Enum):
    """What `prepare` found: the request can run now, waits for copies in flight
    (blocking nobody), or its adapter cannot be placed now."""

    READY = "ready"
    WAITING = "waiting"
    NO_ROOM = "no_room"


def blocks_for(num_items: int, per_block: int) -> int:
    """Blocks needed for num_items (tokens or bytes) at per_block each."""
    return -(-num_items // per_block)


class CacheManager(Protocol):
    block_size: int

    def prepare(self, request: Request) -> Readiness:
        """Match the request's adapter and cached prefix, pin them and start
        moving what is missing to the device. READY sets the request's block
        table and computed tokens to its cached prefix."""
        ...

    def copies_done(self, request: Request) -> bool:
        """Whether a WAITING request's copies have all landed."""
        ...

    def waited_for(self, request: Request) -> tuple[bool, bool]:
        """(adapter, kv): whether the request had to wait for its adapter / its KV."""
        ...

    def can_allocate(self, request: Request, num_new_tokens: int) -> bool:
        """Whether the request's block table can grow to hold
        ``request.num_computed_tokens + num_new_tokens`` tokens (evicting cached data if need be)."""
        ...

    def allocate(self, request: Request, num_new_tokens: int) -> None:
        """Grow ``request.block_ids`` as `can_allocate` promised."""
        ...

    def commit(self, request: Request) -> None:
        """Cache the request's newly filled blocks (after a step)."""
        ...

    def free(self, request: Request) -> None:
        """Unpin and return the request's private blocks (finish, abort, preemption)."""
        ...

    def adapter_blocks(self, adapter: str) -> list[int]:
        """Device blocks of a resident adapter."""
        ...

    def tick(self, batch_size: int) -> None:
        """Once per step: finish copies, run the swapper when due."""
        ...

    def usage(self) -> dict[str, int]:
        """Device block counts: ``used``, ``free``, ``total``."""
        ...
