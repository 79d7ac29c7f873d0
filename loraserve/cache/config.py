"""The cache's knobs (re-exported by `loraserve.config` beside the engine's),
kept in the cache package so that the cache imports nothing above it."""

from __future__ import annotations

from dataclasses import dataclass

from loraserve.cache.policy import POLICIES


@dataclass(frozen=True)
class CacheConfig:
    block_size: int = 16
    """Tokens per KV block. Smaller blocks waste less on partial blocks and match
    shorter shared prefixes; larger ones mean fewer gather indices per step."""

    device_bytes: int = 512 * 2**20
    """Bytes of the device tier: one pool of equal-size blocks (one KV block
    each) shared by adapter weights and KV. On CPU a preallocated arena stands
    in for accelerator memory."""

    device_fraction: float = 0.0
    """When > 0 (a CUDA device tier given as a fraction, `--device-cache 0.8`):
    the tier is this share of the GPU memory still free once the weights are
    loaded, less what the LoRA bank and a step's temporaries will take
    (`engine/memory_budget.py`); it then replaces device_bytes."""

    host_bytes: int = 2 * 2**30
    """Bytes of the host tier: where adapters wait and evicted history KV goes.
    0: no host tier (adapters come from disk; evicted KV is dropped)."""

    policy: str = "elora"
    """What to keep where: `elora` (unified pool, dependency tree, cost-model
    swapper), its ablations `elora-wom` (no dependency rules), `elora-wos` (LRU
    instead of the cost model), `elora-wol/-woc/-wov/-wou` (one cost term
    removed), and the baselines `vllm` (static adapter fraction, LRU pools) and
    `slora` (unified pool, adapters on demand, no history KV)."""

    adapter_fraction: float = 0.2
    """`vllm` policy only: share of device blocks reserved for adapters."""

    high_watermark: float = 0.8
    """Device use above which the swapper evicts (E-CODE's 80%)."""

    low_watermark: float = 0.6
    """Device use below which the swapper prefetches (E-CODE's 60%)."""

    target_watermark: float = 0.7
    """Where eviction and prefetch stop (E-CODE's 70%)."""

    host_high_watermark: float = 0.8
    """Host use above which cold history KV is dropped, down to host_target_watermark."""

    host_target_watermark: float = 0.7

    evict_batch: float = 0.01
    """On-demand eviction (a full pool, an allocation that cannot wait) frees at
    least this share of the pool at once: choosing victims scores every
    candidate, so doing it block by block would cost a pass over the pool per
    block. 0: exactly what is needed."""

    swap_interval: float = 0.1
    """Seconds between swapper passes (the paper's 100 ms); the engine also runs
    one on an idle timer at this period."""

    prefetch_horizon: float = 0.005
    """Seconds of link time (at link_bytes_per_s) that prefetches may hold queued
    ahead of a copy a request waits for. The link serves copies in order, so an
    unbounded prefetch burst (every host adapter at start-up) makes the first
    cold request wait behind all of it; capped, the rest of the burst goes out
    as earlier copies land, and a demand load waits at most this long, or one
    node's copy. 0: one prefetch at a time, only onto an idle link."""

    window: float = 5.0
    """Seconds of history behind Low_lora (the paper's 5 s)."""

    tau: float = 30.0
    """Time scale of the recency term 1 - sigmoid(t / tau), in seconds. The paper
    leaves it open; 30 s spans a typical gap between chat turns."""

    link_bytes_per_s: float = 16e9
    """Host-to-device bandwidth the cost model prices transfers with (PCIe 4 x16
    class). Only the ratio between nodes matters for ranking; with
    prefetch_horizon it also says how many bytes of prefetch may be queued."""

    def __post_init__(self) -> None:
        if self.block_size < 1 or self.block_size & (self.block_size - 1):
            raise ValueError(f"block_size must be a power of two, got {self.block_size}")
        if self.device_bytes <= 0:
            raise ValueError(f"device_bytes must be positive, got {self.device_bytes}")
        if not 0 <= self.device_fraction < 1:
            raise ValueError(f"device_fraction must be in [0, 1), got {self.device_fraction}")
        if self.host_bytes < 0:
            raise ValueError(f"host_bytes must be >= 0, got {self.host_bytes}")
        if self.policy not in POLICIES:
            raise ValueError(f"cache policy must be one of {', '.join(POLICIES)}; got {self.policy!r}")
        if not 0 < self.adapter_fraction < 1:
            raise ValueError(f"adapter_fraction must be in (0, 1), got {self.adapter_fraction}")
        if not 0 <= self.low_watermark <= self.target_watermark <= self.high_watermark <= 1:
            raise ValueError("watermarks must satisfy 0 <= low <= target <= high <= 1")
        if not 0 <= self.host_target_watermark <= self.host_high_watermark <= 1:
            raise ValueError("host watermarks must satisfy 0 <= target <= high <= 1")
        if self.prefetch_horizon < 0:
            raise ValueError(f"prefetch_horizon must be >= 0, got {self.prefetch_horizon}")
        for name in ("window", "tau", "link_bytes_per_s"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        if not 0 <= self.evict_batch < 1:
            raise ValueError(f"evict_batch must be in [0, 1), got {self.evict_batch}")
        if self.swap_interval < 0:
            raise ValueError(f"swap_interval must be >= 0, got {self.swap_interval}")
