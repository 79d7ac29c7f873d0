"""Prometheus metrics: per-adapter latencies and counts, engine and cache state."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily

from dataclasses import dataclass
from typing import Callable

from loraserve.engine.async_engine import EngineStats

LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)


class Metrics:
    def __init__(self, stats: Callable[[], EngineStats], info: dict[str, str] | None = None,
                 replicas: Callable[[], ReplicaView] | None = None) -> None:
        """`info`: what the engine runs as (e.g. dtype, device), one labelled gauge of 1.
        `replicas`: a scaled-out endpoint's view of its replicas (`stats` is then their sum)."""
        self.registry = r = CollectorRegistry()
        if info:
            Gauge("loraserve_engine_info", "What the engine computes in (dtype after --dtype auto, device, lora_dtype)",
                  sorted(info), registry=r).labels(**info).set(1)
        self.requests = Counter("loraserve_requests", "Finished requests", ["adapter", "finish_reason"], registry=r)
        self.errors = Counter("loraserve_request_errors", "Requests refused or failed", ["status"], registry=r)
        self.ttft = Histogram("loraserve_time_to_first_token_seconds", "TTFT", ["adapter"],
                              buckets=LATENCY_BUCKETS, registry=r)
        self.tpot = Histogram("loraserve_time_per_output_token_seconds", "Mean time per output token after the first",
                              ["adapter"], buckets=LATENCY_BUCKETS, registry=r)
        self.e2e = Histogram("loraserve_e2e_request_latency_seconds", "End-to-end latency", ["adapter"],
                             buckets=LATENCY_BUCKETS, registry=r)
        self.tokens_in = Counter("loraserve_prompt_tokens", "Prompt tokens", registry=r)
        self.tokens_out = Counter("loraserve_generation_tokens", "Generated tokens", registry=r)
        self.adapter_load = Histogram("loraserve_adapter_load_seconds", "Adapter load time (disk → registry)",
                                      buckets=LATENCY_BUCKETS, registry=r)
        self.in_flight = Gauge("loraserve_requests_in_flight", "Requests accepted and not yet answered", registry=r)
        r.register(_EngineCollector(stats))
        if replicas is not None:
            r.register(_ReplicaCollector(replicas))

    def render(self) -> bytes:
        return generate_latest(self.registry)


@dataclass(frozen=True)
class ReplicaView:
    """What a scaled-out endpoint knows of each replica (by its id)."""

    routed: dict[tuple[str, str], int]
    """(replica, reason) → requests the router sent there for that reason (loraserve.router.REASONS)."""

    stats: dict[str, EngineStats]
    """Each live replica's stats as of the last scrape."""

    pids: dict[str, int]
    """Each live replica's process (where to look when one misbehaves)."""


class _ReplicaCollector:
    """Per replica: routing decisions, and the few series that tell whether
    routing works (its load, its prefix-cache and adapter hits). The unlabelled
    series are the sum over replicas."""

    def __init__(self, view: Callable[[], ReplicaView]) -> None:
        self.view = view

    def collect(self):
        view = self.view()
        yield GaugeMetricFamily("loraserve_replicas", "Replicas the endpoint routes to", value=len(view.stats))
        routed = CounterMetricFamily("loraserve_routed_requests",
                                     "Requests routed to a replica, by why: it held the session's history (session), "
                                     "had the adapter resident (adapter), or neither (load)", labels=["replica", "reason"])
        for (replica, reason), n in sorted(view.routed.items()):
            routed.add_metric([replica, reason], n)
        yield routed
        pids = GaugeMetricFamily("loraserve_replica_pid", "The replica's process id", labels=["replica"])
        for replica, pid in sorted(view.pids.items()):
            pids.add_metric([replica], pid)
        yield pids
        for name, doc, kind, value in [
            ("loraserve_replica_requests_running", "Requests running on the replica", GaugeMetricFamily,
             lambda e: e.running),
            ("loraserve_replica_requests_waiting", "Requests waiting on the replica", GaugeMetricFamily,
             lambda e: e.waiting),
            ("loraserve_replica_adapters_loaded", "Adapters registered on the replica", GaugeMetricFamily,
             lambda e: e.adapters_loaded),
            ("loraserve_replica_prefix_cache_hits", "Prompt tokens whose KV the replica's cache held",
             CounterMetricFamily, lambda e: e.cache.get("kv_hit_tokens", 0)),
            ("loraserve_replica_adapter_cache_hits", "Admissions whose adapter was already on the replica's device",
             CounterMetricFamily, lambda e: e.cache.get("adapter_hits", 0)),
        ]:
            family = kind(name, doc, labels=["replica"])
            for replica, e in sorted(view.stats.items()):
                family.add_metric([replica], value(e))
            yield family


class _EngineCollector:
    """Engine state from the snapshot `stats` returns (the route refreshes it
    on the engine thread before each scrape). Cumulative counts are counters
    (a dashboard rates them, as vLLM's `prefix_cache_queries` / `_hits` in
    tokens); states are gauges; the ratios stay for a glance."""

    def __init__(self, stats: Callable[[], EngineStats]) -> None:
        self.stats = stats

    def collect(self):
        e = self.stats()
        stats = e.cache
        for name, doc, value in [
            ("loraserve_num_requests_running", "Requests running", e.running),
            ("loraserve_num_requests_waiting", "Requests waiting", e.waiting),
            ("loraserve_num_requests_pending", "Requests waiting for their adapter or KV to reach the device",
             e.pending),
            ("loraserve_running_kv_blocks", "KV blocks in running requests' block tables (cached prefixes included)",
             e.running_kv_blocks),
            ("loraserve_adapters_loaded", "Adapters registered", e.adapters_loaded),
            ("loraserve_adapters_on_device", "Adapters resident in the device tier", stats.get("device_adapters", 0)),
            ("loraserve_lora_slots_used", "LoRA slots holding an adapter", e.lora_slots_used),
            ("loraserve_adapter_hit_rate", "Admissions whose adapter was already on the device",
             stats.get("adapter_hit_rate", 0.0)),
            ("loraserve_kv_hit_rate", "Prompt tokens served from cached history KV", stats.get("kv_hit_rate", 0.0)),
            ("loraserve_invalid_kv_fraction", "Device KV blocks whose adapter is not on the device",
             stats.get("invalid_kv_fraction", 0.0)),
            ("loraserve_low_lora", "ELORA's expected number of adapters a batch needs", stats.get("low_lora", 0.0)),
            ("loraserve_lora_bank_bytes", "Adapter weights in this process's LoRA slots (0 with a LoRA server)",
             e.lora_bank_bytes),
        ]:
            yield GaugeMetricFamily(name, doc, value=value)
        for name, doc, value in [
            ("loraserve_prefix_cache_queries", "Prompt tokens looked up in the KV cache (prefix and history)",
             stats.get("prompt_tokens", 0)),
            ("loraserve_prefix_cache_hits", "Prompt tokens whose KV the cache held", stats.get("kv_hit_tokens", 0)),
            ("loraserve_adapter_cache_hits", "Admissions whose adapter was already on the device",
             stats.get("adapter_hits", 0)),
            ("loraserve_adapter_cache_misses", "Admissions that waited for their adapter to reach the device",
             stats.get("adapter_misses", 0)),
            ("loraserve_num_preemptions", "Preemptions", e.preemptions),
            ("loraserve_lora_slot_hits", "Admissions whose adapter was already in a slot", e.lora_slot_hits),
            ("loraserve_lora_slot_loads", "Admissions that loaded their adapter into a slot", e.lora_slot_loads),
            ("loraserve_swap_in_bytes", "Bytes copied to the device tier", stats.get("swap_in_bytes", 0)),
            ("loraserve_swap_out_bytes", "Bytes copied off the device tier", stats.get("swap_out_bytes", 0)),
            ("loraserve_remote_lora_wait_seconds", "Seconds steps waited for the LoRA server's deltas",
             e.remote_lora_wait_s),
            ("loraserve_remote_lora_steps", "Steps that sent deltas to the LoRA server", e.remote_lora_steps),
        ]:
            yield CounterMetricFamily(name, doc, value=value)  # exposed with the _total suffix
        if e.remote_lora_step_waits:
            buckets, total = e.remote_lora_step_waits
            yield HistogramMetricFamily("loraserve_remote_lora_step_wait_seconds",
                                        "Per engine step, seconds waited for the LoRA server's deltas",
                                        buckets=buckets, sum_value=total)
        cache = GaugeMetricFamily("loraserve_cache_bytes", "Tier bytes by kind", labels=["tier", "kind"])
        for tier in ("device", "host"):
            for kind in ("adapters", "history_kv", "running_kv"):
                cache.add_metric([tier, kind], stats.get(f"{tier}_bytes_{kind}", 0))
        cache.add_metric(["device", "free"], stats.get("device_bytes_free", 0))
        yield cache
