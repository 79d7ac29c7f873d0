"""The scheduler's view of KV memory.

A `CacheManager` answers two questions for the scheduler (can this request
grow by n tokens? then grow it) and takes blocks back when a request ends.
`SimpleCacheManager` is the engine-core policy: allocate on admission and on
growth, free on finish or preemption, cache nothing across requests. The ELORA
manager replaces it behind the same interface.
"""

from __future__ import annotations

from typing import Protocol

from loraserve.cache.block_pool import BlockPool
from loraserve.request import Request


def blocks_for(num_tokens: int, block_size: int) -> int:
    return -(-num_tokens // block_size)


class CacheManager(Protocol):
    block_size: int

    def num_cached_tokens(self, request: Request) -> int:
        """Leading prompt tokens whose KV is already on the device for this
        request's adapter (0 when nothing is cached)."""
        ...

    def can_allocate(self, request: Request, num_new_tokens: int) -> bool:
        """Whether the request's block table can grow to hold
        ``request.num_computed_tokens + num_new_tokens`` tokens."""
        ...

    def allocate(self, request: Request, num_new_tokens: int) -> None:
        """Grow ``request.block_ids`` as `can_allocate` promised."""
        ...

    def free(self, request: Request) -> None:
        """Return the request's blocks (finish, abort or preemption)."""
        ...

    def usage(self) -> dict[str, int]:
        """Block counts for observability: at least ``used``, ``free``, ``total``."""
        ...


class SimpleCacheManager:
    def __init__(self, num_blocks: int, block_size: int) -> None:
        self.pool = BlockPool(num_blocks)
        self.block_size = block_size

    def num_cached_tokens(self, request: Request) -> int:
        return 0

    def _num_new_blocks(self, request: Request, num_new_tokens: int) -> int:
        need = blocks_for(request.num_computed_tokens + num_new_tokens, self.block_size)
        return max(0, need - len(request.block_ids))

    def can_allocate(self, request: Request, num_new_tokens: int) -> bool:
        return self._num_new_blocks(request, num_new_tokens) <= self.pool.num_free

    def allocate(self, request: Request, num_new_tokens: int) -> None:
        request.block_ids.extend(self.pool.allocate(self._num_new_blocks(request, num_new_tokens)))

    def free(self, request: Request) -> None:
        self.pool.free(request.block_ids)
        request.block_ids = []

    def usage(self) -> dict[str, int]:
        return {"used": self.pool.num_used, "free": self.pool.num_free, "total": self.pool.num_blocks}
