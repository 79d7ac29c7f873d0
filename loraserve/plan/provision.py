"""`provision`: from demand, adapter sizes, load times, rate and SLO to the
LoRA server's cache and GPU count. A reconstruction of InfiniLoRA's
SLO-driven provisioning (its formulas are not published); the README's
"Provisioning (loraserve plan)" writes the model out.

The steps: the TTFT SLO and the instances' queueing give the IAR a
q-quantile needs (`admission.required_iar`); a knapsack over adapter sizes
gives the smallest cache whose IAR meets it (`capacity`); the cache plus the
slots of misses in flight, over usable memory per GPU, give GPUs for the
cache; the deltas' roofline and link traffic give GPUs for compute and
bandwidth (`server`). Loads spread over the server's GPUs, so the cache
depends on the GPU count: the plan is the fewest GPUs g that need no more
than g.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field

from loraserve.engine.plan import ScheduledSeq, StepPlan
from loraserve.model.spec import ModelSpec
from loraserve.plan.admission import Loading, LoadQueue, che_residency, erlang_c_wait_within, iar, required_iar
from loraserve.plan.capacity import Knapsack, smallest, smallest_lru
from loraserve.plan.popularity import Demand, from_workload, read_workload, zipf
from loraserve.plan.server import Traffic, server_need
from loraserve.plan.working import absorb_hot, memory, presence
from loraserve.sim.cost import StepCost
from loraserve.sim.hardware import Hardware, hardware
from loraserve.sim.models import lora_params, model_spec
from loraserve.workload import WorkloadConfig

CACHE_MODELS = ("static", "lru")
GB = 1e9


@dataclass(frozen=True)
class PlanInput:
    model: str
    """Model preset (or model directory) the adapters are for."""

    adapters: int | None = None
    """Adapters served (default: the workload's)."""

    zipf: float | None = None
    """Exponent s of the adapters' Zipf popularity (without a workload)."""

    workload: str | None = None
    """Workload or trace file: popularity, rate and lengths are read from it."""

    fit_zipf: bool = False
    """With a workload: fit a Zipf law to its counts instead of using the shares as they are."""

    rate: float | None = None
    """Requests per second to plan for (default: the workload's)."""

    slo_ttft: float = 0.25
    """TTFT SLO in seconds, on the `quantile`."""

    slo_tpot: float = 0.1
    """Mean TPOT SLO in seconds."""

    quantile: float = 0.95
    """Which quantile of TTFT the SLO bounds (0.95: P95)."""

    hardware: str = "h20"
    """GPU profile of the server and the instances (h20: a 96 GB Hopper part, like the paper's unnamed GPU)."""

    rank: int = 64
    """Rank of every adapter (LoRA on every projection, each expert's included)."""

    dtype_bytes: int = 2
    """Bytes per model weight and activation element (2: bf16)."""

    lora_dtype_bytes: int | None = None
    """Bytes per adapter weight (None: dtype_bytes; 4: adapters kept in fp32, as InfiniLoRA's stated sizes imply)."""

    adapter_bytes: tuple[int, ...] | None = None
    """Per-adapter sizes in bytes, most popular first (overrides `rank`: mixed sizes)."""

    mean_input: float | None = None
    """Mean prompt tokens (default: the workload's, else WorkloadConfig's)."""

    mean_output: float | None = None
    """Mean output tokens (default: the workload's, else WorkloadConfig's)."""

    cache_model: str = "static"
    """static: the most valuable adapters pinned (the DP's set); lru: Che's approximation."""

    layerwise: bool = True
    """Let a miss start once its first layer is in (off: the whole adapter first)."""

    load_bw: float | None = None
    """Host → device bytes/s of one server GPU (default: the profile's PCIe)."""

    load_latency_s: float | None = None
    """Fixed cost of a load (default: the profile's PCIe latency)."""

    load_s: float | None = None
    """Time to load the largest adapter over one link: sets load_bw (and latency 0)."""

    load_links: int = 0
    """Links a load spreads over; 0: every server GPU (each loads its shard)."""

    instances: int = 0
    """Base-model instances, for the queueing slack of hits (0: no instance queueing)."""

    instance_gpus: int = 1
    """GPUs (tensor parallel) of one instance: prices its prefill per layer."""

    ttft_includes_prefill: bool = False
    """Whether TTFT counts the prefill (the paper's does not)."""

    link_bw: float = 50 * GB
    """Bytes/s of each server GPU's link to the instances (400 Gb/s InfiniBand, the paper's)."""

    mem_util: float = 0.9
    """Share of a server GPU's memory for adapters (the rest: activations, workspace)."""

    max_util: float = 0.8
    """Utilisation ceiling of the server's compute and links."""


@dataclass
class Plan:
    cache_bytes: int
    """The server's adapter memory: the resident set plus the working slots."""

    cache_adapters: int
    """Resident adapters plus working slots."""

    resident_bytes: int
    """Bytes of the planned resident set (static) or of the LRU cache."""

    resident_adapters: int
    """Adapters in that set (LRU: how many Che's approximation expects resident)."""

    server_gpus: int
    iar: float
    required_iar: float
    gpus_for_cache: int
    gpus_for_compute: int
    gpus_for_bandwidth: int
    working_adapters: int
    """Slots for the misses being served at once, beyond the resident set: the
    `quantile` of their count (each held while its request is in flight)."""

    working_bytes: int
    rate: float
    """The request rate planned for (requests/s)."""

    num_adapters: int
    zipf_s: float | None
    hit_on_time: float
    """P(a hit's TTFT meets the SLO): instance queueing."""

    miss_delay_s: float
    """Δ of the largest adapter: its first token's delay on a miss, over free links."""

    layer_compute_s: float
    load_links: int
    load_utilisation: float
    flops_per_s: float
    weight_bytes_per_s: float
    link_bytes_per_s: float
    resident: list[str] = field(default_factory=list)
    """Adapters the static plan keeps resident (empty for LRU)."""

    residency: dict[str, float] = field(default_factory=dict)
    """P(resident on arrival) per adapter: 1/0 static, Che's for LRU."""

    assumptions: list[str] = field(default_factory=list)

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)


def demand_of(inp: PlanInput) -> Demand:
    if inp.workload is not None:
        if inp.zipf is not None:
            raise ValueError("give --zipf S or --workload FILE (with --fit-zipf to fit S), not both")
        return from_workload(read_workload(inp.workload), inp.fit_zipf, inp.adapters)
    if inp.zipf is None or inp.adapters is None:
        raise ValueError("give --adapters N and --zipf S, or --workload FILE")
    return zipf(inp.adapters, inp.zipf)


def prefill_s(spec: ModelSpec, hw: Hardware, tokens: int, tp: int, dtype_bytes: int) -> float:
    """One prompt's prefill on an instance, priced by the simulator's step cost."""
    seq = ScheduledSeq("plan", [0] * max(1, tokens), 0, [], None, None)
    return StepCost(spec, hw, dtype_bytes, tp).step_time(StepPlan([seq]))


def provision(inp: PlanInput) -> Plan:
    """The plan: see the module docstring; raises ValueError when no cache and
    GPU count meet the SLO at this rate."""
    check(inp)
    spec, hw, demand = model_spec(inp.model), hardware(inp.hardware), demand_of(inp)
    n = len(demand.probs)
    rate = inp.rate if inp.rate is not None else demand.request_rate
    if rate is None:
        raise ValueError("give --rate (requests/s) or a --workload to read it from")
    if rate <= 0:
        raise ValueError(f"the rate must be positive, got {rate}")
    lora_bytes = inp.lora_dtype_bytes or inp.dtype_bytes
    sizes = list(inp.adapter_bytes) if inp.adapter_bytes else [lora_params(spec, inp.rank) * lora_bytes] * n
    if len(sizes) != n:
        raise ValueError(f"{len(sizes)} adapter sizes for {n} adapters")
    defaults = WorkloadConfig()
    mean_in = inp.mean_input or demand.mean_input or defaults.first_input.mean
    mean_out = inp.mean_output or demand.mean_output or defaults.output.mean
    prefill = prefill_s(spec, hw, round(mean_in), inp.instance_gpus, inp.dtype_bytes)
    tau = prefill / spec.num_layers if inp.layerwise else 0.0
    budget = inp.slo_ttft - (prefill if inp.ttft_includes_prefill else 0.0)
    hit_ok = 1.0 if not inp.instances else erlang_c_wait_within(budget, inp.instances, rate, prefill)
    if budget <= 0:
        raise ValueError(f"the prefill alone ({prefill:.3g}s) takes the whole TTFT SLO of {inp.slo_ttft}s")
    need_iar = required_iar(inp.quantile, hit_ok)
    if need_iar > 1:
        raise ValueError(f"no cache meets P{100 * inp.quantile:g} TTFT <= {inp.slo_ttft}s at {rate:g} req/s: "
                         f"only {hit_ok:.3f} of requests get through the instances' queue in time")
    latency = 0.0 if inp.load_s else (inp.load_latency_s if inp.load_latency_s is not None else hw.pcie_latency)
    bw = max(sizes) / inp.load_s if inp.load_s else (inp.load_bw or hw.pcie_bw)
    traffic = Traffic(rate, mean_in, mean_out, inp.slo_tpot)
    server = server_need(spec, hw, inp.dtype_bytes, lora_bytes, demand.probs, sizes, traffic, inp.link_bw,
                         inp.max_util)
    knapsack = Knapsack.build(demand.probs, sizes) if inp.cache_model == "static" else None
    in_flight = rate * (inp.slo_ttft + mean_out * inp.slo_tpot)
    usable = hw.mem_bytes * inp.mem_util
    present = presence(demand.probs, in_flight)
    floor = max(server.gpus_for_compute, server.gpus_for_bandwidth)  # no g below it can be enough
    for links in range(floor, 4097) if not inp.load_links else [inp.load_links]:
        load = Loading(spec.num_layers, bw, latency, tau, links)
        residency = _cache(inp, demand.probs, sizes, rate, budget, load, need_iar, knapsack)
        if residency is None:
            if inp.load_links or links == 4096:
                raise ValueError(f"even every adapter resident does not reach the required IAR {need_iar:.3f}")
            continue
        if knapsack is not None:
            residency = absorb_hot(residency, sizes, present, inp.quantile)
        mem = memory(residency, sizes, present, inp.quantile)
        for_cache = max(1, math.ceil(mem.total / usable - 1e-9))
        gpus = max(for_cache, server.gpus_for_compute, server.gpus_for_bandwidth)
        if inp.load_links or gpus <= links:
            break
    else:
        raise ValueError("no GPU count up to 4096 holds the cache this plan needs")
    queue = LoadQueue.of(demand.probs, sizes, residency, rate, load)
    resident = [demand.names[i] for i, r in enumerate(residency) if r == 1.0] if knapsack else []
    resident_adapters = len(resident) if knapsack else round(sum(residency))
    return Plan(
        cache_bytes=mem.total, cache_adapters=resident_adapters + mem.working, resident_bytes=mem.resident_bytes,
        resident_adapters=resident_adapters,
        server_gpus=gpus if inp.load_links else links,
        iar=iar(demand.probs, sizes, residency, rate, budget, load), required_iar=need_iar,
        gpus_for_cache=for_cache, gpus_for_compute=server.gpus_for_compute,
        gpus_for_bandwidth=server.gpus_for_bandwidth, working_adapters=mem.working, working_bytes=mem.working_bytes,
        rate=rate, num_adapters=n, zipf_s=demand.zipf_s, hit_on_time=hit_ok,
        miss_delay_s=load.miss_delay(max(sizes)), layer_compute_s=tau, load_links=load.links,
        load_utilisation=queue.rho, flops_per_s=server.flops_per_s, weight_bytes_per_s=server.weight_bytes_per_s,
        link_bytes_per_s=server.link_bytes_per_s, resident=resident,
        residency=dict(zip(demand.names, residency)), assumptions=assumptions(inp, in_flight))


def _cache(inp: PlanInput, probs: list[float], sizes: list[int], rate: float, budget: float, load: Loading,
           need: float, knapsack: Knapsack | None) -> list[float] | None:
    """Residency per adapter of the smallest cache whose IAR meets `need`."""
    def meets(residency: list[float]) -> bool:
        return iar(probs, sizes, residency, rate, budget, load) >= need - 1e-9

    if knapsack is not None:
        members = smallest(knapsack, lambda m: meets(_indicator(m, len(probs))))
        return None if members is None else _indicator(members, len(probs))
    unit = math.gcd(*sizes)
    capacity = smallest_lru(sum(sizes), lambda c: meets(che_residency(probs, sizes, c)), unit)
    return None if capacity is None else che_residency(probs, sizes, capacity)


def _indicator(members: list[int], n: int) -> list[float]:
    out = [0.0] * n
    for i in members:
        out[i] = 1.0
    return out


def check(inp: PlanInput) -> None:
    """Refuse inputs no plan can be made of, with the flag's name in the message."""
    if inp.cache_model not in CACHE_MODELS:
        raise ValueError(f"unknown cache model {inp.cache_model!r}: one of {', '.join(CACHE_MODELS)}")
    positive = {"--slo-ttft": inp.slo_ttft, "--slo-tpot": inp.slo_tpot, "--rank": inp.rank,
                "--dtype-bytes": inp.dtype_bytes, "--link-bw": inp.link_bw, "--instance-gpus": inp.instance_gpus}
    for flag, value in positive.items():
        if not value > 0:
            raise ValueError(f"{flag} must be positive, got {value}")
    optional = {"--load-bw": inp.load_bw, "--load-s": inp.load_s, "--lora-dtype-bytes": inp.lora_dtype_bytes}
    for flag, value in optional.items():
        if value is not None and not value > 0:
            raise ValueError(f"{flag} must be positive, got {value}")
    if inp.adapters is not None and inp.adapters < 1:
        raise ValueError(f"--adapters must be at least 1, got {inp.adapters}")
    if inp.instances < 0 or inp.load_links < 0:
        raise ValueError("--instances and --load-links must be >= 0")
    if not 0 < inp.mem_util <= 1 or not 0 < inp.max_util <= 1:
        raise ValueError("--mem-util and --max-util must be in (0, 1]")


def assumptions(inp: PlanInput, in_flight: float) -> list[str]:
    """What the plan takes for granted, in words (printed with it)."""
    out = ["a reconstruction of InfiniLoRA's SLO-driven provisioning: the paper's formulas are not published",
           "requests pick adapters independently (no bursts of one adapter, no shifting popularity)",
           f"a request that is not immediately admissible misses the P{100 * inp.quantile:g} TTFT SLO",
           "misses queue for the host-to-device links as an M/G/1 queue with an exponential waiting tail",
           f"{in_flight:.3g} requests in flight (rate x (TTFT SLO + mean output x TPOT SLO))",
           "decode steps reach the server once per TPOT SLO, all instances' steps batched together"]
    if inp.cache_model == "static":
        out.append("the cache pins the planned resident set (most requests per byte, by the DP)")
    else:
        out.append("the cache is LRU (Che's approximation, sizes in bytes)")
    out.append("hits wait in an M/M/c queue of instance prefills" if inp.instances
               else "no instance queueing (give --instances for the queueing slack)")
    out.append("TTFT includes the prefill" if inp.ttft_includes_prefill else "TTFT excludes the prefill (the paper's)")
    return out
