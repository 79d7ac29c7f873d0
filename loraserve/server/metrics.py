"""Prometheus metrics: per-adapter latencies and counts, engine and cache state."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily

from loraserve.engine.llm_engine import LLMEngine

LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)


class Metrics:
    def __init__(self, engine: LLMEngine) -> None:
        self.registry = r = CollectorRegistry()
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
        r.register(_EngineCollector(engine))

    def render(self) -> bytes:
        return generate_latest(self.registry)


class _EngineCollector:
    """Engine state read at scrape time (lengths and counters: safe to read racily)."""

    def __init__(self, engine: LLMEngine) -> None:
        self.engine = engine

    def collect(self):
        e = self.engine
        usage = e.cache.usage()
        block_bytes = e.config.cache.block_size * e.spec.kv_bytes_per_token(e.model.dtype.itemsize)
        for name, doc, value in [
            ("loraserve_num_requests_running", "Requests running", len(e.scheduler.running)),
            ("loraserve_num_requests_waiting", "Requests waiting", len(e.scheduler.waiting)),
            ("loraserve_num_preemptions", "Preemptions so far", e.scheduler.num_preemptions),
            ("loraserve_kv_blocks_used", "KV blocks in use", usage["used"]),
            ("loraserve_kv_blocks_total", "KV blocks in the device tier", usage["total"]),
            ("loraserve_adapters_loaded", "Adapters registered", len(e.adapters.by_id)),
            ("loraserve_lora_slots_used", "LoRA slots holding an adapter", len(e.slots.resident())),
            ("loraserve_lora_slot_hits", "Admissions whose adapter was already in a slot", e.scheduler.num_lora_hits),
            ("loraserve_lora_slot_loads", "Admissions that loaded their adapter into a slot",
             e.scheduler.num_lora_loads),
            ("loraserve_swap_in_bytes", "Adapter bytes copied host to device", e.executor.bytes_swapped_in),
        ]:
            yield GaugeMetricFamily(name, doc, value=value)
        cache = GaugeMetricFamily("loraserve_cache_bytes", "Device bytes by kind", labels=["tier", "kind"])
        cache.add_metric(["device", "running_kv"], usage["used"] * block_bytes)
        cache.add_metric(["device", "free_kv"], usage["free"] * block_bytes)
        cache.add_metric(["device", "adapters"], e.executor.bank.num_bytes)
        cache.add_metric(["host", "adapters"], sum(a.num_bytes for a in e.adapters.by_id.values()))
        yield cache
