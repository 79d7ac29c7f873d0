"""The LoRA server of a disaggregated deployment, on virtual time.

Its decisions are the real server's policy objects: the adapter cache is the
project's `TieredCacheManager` holding adapters alone (ELORA's cost model by
default, `elora-wos` for plain LRU), slots are filled by `SlotFill` (layer-wise
or whole), and deltas wait and batch by `BatchWindow`, `form_batches` and `run_ready`, as
`lora_server/server.py` does. What is modelled instead of done:

- copies to the device tier go over a `LinkMover` at the server GPUs' PCIe
  bandwidth (an adapter is sharded over all G GPUs, so G links in parallel);
  with `layer_arrival`, a layer is usable once its share of that copy has
  arrived (the paper's layer-wise loading from host memory); the real server's
  cache copies an adapter whole, which `layer_arrival=False` reproduces;
- a batch's compute is `ExchangeModel`'s roofline on the stage that owns the
  layers (PPy stages of EPx GPUs, each stage a queue of its own);
- the instance's time for the layers is the exchange model's (link, push or
  pull, overlap or not), counted from when the batch starts.

A delta here is one instance's rows for a *position*: a group of consecutive
layers (`layer_group`; 1 is exact, larger groups keep long runs fast and are
priced as that many layers).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

from loraserve.cache.config import CacheConfig
from loraserve.cache.mover import CopyJob, LinkMover
from loraserve.cache.tiered import TieredCacheManager
from loraserve.clock import ManualClock
from loraserve.lora_server.fill import Holds, SlotFill
from loraserve.lora_server.window import BatchWindow, form_batches, run_ready
from loraserve.model.spec import ModelSpec
from loraserve.sim.exchange import ExchangeModel
from loraserve.sim.hardware import Hardware

BLOCK_BYTES = 16 << 20
"""Block size of the server's adapter cache (adapters only: no KV to page)."""


@dataclass(frozen=True)
class DisaggConfig:
    server_gpus: int = 8
    ep: int = 4
    pp: int = 2
    link: str = "ib"
    """`ib` (the server on other nodes, the paper's default) or `nvlink` (inside the instances' node)."""

    push: bool = True
    overlap: bool = True
    layerwise: bool = True
    layer_arrival: bool = True
    kernel_eff: float = 1.0
    """Efficiency of the server's LoRA kernels relative to the profile's (the "+kernel" rung: 1.0;
    generic segmented kernels on many small (adapter, expert) slices: lower)."""

    batch_window_us: int = 200
    max_loras: int = 512
    """Server slots: the most distinct adapters one batched kernel serves."""

    server_cache_bytes: int | None = None
    """The server's device tier for adapters; None: what its GPUs' memory allows (mem_util of it)."""

    host_bytes: int | None = None
    """Host memory for adapters; None: room for all of them (adapters wait in host memory)."""

    cache_policy: str = "elora"
    block_bytes: int = BLOCK_BYTES
    """Block size of the server's adapter cache."""

    mem_util: float = 0.9
    layer_group: int = 0
    """Layers per simulated position; 0: enough that a pass has at most 4 positions."""

    def __post_init__(self) -> None:
        if self.ep * self.pp != self.server_gpus:
            raise ValueError(f"EP{self.ep}-PP{self.pp} does not use {self.server_gpus} GPUs")


@dataclass
class SimDelta:
    peer: int
    position: int
    arrived: float
    adapters: tuple[str, ...]
    tokens: int
    base_layer_s: float
    done: Callable[[float], None]
    """Called with the time the instance has the group's deltas (its layers done)."""

    plan: frozenset[int] = field(default_factory=frozenset)


class TrackedLink(LinkMover):
    """A LinkMover that remembers when each adapter's copy to the device started and ends."""

    def __init__(self, clock, duration) -> None:
        super().__init__(clock, duration=duration)
        self.copies: dict[str, tuple[float, float]] = {}

    def submit(self, job: CopyJob) -> None:
        super().submit(job)
        if job.adapter is not None and job.dst_tier == "device":
            end = self._finish[job.id]
            self.copies[job.adapter] = (end - self.duration(job), end)


def copy_time(hw: Hardware, cfg: DisaggConfig, job: CopyJob) -> float:
    """An adapter's copy between the server's tiers: sharded over all its GPUs, so their PCIe links in parallel."""
    return hw.pcie_latency + job.num_bytes / (cfg.server_gpus * hw.pcie_bw)


class SimLoraServer:
    def __init__(self, spec: ModelSpec, hw: Hardware, cfg: DisaggConfig, adapters: dict[str, int],
                 clock: ManualClock, exchange: ExchangeModel, wake: Callable[[float], None], store=None) -> None:
        """wake(t): the cluster calls `pump` at time t. store: a real `AdapterStore`
        (built on `clock`) whose cache, holds and slot filling to use instead of
        modelled ones: the real server's tensors, on virtual time (the decision-log test)."""
        self.spec, self.cfg, self.clock, self.exchange, self.wake = spec, cfg, clock, exchange, wake
        self.num_layers = spec.num_layers
        self.group = cfg.layer_group or max(1, math.ceil(spec.num_layers / 4))
        self.num_positions = math.ceil(spec.num_layers / self.group)
        self.mover = TrackedLink(clock, lambda job: copy_time(hw, cfg, job))
        self.staged: set[str] = set()
        self.pending: list[SimDelta] = []
        if store is not None:
            from loraserve.sim.paced import PacedMover

            store.cache.mover = PacedMover(store.mover, self.mover)
            self.cache, self.holds, self.fill, self.advance = store.cache, store.holds, store.fill, store.advance
        else:
            device = cfg.server_cache_bytes or int(cfg.server_gpus * hw.mem_bytes * cfg.mem_util)
            host = cfg.host_bytes or int(sum(adapters.values()) / 0.75) + cfg.block_bytes * (len(adapters) + 8)
            cache_cfg = CacheConfig(block_size=16, device_bytes=device, host_bytes=host, policy=cfg.cache_policy)
            self.cache = TieredCacheManager(cache_cfg, device // cfg.block_bytes, host // cfg.block_bytes,
                                            cfg.block_bytes, clock, self.mover)
            for name, size in adapters.items():
                self.cache.add_adapter(name, size)
            self.holds = Holds(self.cache, clock)
            self.fill = SlotFill(cfg.max_loras, frozenset(range(spec.num_layers)), cfg.layerwise, clock, self,
                                 adapters.__contains__)
        self.window = BatchWindow(clock, cfg.batch_window_us / 1e6)
        self.stage_free = [0.0] * cfg.pp
        self.log: list[tuple] | None = None
        """When a list: (time, "batch", position, instances, adapters) for every batch run."""
        self.on_batch: Callable[[int, list[SimDelta]], None] | None = None
        """Called for every batch run (the decision-log test computes its deltas with real kernels)."""
        self.busy_s = 0.0

    def advance(self) -> bool:
        """Idle work, as AdapterStore.advance: fill one more layer of a hinted adapter."""
        self.cache.tick(0)
        return self.fill.advance()

    def layers(self, position: int) -> range:
        return range(position * self.group, min((position + 1) * self.group, self.num_layers))

    # -- messages from instances ---------------------------------------------

    def hint(self, adapter_id: str) -> None:
        """A request for the adapter was queued at an instance (as RemoteLoraBackend hints)."""
        if self.fill.hint(adapter_id):
            self.holds.touch(adapter_id)
        self.wake(self.clock.now())

    def submit(self, delta: SimDelta) -> None:
        if len(delta.adapters) > self.cfg.max_loras:  # the real server refuses it (503)
            raise ValueError(f"a delta names {len(delta.adapters)} adapters; the server has {self.cfg.max_loras} "
                             "slots (size max_loras to at least the instances' max_num_seqs)")
        self.window.arrived(delta.peer, delta.position, delta.arrived, delta.plan)
        self.pending.append(delta)
        self.pump()

    # -- the loop ----------------------------------------------------------------

    def pump(self) -> None:
        """One turn of the server's loop: wait for instances behind in their pass,
        else run every batch whose weights are in place; idle: fill hinted slots."""
        if not self.pending:
            while self.advance():
                pass
            if self.fill.prefetch and (t := self.mover.next_finish()) is not None:
                self.wake(t)
            return
        end = self.window.deadline([(d.peer, d.position, d.arrived) for d in self.pending])
        if end is not None:
            self.wake(end)
            return
        waiting: list[SimDelta] = []
        for position, batch in form_batches(self.pending, lambda d: d.position, lambda d: d.adapters,
                                            self.cfg.max_loras):
            waiting.extend(run_ready(batch, lambda ds: self._try(position, ds),
                                     lambda d: self._acquire(position, [d], count=False)))
        self.pending = waiting
        self.window.expire()
        if waiting:
            self.wake(self._ready_time(waiting))

    def _try(self, position: int, batch: list[SimDelta]) -> list[SimDelta]:
        """Run the batch if its weights are in place, as the real server's `_run`; returns what waits."""
        if not self._acquire(position, batch):
            return batch
        self._run(position, batch)
        return []

    def _acquire(self, position: int, batch: list[SimDelta], count: bool = True) -> bool:
        """Whether every adapter of the batch has the position's layers in a slot,
        asked as store_delta asks for each layer: pin adapter after adapter,
        stop at the first missing one, then release. (When every adapter's slot
        is already complete, one pass stands for the group's layers.) `count`: as
        `SlotFill.acquire`'s (False: a readiness check)."""
        adapters = list(dict.fromkeys(a for d in batch for a in d.adapters))
        layers = self.layers(position)
        if all(self.fill.complete(a) for a in adapters):
            layers = layers[:1]
            self.fill.counters["slot_hits"] += (len(self.layers(position)) - 1) * len(adapters) * count
        for layer in layers:
            got = []
            try:
                for a in adapters:
                    if self.fill.acquire(a, layer, count) is None:
                        return False
                    got.append(a)
            finally:
                for a in got:
                    self.fill.release(a)
        return True

    def _run(self, position: int, batch: list[SimDelta]) -> None:
        now = self.clock.now()
        layer = self.layers(position)
        stage = layer[0] * self.cfg.pp // self.num_layers
        tokens = sum(d.tokens for d in batch)
        adapters = len({a for d in batch for a in d.adapters})
        start = max(now, self.stage_free[stage])
        busy = 0.0
        for d in batch:
            cost = self.exchange.layer(d.tokens, tokens, adapters, d.base_layer_s)
            busy = cost.busy * len(layer)
            if self.exchange.overlap:
                end = max(start + cost.remote * len(layer), d.arrived + cost.wall * len(layer))
            else:
                end = start + cost.wall * len(layer)
            d.done(end)
        self.stage_free[stage] = start + busy
        self.busy_s += busy
        if self.on_batch is not None:
            self.on_batch(position, batch)
        if self.log is not None:
            self.log.append((now, "batch", position, tuple(d.peer for d in batch),
                             tuple(sorted({a for d in batch for a in d.adapters}))))

    def _ready_time(self, waiting: list[SimDelta]) -> float:
        """When to look again at deltas waiting for weights: the earliest time a
        needed layer arrives, else the next copy landing, else a poll later."""
        now, times = self.clock.now(), []
        for d in waiting:
            need = max(self.layers(d.position)) if self.cfg.layerwise else self.num_layers - 1
            for a in d.adapters:
                if a in self.mover.copies:
                    start, end = self.mover.copies[a]
                    t = start + (end - start) * (need + 1) / self.num_layers if self.cfg.layer_arrival else end
                    if t > now:
                        times.append(t)
        nxt = self.mover.next_finish()
        if nxt is not None and nxt > now:
            times.append(nxt)
        return min(times) if times else now + 5e-4  # the real loop's poll while deltas wait (WEIGHT_POLL_S)

    # -- SlotFill's Loader: modelled copies ------------------------------------

    def available(self, adapter_id: str, layers) -> bool:
        if adapter_id in self.staged:
            return True
        hold = self.holds.bring(adapter_id)
        if hold is not None:
            self.cache.free(hold)
            self.staged.add(adapter_id)
            return True
        if not self.cfg.layer_arrival or adapter_id not in self.holds.holds or adapter_id not in self.mover.copies:
            return False
        start, end = self.mover.copies[adapter_id]
        return self.clock.now() >= start + (end - start) * (max(layers) + 1) / self.num_layers

    def write(self, adapter_id: str, slot: int, layers: set[int]) -> bool:
        return False

    def done(self, adapter_id: str) -> None:
        self.staged.discard(adapter_id)

    def stats(self) -> dict:
        out = dict(self.cache.stats())
        out.update(self.fill.counters)
        out["busy_s"] = self.busy_s
        return out
