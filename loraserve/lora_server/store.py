"""The LoRA server's adapters: names, cached bytes, and compute slots.

Three layers, each the project's existing piece:

- names and identities: `AdapterRegistry` (content hash, the same PEFT
  formats and refusals as the coupled engine);
- bytes: the tiered cache (`TieredCacheManager` over a `TierMemory`), holding
  adapters alone (no KV): disk → host → device, with the ELORA cost model and
  swapper deciding what stays on the device;
- compute: `LoraBank` slots (stacked weights, one batched kernel for many
  adapters) with `LoraSlots` choosing which adapter has which slot.

An adapter reaches a slot from its device blocks. With layer-wise loading a
slot is filled one layer at a time, so a delta for layer l waits only for
layer l's weights (a request's first layers compute while the rest arrive);
without it, the whole adapter goes in before its first delta. A prefetch hint
(an instance queued a request for the adapter) starts the cache's copy to the
device and fills the slot layer by layer in the server's idle time.

A rank of a parallel server (`--ep`, `--pp`) has a store of its `Shard`: every
adapter is cut to the shard as it is read (at load and when the disk tier
reads it again), so cache blocks, slots and the bank hold only the shard's
bytes; the catalogue still shows whole adapters. An adapter with nothing in
the shard takes no cache blocks: its slot is all zeros.
"""

from __future__ import annotations

import dataclasses
import logging

import torch

from loraserve.cache.tiered import Readiness, TieredCacheManager
from loraserve.clock import Clock
from loraserve.dtypes import torch_dtype
from loraserve.engine.tier_memory import TierMemory
from loraserve.engine.torch_mover import TorchMover
from loraserve.lora.adapter import LoraAdapter
from loraserve.lora.bank import LoraBank
from loraserve.lora.packing import unpack
from loraserve.lora.registry import AdapterInfo, AdapterRegistry
from loraserve.lora.slots import LoraSlots
from loraserve.lora_server.shard import Shard
from loraserve.model.spec import ModelSpec
from loraserve.remote.config import LoraServerConfig
from loraserve.remote.protocol import ProtocolError
from loraserve.request import Request
from loraserve.sampling import SamplingParams

log = logging.getLogger(__name__)



class AdapterStore:
    def __init__(self, spec: ModelSpec, config: LoraServerConfig, clock: Clock, shard: Shard | None = None) -> None:
        self.spec = spec
        self.shard = shard
        self.config = config
        self.clock = clock
        dtype, device = torch_dtype(config.dtype), torch.device(config.device)
        self.registry = AdapterRegistry(spec, config.max_lora_rank, dtype)
        cc = config.cache
        block_bytes = cc.block_size * spec.kv_bytes_per_token(dtype.itemsize)
        num_blocks, num_host = cc.device_bytes // block_bytes, cc.host_bytes // block_bytes
        if num_blocks < 1:
            raise ValueError(f"device_bytes {cc.device_bytes} holds no block of {block_bytes} bytes")
        self.memory = TierMemory(spec, num_blocks, cc.block_size, dtype, device, num_host)
        registry = self.registry
        read = registry.reload if shard is None else lambda adapter_id: shard.apply(registry.reload(adapter_id))
        self.mover = TorchMover(self.memory, read)
        self.cache = TieredCacheManager(cc, num_blocks, num_host, block_bytes, clock, self.mover)
        self.bank = LoraBank(spec, config.max_loras, dtype, device, *(
            (shard.keys(spec), shard.num_experts(spec)) if shard is not None else ()))
        self.slots = LoraSlots(config.max_loras)
        self.filled: dict[str, set[int]] = {}
        """Layers whose weights are in the adapter's slot (only adapters with a slot)."""
        self.staged: dict[str, LoraAdapter] = {}
        """Unpacked weights of adapters whose slot is still being filled."""
        self.holds: dict[str, Request] = {}
        """Adapters whose copy to the device tier is in flight (a cache hold each)."""
        self.prefetch: dict[str, None] = {}
        """Hinted adapters to fill in idle time, oldest first."""
        self.version = 0
        """Catalogue version: bumped on every load and unload, so instances re-read it."""
        self.counters = {"slot_hits": 0, "slot_misses": 0, "layers_loaded": 0, "layer_waits": 0}
        self.all_layers = frozenset(shard.layers if shard is not None else range(spec.num_layers))
        self.whole: dict[str, LoraAdapter] = {}
        """A shard's store: each adapter's whole metadata (for the catalogue)."""

    # -- names ---------------------------------------------------------------

    def add(self, name: str, path: str) -> LoraAdapter:
        """Load, validate and name an adapter (AdapterError says why not)."""
        return self.add_loaded(name, self.registry.load(name, path))

    def add_loaded(self, name: str, whole: LoraAdapter) -> LoraAdapter:
        """Name an adapter read by `registry.load` (on any thread), keeping this
        store's part of it. The same bytes under a name they already have is
        no change (an instance that restarts with its --lora flags loads them again)."""
        adapter = self._own(whole)
        if any(a.name == name and a.id == adapter.id for a in self.registry.listing):
            return self.registry.get(adapter.id)
        if adapter.num_bytes or self.registry.has(adapter.id):
            adapter = self.registry.add_cached(name, adapter, self.cache, self.memory)
        else:  # nothing of it in this shard
            adapter = self.registry.register(name, adapter)
        if self.shard is not None:
            self.whole.setdefault(adapter.id, dataclasses.replace(whole, weights={}))
        self.version += 1
        return adapter

    def remove(self, name: str) -> None:
        """Unload by name (UnknownModel if none); its weights go unless another name shares them."""
        adapter = self.registry.remove(name)
        self.version += 1
        if self.registry.is_named(adapter.id):
            return
        self.prefetch.pop(adapter.id, None)
        self.staged.pop(adapter.id, None)
        hold = self.holds.pop(adapter.id, None)
        if hold is not None:
            self.cache.free(hold)
        slot = self.slots.slot_of(adapter.id)
        if slot is not None:
            self.slots.evict(adapter.id)
            self.bank.clear(slot)
            self.filled.pop(adapter.id, None)
        if adapter.num_bytes:
            self.cache.remove_adapter(adapter.id)
        self.whole.pop(adapter.id, None)
        self.registry.drop(adapter.id)

    def catalogue(self) -> list[dict]:
        out = []
        for info in self.registry.listing:
            meta = self.whole.get(info.id) or self.registry.get(info.id)
            out.append({"name": info.name, "id": info.id, "rank": info.rank, "path": info.path,
                        "num_bytes": meta.num_bytes,
                        "layout": [[list(key), list(a), list(b)] for key, a, b in meta.layout]})
        return out

    def listing(self) -> tuple[AdapterInfo, ...]:
        return self.registry.listing

    # -- residency -------------------------------------------------------------

    def hint(self, adapter_ids: list[str]) -> None:
        """Requests for these adapters are coming: start their copies to the
        device tier (the cache bounds those), and queue them to be filled into
        slots in idle time (at most a slot's worth; the newest hints win)."""
        for adapter_id in adapter_ids:
            if self.registry.has(adapter_id) and self.filled.get(adapter_id) != self.all_layers:
                self.prefetch.pop(adapter_id, None)
                self.prefetch[adapter_id] = None
                if (hold := self._bring(adapter_id)) is not None:
                    self.cache.free(hold)  # on the device: the swapper keeps it there while it is wanted
        while len(self.prefetch) > self.slots.num_slots:
            del self.prefetch[next(iter(self.prefetch))]

    def acquire(self, adapter_id: str, layer: int) -> int | None:
        """Pin the adapter's slot for a delta of `layer`, filling what is missing.
        Returns the slot, or None if its weights are not on the device yet (or
        every slot is pinned): the delta waits, and `release` is not due."""
        if not self.registry.has(adapter_id):
            raise ProtocolError(f"unknown adapter {adapter_id!r}", 404)
        need = {layer} if self.config.layerwise else self.all_layers
        slot = self.slots.slot_of(adapter_id)
        if slot is not None and need <= self.filled[adapter_id]:
            self.slots.acquire(adapter_id)
            self.counters["slot_hits"] += 1
            return slot
        staged = self._stage(adapter_id)
        if staged is None or not self.slots.can_acquire(adapter_id):
            self.counters["layer_waits"] += 1
            return None
        self.counters["slot_misses"] += 1
        self._fill(adapter_id, staged, need)
        self.slots.acquire(adapter_id)
        return self.slots.slot_of(adapter_id)

    def release(self, adapter_id: str) -> None:
        self.slots.release(adapter_id)

    def advance(self) -> bool:
        """Idle work: fill one more layer of a hinted adapter. Returns whether
        there was anything to do."""
        self.cache.tick(0)
        for adapter_id in list(self.prefetch):
            filled = self.filled.get(adapter_id, set()) if self.slots.slot_of(adapter_id) is not None else set()
            if filled == self.all_layers or not self.registry.has(adapter_id):
                del self.prefetch[adapter_id]
                continue
            staged = self._stage(adapter_id)
            if staged is None or not self.slots.can_acquire(adapter_id):
                continue
            layer = min(self.all_layers - filled)
            self._fill(adapter_id, staged, {layer} if self.config.layerwise else self.all_layers)
            return True
        return False

    def _fill(self, adapter_id: str, staged: LoraAdapter, layers: set[int] | frozenset[int]) -> None:
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
        rank = self.bank.rank
        self.bank.load(self.slots.slot_of(adapter_id), staged, missing)
        filled |= missing
        self.counters["layers_loaded"] += len(missing)
        if self.bank.rank != rank:  # the bank grew: every other resident slot was rewritten whole
            for other in self.filled:
                if other != adapter_id:
                    self.filled[other] = set(self.all_layers)
        if filled == self.all_layers:
            self.staged.pop(adapter_id, None)

    def _forget_evicted(self) -> None:
        """Slots reassigned by LoraSlots' LRU take their fill state, and any
        half-filled adapter's unpacked weights, with them."""
        for adapter_id in [a for a in self.filled if self.slots.slot_of(a) is None]:
            del self.filled[adapter_id]
            self.staged.pop(adapter_id, None)

    def _stage(self, adapter_id: str) -> LoraAdapter | None:
        """The adapter's weights unpacked from its device blocks, once the cache
        has them there (starting the copy if need be); None while they travel."""
        staged = self.staged.get(adapter_id)
        if staged is not None:
            return staged
        if not self.registry.get(adapter_id).num_bytes:  # an empty shard: zeros
            self.staged[adapter_id] = self.registry.get(adapter_id)
            return self.staged[adapter_id]
        hold = self._bring(adapter_id)
        if hold is None:
            return None
        try:
            data = self.memory.read_blocks("device", self.cache.adapter_blocks(adapter_id))
            staged = unpack(data, self.registry.get(adapter_id), self.bank.dtype, self.bank.device)
        finally:
            self.cache.free(hold)
        self.staged[adapter_id] = staged
        return staged

    def _bring(self, adapter_id: str) -> Request | None:
        """Get the adapter to the device tier. Returns the cache hold that pins
        it there once it is (the caller frees it), None while its copy travels
        (the hold is kept meanwhile) or if the device has no room for it."""
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

    def _own(self, adapter: LoraAdapter) -> LoraAdapter:
        """The part of an adapter this store keeps (all of it unless it holds a shard)."""
        return self.shard.apply(adapter) if self.shard is not None else adapter

    def stats(self) -> dict:
        out = dict(self.cache.stats())
        out.update(self.counters)
        out["slot_adapters"] = len(self.slots.resident())
        out["bank_bytes"] = self.bank.num_bytes
        return out

    def close(self) -> None:
        self.mover.close()
