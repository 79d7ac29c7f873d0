"""The cache policies, as switches over one mechanism.

ELORA and the baselines it is measured against differ in a handful of
decisions, so they are one manager with different switches rather than
separate code paths that could drift apart.
"""

from __future__ import annotations

from dataclasses import dataclass

from loraserve.cache.cost import CostTerms


@dataclass(frozen=True)
class CachePolicy:
    name: str
    unified: bool = True
    """One pool for adapters and KV; False: a static adapter region (`vllm`)."""

    keep_history: bool = True
    """Keep a finished request's KV for later requests (prefix caching)."""

    kv_to_host: bool = True
    """Evicted KV goes to the host tier; False: it is dropped."""

    dependency: bool = True
    """Enforce the tree rules: evict device leaves only, swap in host roots only."""

    swapper: bool = True
    """Run the watermark swapper (prefetch when idle, evict when busy). Without
    it, memory is reclaimed only on demand."""

    terms: CostTerms = CostTerms()


POLICIES: dict[str, CachePolicy] = {p.name: p for p in [
    CachePolicy("elora"),
    CachePolicy("elora-wom", dependency=False),
    CachePolicy("elora-wos", terms=CostTerms(lru=True)),
    CachePolicy("elora-wol", terms=CostTerms(lora=False)),
    CachePolicy("elora-woc", terms=CostTerms(cost=False)),
    CachePolicy("elora-wov", terms=CostTerms(visit=False)),
    CachePolicy("elora-wou", terms=CostTerms(recency=False)),
    # vLLM: LoRA slots in a static share of memory and a prefix cache in the rest,
    # each LRU, each on its own; evicted prefix blocks are gone.
    CachePolicy("vllm", unified=False, kv_to_host=False, dependency=False, swapper=False,
                terms=CostTerms(lru=True)),
    # S-LoRA: unified pool, adapters fetched on demand, KV freed when a request ends.
    CachePolicy("slora", keep_history=False, swapper=False, terms=CostTerms(lru=True)),
]}
