"""A pool of equal-size blocks identified by integers."""

from __future__ import annotations

from collections import deque


class BlockPool:
    """Free-list allocator over block ids ``first .. first + num_blocks - 1``
    (a pool can be one region of a tier's arena).

    First-in first-out: ids never handed out come first, in order, then freed
    ids in the order they were freed. The never-used ids are a range and the
    used ones a byte per block, not a list and a set: a host tier sized for
    hundreds of multi-GB adapters is millions of blocks, and a simulated
    cluster holds one per instance (the list and set took gigabytes).

    Invariant: ``num_used + num_free == num_blocks`` at all times, and a block id
    is never handed out twice before it is freed.
    """

    def __init__(self, num_blocks: int, first: int = 0) -> None:
        if num_blocks < 1:
            raise ValueError(f"a block pool needs at least one block, got {num_blocks}")
        self.num_blocks = num_blocks
        self.first = first
        self._fresh = range(first, first + num_blocks)
        """Ids not handed out yet."""

        self._freed: deque[int] = deque()
        self._used = bytearray(num_blocks)
        self._num_used = 0

    @property
    def num_free(self) -> int:
        return len(self._fresh) + len(self._freed)

    @property
    def num_used(self) -> int:
        return self._num_used

    def allocate(self, n: int) -> list[int]:
        if n < 0:
            raise ValueError(f"asked for {n} blocks")
        if n > self.num_free:
            raise MemoryError(f"asked for {n} blocks, {self.num_free} free of {self.num_blocks}")
        ids = list(self._fresh[:n])
        self._fresh = self._fresh[len(ids):]
        ids += [self._freed.popleft() for _ in range(n - len(ids))]
        for i in ids:
            self._used[i - self.first] = 1
        self._num_used += n
        return ids

    def free(self, ids: list[int]) -> None:
        for i in ids:
            k = i - self.first
            if not 0 <= k < self.num_blocks or not self._used[k]:
                raise ValueError(f"block {i} freed but not in use")
            self._used[k] = 0
            self._num_used -= 1
            self._freed.append(i)
