"""Named deployments of InfiniLoRA's comparison, at one GPU budget.

- `slora`: coupled, S-LoRA's unified pool (adapters on demand, no history
  KV). How many adapters one batch may use (`max_loras`, the LoRA slots) is
  what `lora_share` of the memory the weights leave holds: 0.5 by default.
  The paper gives no default split; its "less LoRA" baseline at 40% implies
  more, and 0.5 is our guess.
- `slora-sjf`: the same, admitting shortest jobs first (idealised: it knows
  output lengths).
- `slora-less`: 40% of that memory for adapters in a static region, 60% for
  KV (the `vllm` policy's split; a single-turn workload has no prefix reuse,
  so its LRU prefix cache does not matter).
- `slora-sync`: `slora` with blocking loads (`SimConfig.blocking_loads`): a
  step waits for the adapters it loads, as vLLM's LoRA manager loads them
  inside the step, so one miss stalls every running request of the instance.
- `slora-vllm`: S-LoRA as vLLM integrates it, with vLLM's defaults: blocking
  loads, and a CPU LoRA cache of `max_cpu_loras` = `max_loras` adapters,
  so an adapter that is in neither is read from disk (`Hardware.disk_bw`)
  on its miss. (The host tier is sized for those adapters; S-LoRA keeps no
  history KV, so only a preempted request's KV would have used the rest.)
  The paper's baseline is "S-LoRA integrated in vLLM"; its settings are
  not given, so this is the reading by vLLM's defaults.
- `elora`: coupled with the ELORA cache (cost model, history KV, idle prefetch).
- `disagg`: InfiniLoRA: `server_gpus` for the LoRA server (EP4-PP2 on 8),
  instances on the rest, every optimisation on. The ablation ladder's rungs
  `disagg-naive` (no overlap, whole-adapter loading, generic kernels),
  `disagg+overlap`, `disagg+loading` and `disagg` (+kernel), and variants
  `disagg-pull`, `disagg-nvlink`, `disagg-lru`.
"""

from __future__ import annotations

from dataclasses import replace

from loraserve.config import CacheConfig, SchedulerConfig
from loraserve.model.spec import ModelSpec
from loraserve.sim.cluster import ClusterConfig
from loraserve.sim.engine import SimConfig, device_tier_bytes
from loraserve.sim.hardware import Hardware
from loraserve.sim.lora_server import DisaggConfig

GENERIC_KERNEL_EFF = 0.4
"""Server kernel efficiency before the "+kernel" rung, relative to the profile's: segmented
shrink/expand over many small (adapter, expert) slices reach a fraction of what the paper's
wgmma/TMA kernels do. A modelling assumption, not a measurement."""

ROUTER = "least-loaded"
"""How requests reach instances in InfiniLoRA's comparison: the least loaded one, in every
deployment alike, as its set-up prescribes. (ClusterConfig's default, the affinity router,
is measured on its own in benchmarks/routing_sim.py; under affinity a Zipf-hot adapter's
requests queue on the instances that hold it, which this comparison is not about.)"""

SLORA_LORA_SHARE = 0.5
LESS_LORA_SHARE = 0.4
SCHEDULER = SchedulerConfig(max_num_seqs=128, max_num_batched_tokens=2048, max_loras=8)

COUPLED = ("slora", "slora-sjf", "slora-less", "slora-sync", "slora-vllm", "elora")
LADDER = ("disagg-naive", "disagg+overlap", "disagg+loading", "disagg")
DISAGG = (*LADDER, "disagg-pull", "disagg-nvlink", "disagg-lru")


def lora_slots(spec: ModelSpec, hw: Hardware, gpus: int, adapter_bytes: int, share: float) -> int:
    """Adapters that `share` of an instance's free memory holds (at least one)."""
    free = device_tier_bytes(spec, hw, SimConfig(tp=gpus))
    return max(1, int(share * free // adapter_bytes))


def host_bytes(adapters: int, adapter_bytes: int) -> int:
    """A host tier that holds `adapters` adapters (with room for the blocks they round up to)."""
    return int(adapters * adapter_bytes / 0.75) + (64 << 20) * (adapters + 8)


def deployment(name: str, spec: ModelSpec, hw: Hardware, rank: int, instance_gpus: int, adapter_bytes: int,
               num_adapters: int = 512, total_gpus: int = 16, server_gpus: int = 8, lora_dtype_bytes: int | None = None,
               **disagg) -> ClusterConfig:
    """The ClusterConfig of a named deployment (disagg: DisaggConfig overrides). In
    both kinds every adapter waits in host memory (as S-LoRA keeps them), so a
    miss is a host-to-device copy, not a disk read; except in `slora-vllm`,
    whose host cache holds only `max_loras` adapters (vLLM's default).
    lora_dtype_bytes: bytes per adapter weight, which `adapter_bytes` must have been sized with
    (None: the model's; 4: adapters kept in fp32 beside the bf16 model, what the paper's stated
    adapter size implies)."""
    base = ClusterConfig("coupled", total_gpus, instance_gpus, rank, router=ROUTER)
    if name in COUPLED:
        share = LESS_LORA_SHARE if name == "slora-less" else SLORA_LORA_SHARE
        slots = lora_slots(spec, hw, instance_gpus, adapter_bytes, share)
        policy = {"slora-less": "vllm", "elora": "elora"}.get(name, "slora")
        host = host_bytes(slots if name == "slora-vllm" else num_adapters, adapter_bytes)
        cache = CacheConfig(policy=policy, adapter_fraction=LESS_LORA_SHARE, host_bytes=host)
        sched = replace(SCHEDULER, max_loras=slots, order="sjf" if name == "slora-sjf" else "fcfs")
        # the coupled baselines run generic segmented LoRA kernels, as the ladder's rungs before "+kernel"
        return replace(base, sim=SimConfig(cache=cache, scheduler=sched, lora_eff=GENERIC_KERNEL_EFF,
                                           blocking_loads=name in ("slora-sync", "slora-vllm"),
                                           lora_dtype_bytes=lora_dtype_bytes))
    if name not in DISAGG:
        raise ValueError(f"unknown deployment {name!r}; choose from {', '.join(COUPLED + DISAGG)}")
    ep = 4 if server_gpus % 4 == 0 else server_gpus
    d = DisaggConfig(server_gpus=server_gpus, ep=ep, pp=server_gpus // ep)
    rung = LADDER.index(name) if name in LADDER else len(LADDER) - 1
    d = replace(d, overlap=rung >= 1, layerwise=rung >= 2, layer_arrival=rung >= 2,
                kernel_eff=1.0 if rung >= 3 else GENERIC_KERNEL_EFF)
    if name == "disagg-pull":
        d = replace(d, push=False)
    elif name == "disagg-nvlink":
        d = replace(d, link="nvlink")
    elif name == "disagg-lru":
        d = replace(d, cache_policy="elora-wos")
    d = replace(d, **disagg)
    cache = CacheConfig(policy="slora", host_bytes=0)  # KV only: no adapters, no history KV to keep
    return replace(base, deployment="disagg", sim=SimConfig(cache=cache, scheduler=SCHEDULER,
                                                            lora_dtype_bytes=lora_dtype_bytes), disagg=d)
