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

from loraserve.cache.tiered import TieredCacheManager
from loraserve.clock import Clock
from loraserve.dtypes import resolve_dtype, torch_dtype
from loraserve.engine.tier_memory import TierMemory
from loraserve.engine.torch_mover import TorchMover
from loraserve.lora.adapter import LoraAdapter
from loraserve.lora.bank import LoraBank
from loraserve.lora.packing import unpack
from loraserve.lora.registry import AdapterInfo, AdapterRegistry
from loraserve.lora_server.fill import Holds, SlotFill
from loraserve.lora_server.shard import Shard
from loraserve.model.spec import ModelSpec
from loraserve.remote.config import LoraServerConfig
from loraserve.remote.protocol import ProtocolError

log = logging.getLogger(__name__)



class AdapterStore:
    def __init__(self, spec: ModelSpec, config: LoraServerConfig, clock: Clock, shard: Shard | None = None) -> None:
        self.spec = spec
        self.shard = shard
        self.config = config
        self.clock = clock
        dtype, device = torch_dtype(resolve_dtype(config.dtype, config.device)), torch.device(config.device)
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
        self.holds = Holds(self.cache, clock)
        self.staged: dict[str, LoraAdapter] = {}
        """Unpacked weights of adapters whose slot is still being filled."""
        self.fill = SlotFill(config.max_loras, frozenset(shard.layers if shard is not None else range(spec.num_layers)),
                             config.layerwise, clock, self, self.registry.has)
        self.slots = self.fill.slots
        self.counters = self.fill.counters
        self.all_layers = self.fill.all_layers
        self.version = 0
        """Catalogue version: bumped on every load and unload, so instances re-read it."""
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
        self.holds.drop(adapter.id)
        slot = self.fill.remove(adapter.id)
        if slot is not None:
            self.bank.clear(slot)
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

    @property
    def prefetch(self) -> dict[str, None]:
        """Hinted adapters to fill in idle time, oldest first."""
        return self.fill.prefetch

    def hint(self, adapter_ids: list[str]) -> None:
        """Requests for these adapters are coming: start their copies to the
        device tier (the cache bounds those), and queue them to be filled into
        slots in idle time (at most a slot's worth; the newest hints win)."""
        for adapter_id in adapter_ids:
            if not self.registry.has(adapter_id) or not self.registry.get(adapter_id).num_bytes:
                continue  # unknown, or nothing of it in this rank's shard (it is not in the cache)
            if self.fill.hint(adapter_id):
                self.holds.touch(adapter_id)

    def acquire(self, adapter_id: str, layer: int) -> int | None:
        """Pin the adapter's slot for a delta of `layer`, filling what is missing.
        Returns the slot, or None if its weights are not on the device yet (or
        every slot is pinned): the delta waits, and `release` is not due."""
        if not self.registry.has(adapter_id):
            raise ProtocolError(f"unknown adapter {adapter_id!r}", 404)
        return self.fill.acquire(adapter_id, layer)

    def release(self, adapter_id: str) -> None:
        self.fill.release(adapter_id)

    def ready(self, adapters: list[str], layer: int) -> bool:
        """Whether every adapter's weights for `layer` are in a slot (filling what
        can be filled), pinning them as `store_delta` does and letting go. A
        question, not a delta: hits and waits are not counted. An adapter no longer
        served is not ready (the server answers its delta 404 on its next pass)."""
        got = []
        try:
            for a in dict.fromkeys(adapters):
                if not self.registry.has(a) or self.fill.acquire(a, layer, count=False) is None:
                    return False
                got.append(a)
            return True
        finally:
            for a in got:
                self.release(a)

    def advance(self) -> bool:
        """Idle work: fill one more layer of a hinted adapter. Returns whether
        there was anything to do."""
        self.cache.tick(0)
        return self.fill.advance()

    # -- the Loader of SlotFill: device blocks -> unpacked weights -> the bank ---

    def available(self, adapter_id: str, layers) -> bool:
        return self._stage(adapter_id) is not None

    def write(self, adapter_id: str, slot: int, layers: set[int]) -> bool:
        rank = self.bank.rank
        self.bank.load(slot, self.staged[adapter_id], layers)
        return self.bank.rank != rank  # the bank grew: every other resident slot was rewritten whole

    def done(self, adapter_id: str) -> None:
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
        hold = self.holds.bring(adapter_id)
        if hold is None:
            return None
        try:
            data = self.memory.read_blocks("device", self.cache.adapter_blocks(adapter_id))
            staged = unpack(data, self.registry.get(adapter_id), self.bank.dtype, self.bank.device)
        finally:
            self.cache.free(hold)
        self.staged[adapter_id] = staged
        return staged

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
