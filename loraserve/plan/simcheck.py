"""The planner checked against the cluster simulator (issue 15): the planned
cache meets the P95 TTFT SLO at the planned rate, and a cache 20% smaller
does not.

The check only separates where a miss cannot make the SLO: with layer-wise
loading from host memory over the server's 8 PCIe links a Mixtral miss costs
~5 ms, so a smaller cache moves the hit rate and not P95 TTFT. Here loads are
whole-adapter (no layer-wise loading) and slow: adapters are read from one
NVMe SSD per server node (~3 GB/s, PCIe 4), the 8-GPU server on 2 nodes, so
6 GB/s in all, 0.75 GB/s per GPU's shard, and a 1.9 GB Mixtral adapter
arrives 0.32 s after its miss.

The simulated server keeps an adapter in one of its compute slots
(`max_loras`, LRU) once loaded, beside its cache's device tier, and does not
count the slots' memory: with the deployment's 512 slots every adapter ever
used stays, and `server_cache_bytes` bounds nothing. So the check splits the
planned bytes: one adapter's worth of device tier to stage a load, and as
many slots as the rest holds. The planner then sizes with
`cache_model="lru"` (Che's approximation): the slots are an LRU cache, not a
pinned set.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from loraserve.bench.metrics import SLO
from loraserve.plan.provision import Plan, PlanInput, provision
from loraserve.sim.cluster import simulate_cluster
from loraserve.sim.deployments import deployment
from loraserve.sim.hardware import hardware
from loraserve.sim.lora_server import BLOCK_BYTES
from loraserve.sim.models import INFINILORA_MODELS, model_spec
from loraserve.sim.run import adapter_sizes
from loraserve.workload import WorkloadConfig, generate
from loraserve.workload.arrivals import ArrivalConfig
from loraserve.workload.popularity import PopularityConfig
from loraserve.workload.workload import Lengths

NVME_BW = 3e9
"""Sequential read of one PCIe 4 NVMe SSD, bytes/s: where the adapters wait in this setting."""


@dataclass(frozen=True)
class SimCheck:
    model: str = "mixtral-8x7b"
    adapters: int = 16
    zipf: float = 1.2
    rate: float = 2.0
    """Requests/s planned for and simulated (low: see `check`)."""

    requests: int = 600
    input_len: int = 512
    output_len: int = 32
    """Fixed lengths: TTFT is what is checked, and short outputs keep the run short."""

    hardware: str = "h20"
    server_gpus: int = 8
    """The paper's EP4-PP2 LoRA server; instances on the other 8 of 16 GPUs."""

    load_bw: float | None = NVME_BW * 2 / 8
    """Bytes/s of each server GPU's loads: one NVMe SSD per node shared by its 4 GPUs (2 nodes); None:
    the profile's PCIe (host memory, pinned)."""

    layerwise: bool = False
    cache_model: str = "lru"
    slo_ttft: float = 0.25
    slo_tpot: float = 0.1
    warmup: float = 0.25
    """Share of the first arrivals left out of the summary (the slots start empty)."""

    lead_in: float = 20.0
    seed: int = 1


def plan_of(c: SimCheck) -> Plan:
    """The planner's answer for the check's setting: loads over the simulated server's links."""
    d = INFINILORA_MODELS[c.model]
    return provision(PlanInput(c.model, adapters=c.adapters, zipf=c.zipf, rate=c.rate, slo_ttft=c.slo_ttft,
                               slo_tpot=c.slo_tpot, hardware=c.hardware, rank=d.rank, mean_input=c.input_len,
                               mean_output=c.output_len, cache_model=c.cache_model, layerwise=c.layerwise,
                               load_bw=c.load_bw, load_links=c.server_gpus))


def simulate(c: SimCheck, cache_bytes: int) -> dict:
    """P95 TTFT (excluding prefill, the paper's) of `disagg` with `cache_bytes` of adapter memory
    on the server: one adapter's device tier to stage loads, the rest as compute slots."""
    d = INFINILORA_MODELS[c.model]
    spec = model_spec(c.model)
    hw = hardware(c.hardware)
    if c.load_bw is not None:
        hw = replace(hw, name=f"{hw.name}-loads-{c.load_bw / 1e9:g}GBps", pcie_bw=c.load_bw)
    wl = generate(WorkloadConfig(num_sessions=c.requests, num_adapters=c.adapters,
                                 arrival=ArrivalConfig("poisson", c.rate),
                                 popularity=PopularityConfig("zipf", s=c.zipf),
                                 first_input=Lengths(c.input_len), input=Lengths(c.input_len),
                                 output=Lengths(c.output_len), seed=c.seed))
    sizes = adapter_sizes(wl.adapters, spec, d.rank)
    size = max(sizes.values())
    staging = (size // BLOCK_BYTES + 2) * BLOCK_BYTES  # one adapter, rounded up to whole blocks (< 32 MiB over)
    slots = max(1, cache_bytes // size - 1)
    cfg = deployment("disagg", spec, hw, d.rank, d.gpus, size, len(sizes), server_gpus=c.server_gpus,
                     server_cache_bytes=staging, max_loras=slots, layerwise=c.layerwise,
                     layer_arrival=c.layerwise)
    slo = SLO(c.slo_ttft, c.slo_tpot)
    res = simulate_cluster(wl, spec, hw, cfg, sizes, slo, c.warmup, c.lead_in)
    s = res.summary
    late = sum(r.ttft > c.slo_ttft for r in res.queue_records)
    return {"cache_bytes": cache_bytes, "slots": slots, "p95_ttft": s["ttft_s"]["p95"], "meets": s["meets_slo"],
            "late_share": late / max(1, len(res.queue_records)), "mean_tpot": s["tpot_s"]["mean"],
            "slot_misses": res.stats["server"]["slot_misses"], "wall_s": round(res.wall_s, 2)}


def check(c: SimCheck, scales: tuple[float, ...] = (1.0, 0.8)) -> dict:
    """The plan, and the simulation at each share of its cache_bytes. A slow miss stalls the
    step of the instance whose request needs it (its delta needs every row), which the
    planner does not model: so the check runs at a low rate, where few requests share an
    instance's batch with a miss."""
    p = plan_of(c)
    plan = {k: getattr(p, k) for k in ("cache_bytes", "cache_adapters", "resident_adapters", "working_adapters",
                                      "server_gpus", "iar", "required_iar", "miss_delay_s", "load_utilisation")}
    return {"setting": c.__dict__.copy(), "plan": plan,
            "runs": {f"{scale:g}": simulate(c, int(p.cache_bytes * scale)) for scale in scales}}
