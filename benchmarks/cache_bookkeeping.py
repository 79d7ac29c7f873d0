"""Cost of the cache manager's bookkeeping per engine step, at scale.

1,000 adapters and 100,000 cached KV blocks (2,000 conversations of 50 blocks
under Zipf-popular adapters); then steps of a 64-request decode batch with two
new requests admitted per step (each matching a cached conversation), every
request committing a block every 16 tokens, and the swapper running every
100 ms of virtual time (a step = 25 ms; the pool sits between its watermarks).
Then one busy swapper pass that must evict a large share of the pool, timed per
block. Policy only: a manual clock and a link-speed mover, no tensors.

    python benchmarks/cache_bookkeeping.py
"""

from __future__ import annotations

import dataclasses
import json
import random
import statistics
import time
from pathlib import Path

from loraserve.cache import LinkMover, Readiness, TieredCacheManager
from loraserve.clock import ManualClock
from loraserve.config import CacheConfig
from loraserve.request import Request
from loraserve.sampling import SamplingParams

BS = 16
BLOCK_BYTES = 16 * 46080  # SmolLM2 fp32 KV block
ADAPTER_BYTES = 27 * BLOCK_BYTES  # a rank-16 SmolLM2 adapter


def main() -> None:
    rnd = random.Random(0)
    clock = ManualClock()
    cfg = CacheConfig(block_size=BS, swap_interval=0.1)
    cache = TieredCacheManager(cfg, 200_000, 200_000, BLOCK_BYTES, clock, LinkMover(clock, 25e9))
    adapters = [f"lora-{i}" for i in range(1000)]
    for a in adapters:
        cache.add_adapter(a, ADAPTER_BYTES)
    weights = [1 / (i + 1) for i in range(len(adapters))]
    convs = [(rnd.choices(adapters, weights)[0], [rnd.randrange(49000) for _ in range(50 * BS + 1)])
             for _ in range(2000)]
    n = 0

    def admit(adapter: str, tokens: list[int]) -> Request | None:
        nonlocal n
        n += 1
        req = Request(f"r{n}", tokens, SamplingParams(), adapter=adapter)
        while (state := cache.prepare(req)) is Readiness.WAITING:
            clock.advance(0.001)
            cache.poll()
        if state is not Readiness.READY:
            return None
        cache.allocate(req, req.num_tokens - req.num_computed_tokens)
        req.num_computed_tokens = req.num_tokens
        cache.commit(req)
        return req

    for adapter, tokens in convs:  # fill: 100k blocks of history
        req = admit(adapter, tokens)
        cache.free(req)
        clock.advance(0.01)
    filled = sum(1 for node in cache.tree.nodes() if node.kind.value == "kv")

    running = [admit(*rnd.choice(convs)) for _ in range(64)]
    steps = 2000
    # the "model": arriving prompts (a cached conversation plus 40 new tokens) and
    # sampled tokens, drawn up front so the timer sees only the cache manager
    arrivals = []
    for _ in range(2 * steps):
        adapter, tokens = rnd.choice(convs)
        arrivals.append((adapter, tokens[:rnd.randrange(BS, len(tokens))] + [rnd.randrange(49000) for _ in range(40)]))
    sampled = iter([rnd.randrange(49000) for _ in range(70 * steps)])
    step_times = []
    for step in range(steps):
        t0 = time.perf_counter()
        cache.tick(len(running))
        for adapter, tokens in arrivals[2 * step:2 * step + 2]:  # two finish, two new ones join
            cache.free(running.pop(0))
            req = admit(adapter, tokens)
            if req is not None:
                running.append(req)
        for req in running:  # one decode token each
            req.output_token_ids.append(next(sampled))
            if cache.can_allocate(req, 1):
                cache.allocate(req, 1)
                req.num_computed_tokens += 1
                cache.commit(req)
        step_times.append(time.perf_counter() - t0)
        clock.advance(0.025)
    # one busy pass: the high watermark drops under what is resident, so the
    # swapper evicts ~10% of the pool's blocks (history leaves, then adapters)
    before = cache.usage()["used"]
    cache.config = dataclasses.replace(cfg, high_watermark=0.5, target_watermark=0.45, low_watermark=0.4)
    t0 = time.perf_counter()
    cache.swap_pass()
    evict_s = time.perf_counter() - t0
    evicted = cache.counters["swap_out_bytes"] // BLOCK_BYTES
    cache.check()
    ms = sorted(t * 1e3 for t in step_times)
    result = {
        "adapters": len(adapters), "cached_kv_blocks": filled, "batch": 64,
        "step_ms_mean": round(statistics.mean(ms), 3), "step_ms_p50": round(ms[len(ms) // 2], 3),
        "step_ms_p99": round(ms[int(len(ms) * 0.99)], 3),
        "busy_pass_blocks_evicted": evicted, "busy_pass_ms": round(evict_s * 1e3, 1),
        "busy_pass_us_per_block": round(evict_s * 1e6 / max(evicted, 1), 2), "used_before_pass": before,
        "device_adapters": cache.num_loras[cache.tree.root.tier], **{k: v for k, v in cache.stats().items()
                                                                      if k in ("kv_hit_rate", "adapter_hit_rate")},
    }
    print(json.dumps(result, indent=2))
    out = Path(__file__).parent / "results" / "cache_bookkeeping.json"
    out.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
