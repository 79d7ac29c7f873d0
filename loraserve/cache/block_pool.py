"""A pool of equal-size blocks identified by integers."""

from __future__ import annotations

from collections import deque


class BlockPool:
    """Free-list allocator over block ids ``first .. first + num_blocks - 1``
    (a pool can be one region of a tier's arena).

    Invariant: ``num_used + num_free == num_blocks`` at all times, and a block id
    is never handed out twice before it is freed.
    """

    def __init__(self, num_blocks: int, first: int = 0) -> None:
        if num_blocks < 1:
            raise ValueError(f"a block pool needs at least one block, got {num_blocks}")
        self.num_blocks = num_blocks
        self._free: deque[int] = deque(range(first, first + num_blocks))
        self._used: set[int] = set()

    @property
    def num_free(self) -> int:
        return len(self._free)

    @property
    def num_used(self) -> int:
        return len(self._used)

    def allocate(self, n: int) -> list[int]:
        if n > len(self._free):
            raise MemoryError(f"asked for {n} blocks, {len(self._free)} free of {self.num_blocks}")
        ids = [self._free.popleft() for _ in range(n)]
        self._used.update(ids)
        return ids

    def free(self, ids: list[int]) -> None:
        for i in ids:
            if i not in self._used:
                raise ValueError(f"block {i} freed but not in use")
            self._used.remove(i)
            self._free.append(i)
