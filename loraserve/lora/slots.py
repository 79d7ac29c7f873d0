"""Which adapters sit in the local LoRA backend's slots (policy, no tensors).

The backend keeps `num_slots` stacked adapter weights on the device; a step
can only batch adapters that have a slot. A slot is pinned while any running
request uses its adapter; an unpinned slot is reused least-recently-used first.
To the scheduler this is only a budget of distinct adapters (`can_acquire`,
`acquire`, `release`): which slot an adapter gets stays behind the backend.
"""

from __future__ import annotations

from collections import OrderedDict


class LoraSlots:
    def __init__(self, num_slots: int) -> None:
        self.num_slots = num_slots
        self._slot_of: OrderedDict[str, int] = OrderedDict()  # LRU order, oldest first
        self._pins: dict[str, int] = {}
        self._free = list(range(num_slots - 1, -1, -1))

    def slot_of(self, adapter: str) -> int | None:
        return self._slot_of.get(adapter)

    def _victim(self) -> str | None:
        return next((a for a in self._slot_of if not self._pins.get(a)), None)

    def can_acquire(self, adapter: str) -> bool:
        return adapter in self._slot_of or bool(self._free) or self._victim() is not None

    def acquire(self, adapter: str) -> bool:
        """Pin the adapter into a slot; returns whether its weights must be loaded."""
        load = adapter not in self._slot_of
        if load:
            if not self._free:
                victim = self._victim()
                if victim is None:
                    raise RuntimeError("no LoRA slot free: call can_acquire first")
                self._free.append(self._slot_of.pop(victim))
                self._pins.pop(victim, None)
            self._slot_of[adapter] = self._free.pop()
        self._slot_of.move_to_end(adapter)
        self._pins[adapter] = self._pins.get(adapter, 0) + 1
        return load

    def release(self, adapter: str) -> None:
        if not self._pins.get(adapter):
            raise ValueError(f"adapter {adapter} released more often than acquired")
        self._pins[adapter] -= 1

    def pinned(self, adapter: str) -> bool:
        """Whether running requests use the adapter's slot."""
        return bool(self._pins.get(adapter))

    def evict(self, adapter: str) -> None:
        """Drop an unpinned adapter from its slot (used when it is unloaded)."""
        if self.pinned(adapter):
            raise ValueError(f"adapter {adapter} is in use by running requests")
        if adapter in self._slot_of:
            self._free.append(self._slot_of.pop(adapter))
            self._pins.pop(adapter, None)

    def resident(self) -> dict[str, int]:
        return dict(self._slot_of)
