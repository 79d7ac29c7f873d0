"""Which adapter layers sit in the LoRA server's compute slots (policy: no
tensors, time from a Clock).

An adapter reaches a slot from the device tier of the server's adapter cache
(the project's `TieredCacheManager`, holding adapters alone). With layer-wise
loading a delta for layer l needs only layer l in the slot, so a request's
first layers compute while the rest arrive; without it, the whole adapter
goes in before its first delta. Prefetch hints (an instance queued a request
for the adapter) are filled one layer at a time in the server's idle time.

What moves bytes is a `Loader`: the real server's unpacks device blocks and
writes the bank (`lora_server/store.py`); the simulator's says when a layer's
share of the modelled copy has arrived (`sim/lora_server.py`). Both run this
policy, which keeps a log of its decisions (`log`) for the test that
compares them.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol

from loraserve.cache.tiered import Readiness, TieredCacheManager
from loraserve.clock import Clock
from loraserve.lora.slots import LoraSlots
from loraserve.request import Request
from loraserve.sampling import SamplingParams


class Loader(Protocol):
    def available(self, adapter_id: str, layers: set[int] | frozenset[int]) -> bool:
        """Whether these layers can be written into a slot now (starting the copy that brings them if need be)."""
        ...

    def write(self, adapter_id: str, slot: int, layers: set[int]) -> bool:
        """Write the layers into the slot; True if every other resident slot was rewritten whole."""
        ...

    def done(self, adapter_id: str) -> None:
        """Its slot is complete or lost: let go of what was staged for it."""
        ...


class SlotFill:
    def __init__(self, num_slots: int, layers: frozenset[int], layerwise: bool, clock: Clock, loader: Loader,
                 known: Callable[[str], bool]) -> None:
        self.slots = LoraSlots(num_slots)
        self.all_layers = layers
        self.layerwise = layerwise
        self.clock = clock
        self.loader = loader
        self.known = known
        """Whether an adapter is (still) served."""
        self.filled: dict[str, set[int]] = {}
        """Layers whose weights are in the adapter's slot (only adapters with a slot)."""
        self.prefetch: dict[str, None] = {}
        """Hinted adapters to fill in idle time, oldest first."""
        self.counters = {"slot_hits": 0, "slot_misses": 0, "layers_loaded": 0, "layer_waits": 0}
        self.log: list[tuple] | None = None
        """When a list: (time, "fill", adapter, layers) for every slot write."""

    def need(self, layer: int) -> frozenset[int]:
        return frozenset((layer,)) if self.layerwise else self.all_layers

    def complete(self, adapter_id: str) -> bool:
        return self.slots.slot_of(adapter_id) is not None and self.filled[adapter_id] == self.all_layers

    def hint(self, adapter_id: str) -> bool:
        """Queue a hinted adapter for idle filling; False if there is nothing to fill."""
        if not self.known(adapter_id) or self.complete(adapter_id):
            return False
        self.prefetch.pop(adapter_id, None)
        self.prefetch[adapter_id] = None
        while len(self.prefetch) > self.slots.num_slots:  # at most a slot's worth: the newest hints win
            del self.prefetch[next(iter(self.prefetch))]
        return True

    def acquire(self, adapter_id: str, layer: int, count: bool = True) -> int | None:
        """Pin the adapter's slot for a delta of `layer`, filling what is missing.
        Returns the slot, or None if the weights are not there yet (or every
        slot is pinned): the delta waits, and `release` is not due. `count`:
        False for a readiness check (`window.run_ready`), which counts the fills
        it makes but not its hits and waits."""
        need = self.need(layer)
        slot = self.slots.slot_of(adapter_id)
        if slot is not None and need <= self.filled[adapter_id]:
            self.slots.acquire(adapter_id)
            self.counters["slot_hits"] += count
            return slot
        if not self.loader.available(adapter_id, need) or not self.slots.can_acquire(adapter_id):
            self.counters["layer_waits"] += count
            return None
        self.counters["slot_misses"] += 1
        self._fill(adapter_id, need)
        self.slots.acquire(adapter_id)
        return self.slots.slot_of(adapter_id)

    def release(self, adapter_id: str) -> None:
        self.slots.release(adapter_id)

    def advance(self) -> bool:
        """Idle work: fill one more layer of a hinted adapter. Returns whether there was any."""
        for adapter_id in list(self.prefetch):
            filled = self.filled.get(adapter_id, set()) if self.slots.slot_of(adapter_id) is not None else set()
            if filled == self.all_layers or not self.known(adapter_id):
                del self.prefetch[adapter_id]
                continue
            need = self.need(min(self.all_layers - filled))
            if not self.loader.available(adapter_id, need) or not self.slots.can_acquire(adapter_id):
                continue
            self._fill(adapter_id, need)
            return True
        return False

    def remove(self, adapter_id: str) -> int | None:
        """Forget an unloaded adapter; returns the slot it had (to be cleared), if any."""
        self.prefetch.pop(adapter_id, None)
        self.loader.done(adapter_id)
        slot = self.slots.slot_of(adapter_id)
        if slot is not None:
            self.slots.evict(adapter_id)
            self.filled.pop(adapter_id, None)
        return slot

    def _fill(self, adapter_id: str, layers: frozenset[int]) -> None:
        """Write `layers` of an adapter into its slot (taking one, unpinned, if it has none)."""
        if self.slots.slot_of(adapter_id) is None:
            self.slots.acquire(adapter_id)
            self.slots.release(adapter_id)
            self.filled[adapter_id] = set()
        self._forget_evicted()
        filled = self.filled[adapter_id]
        missing = set(layers) - filled
        if not missing:
            return
        grew = self.loader.write(adapter_id, self.slots.slot_of(adapter_id), missing)
        filled |= missing
        self.counters["layers_loaded"] += len(missing)
        if self.log is not None:
            self.log.append((self.clock.now(), "fill", adapter_id, tuple(sorted(missing))))
        if grew:  # every other resident slot was rewritten whole
            for other in self.filled:
                if other != adapter_id:
                    self.filled[other] = set(self.all_layers)
        if filled == self.all_layers:
            self.loader.done(adapter_id)

    def _forget_evicted(self) -> None:
        """Slots reassigned by LoraSlots' LRU take their fill state (and staged weights) with them."""
        for adapter_id in [a for a in self.filled if self.slots.slot_of(a) is None]:
            del self.filled[adapter_id]
            self.loader.done(adapter_id)


class Holds:
    """Getting adapters to the device tier of the server's cache: a hold is a
    cache request pinning one adapter, kept while its copy travels."""

    def __init__(self, cache: TieredCacheManager, clock: Clock) -> None:
        self.cache = cache
        self.clock = clock
        self.holds: dict[str, Request] = {}

    def bring(self, adapter_id: str) -> Request | None:
        """The hold that pins the adapter on the device once it is there (the
        caller frees it), None while its copy travels (the hold is kept) or if
        the device has no room for it."""
        hold = self.holds.pop(adapter_id, None)
        if hold is None:
            hold = Request(f"hold:{adapter_id}", [0], SamplingParams(max_tokens=1), adapter=adapter_id,
                           arrival_time=self.clock.now())
        self.cache.tick(0)
        state = self.cache.prepare(hold)
        if state is Readiness.WAITING:
            self.holds[adapter_id] = hold
            return None
        return hold if state is Readiness.READY else None

    def touch(self, adapter_id: str) -> None:
        """Start the adapter's copy (the swapper keeps it on the device while it is wanted)."""
        if (hold := self.bring(adapter_id)) is not None:
            self.cache.free(hold)

    def __len__(self) -> int:
        return len(self.holds)

    def drop(self, adapter_id: str) -> None:
        hold = self.holds.pop(adapter_id, None)
        if hold is not None:
            self.cache.free(hold)
