"""The LoRA server's Prometheus metrics (served on `--metrics-port`)."""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from loraserve.model.targets import Target

if TYPE_CHECKING:
    from loraserve.lora_server.server import Delta, LoraServer

SECONDS = (1e-5, 5e-5, 1e-4, 2.5e-4, 5e-4, 1e-3, 2.5e-3, 5e-3, 0.01, 0.025, 0.05, 0.1, 0.25, 1)
COUNTS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 4096)


def layer_class(target: Target) -> str:
    """attention, mlp, shared_expert or experts: how the metrics group projections."""
    if target in (Target.QKV, Target.O):
        return "attention"
    if target.is_expert:
        return "experts"
    return "shared_expert" if target.value.startswith("shared_") else "mlp"


class ServerMetrics:
    def __init__(self, server: LoraServer) -> None:
        self.server = server
        self.registry = r = CollectorRegistry()
        p = "loraserve_lora_server_"
        self.requests = Counter(p + "delta_requests", "Delta requests computed", ["layer_class"], registry=r)
        self.tokens = Counter(p + "delta_tokens", "Rows (tokens, or token-expert pairs) computed", ["layer_class"],
                              registry=r)
        self.batch_instances = Histogram(p + "batch_instances", "Instances whose rows one batched kernel served",
                                         buckets=(1, 2, 3, 4, 6, 8, 16), registry=r)
        self.batch_tokens = Histogram(p + "batch_tokens", "Rows in one batched kernel", buckets=COUNTS, registry=r)
        self.queue = Histogram(p + "queue_seconds", "From a delta's arrival to the start of its kernel",
                               buckets=SECONDS, registry=r)
        self.compute = Histogram(p + "compute_seconds", "One batched kernel", buckets=SECONDS, registry=r)
        self.refused = Counter(p + "refused_messages", "Messages answered with an error", ["status"], registry=r)
        self.cache_bytes = Gauge(p + "cache_bytes", "Adapter bytes by tier", ["tier"], registry=r)
        self.adapters = Gauge(p + "adapters", "Adapters by tier", ["tier"], registry=r)
        self.hit_rate = Gauge(p + "hit_rate", "Lookups that found the adapter in the tier: slot (its layer "
                              "already in a slot, per delta) or device (on the device tier, per load)", ["tier"],
                              registry=r)
        self.loading = Gauge(p + "adapters_loading", "Adapters on their way to the device or into a slot",
                             registry=r)
        self.layers_loaded = Gauge(p + "layers_loaded", "Adapter layers written into slots so far", registry=r)
        self.wire = Gauge(p + "wire_bytes", "Payload bytes received and sent", ["direction"], registry=r)
        self._by_class = {cls: (self.requests.labels(cls), self.tokens.labels(cls))
                          for cls in ("attention", "mlp", "shared_expert", "experts")}
        """Each layer class's counters (a label lookup per delta costs more than the count)."""
        self.max_instances = 0
        """Most instances one batch has served (also in `stats`, for tests and benchmarks)."""
        self._refreshed = 0.0

    def observe_batch(self, target: Target, batch: list[Delta], compute_s: float) -> None:
        now = time.monotonic()
        requests, tokens = self._by_class[layer_class(target)]
        rows = sum(d.x.shape[0] for d in batch)
        instances = len({d.peer for d in batch})
        requests.inc(len(batch))
        tokens.inc(rows)
        self.batch_instances.observe(instances)
        self.batch_tokens.observe(rows)
        self.compute.observe(compute_s)
        for d in batch:
            self.queue.observe(max(0.0, now - compute_s - d.arrived))
        self.max_instances = max(self.max_instances, instances)

    def refresh(self, period: float = 0.5) -> None:
        """Update the gauges from the store, at most once a period."""
        now = time.monotonic()
        if now - self._refreshed < period:
            return
        self._refreshed = now
        st = self.server.store.stats()
        for tier in ("device", "host"):
            self.cache_bytes.labels(tier).set(st.get(f"{tier}_bytes_adapters", 0))
            self.adapters.labels(tier).set(st.get(f"{tier}_adapters", 0))
        self.adapters.labels("slot").set(st["slot_adapters"])
        looked = st["slot_hits"] + st["slot_misses"]
        self.hit_rate.labels("slot").set(st["slot_hits"] / looked if looked else 0.0)
        self.hit_rate.labels("device").set(st["adapter_hit_rate"])
        self.loading.set(len(self.server.store.prefetch) + len(self.server.store.holds))
        self.layers_loaded.set(st["layers_loaded"])
        self.wire.labels("in").set(self.server.sock.bytes_in)
        self.wire.labels("out").set(self.server.sock.bytes_out)

    def snapshot(self) -> dict:
        return {"max_batch_instances": self.max_instances}

    def render(self) -> bytes:
        self.refresh(0)
        return generate_latest(self.registry)
