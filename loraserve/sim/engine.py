"""The simulated engine: the real Scheduler and TieredCacheManager on a
virtual clock, with a cost model where the model and the copy engine were.

It answers the same calls as LLMEngine (add_request, step, has_unfinished,
idle_tick), so one replay loop drives both.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field

from loraserve.cache.mover import LinkMover
from loraserve.clock import ManualClock
from loraserve.config import CacheConfig, SchedulerConfig
from loraserve.engine.core import EngineCore
from loraserve.engine.output import RequestOutput, make_output
from loraserve.engine.plan import StepPlan
from loraserve.lora.slots import LoraSlots
from loraserve.model.spec import ModelSpec
from loraserve.request import Request
from loraserve.sampling import SamplingParams
from loraserve.sim.cost import StepCost
from loraserve.sim.hardware import Hardware
from loraserve.sim.models import linear_params
from loraserve.sim.paced import NullExecutor, PacedExecutor


@dataclass(frozen=True)
class SimConfig:
    tp: int = 1
    """Tensor-parallel degree: weights, KV and FLOPs split over tp accelerators."""

    dtype_bytes: int = 2
    lora_dtype_bytes: int | None = None
    """Bytes per adapter weight, where adapters are kept at another precision than the model
    (fp32 adapters beside a bf16 model: 4); None: dtype_bytes."""

    mem_util: float = 0.9
    """Share of device memory the engine may use (weights + the device tier), as vLLM's
    gpu_memory_utilization; the device tier gets what the weights leave."""

    max_model_len: int = 8192
    cache: CacheConfig = field(default_factory=CacheConfig)
    """device_bytes is ignored unless device_tier_bytes is set; host_bytes is used as is."""

    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    device_tier_bytes: int | None = None
    """Override the device tier's size (all accelerators together)."""

    lora_eff: float = 1.0
    """Efficiency of the engine's LoRA kernels relative to its base GEMMs (see StepCost)."""

    blocking_loads: bool = False
    """Adapter loads stall the whole instance: vLLM's LoRA manager loads a step's adapters
    inside the step, before its forward pass, so every running request waits for a miss, not
    only its own (S-LoRA as integrated in vLLM, InfiniLoRA's baseline). Modelled as: a step
    starts once every adapter load submitted so far has landed (the same thing where loads
    are only ever made for admitted requests, as under `slora`: no prefetch). False: loads run
    beside the steps and only the request that needs one waits (S-LoRA's and our design)."""


def device_tier_bytes(spec: ModelSpec, hw: Hardware, cfg: SimConfig) -> int:
    """Device memory left for adapters and KV once the weights are in."""
    if cfg.device_tier_bytes is not None:
        return cfg.device_tier_bytes
    dense, expert, experts = linear_params(spec)
    embed = spec.vocab_size * spec.hidden_size * (1 if spec.tie_word_embeddings else 2)
    weights = (dense + expert * experts + embed) * cfg.dtype_bytes
    free = hw.mem_bytes * cfg.tp * cfg.mem_util - weights
    if free <= 0:
        raise ValueError(f"the weights ({weights / 2**30:.1f} GiB) do not fit in {cfg.tp}× {hw.name}")
    return int(free)


class SimEngine(EngineCore):
    """The engine core on a cost model: the executor only advances the clock by
    the modelled step time, and the mover finishes copies when the modelled
    link would have."""

    def __init__(self, spec: ModelSpec, hw: Hardware, cfg: SimConfig, adapters: dict[str, int],
                 clock: ManualClock | None = None, remote: bool = False) -> None:
        """adapters: name → size in bytes (see models.lora_params); a name is its id here.
        remote: a LoRA server holds the adapters (InfiniLoRA): this instance keys KV by
        them but keeps no adapter weights, computes no LoRA and has no adapter budget
        (`sim/cluster.py` prices the deltas)."""
        self.spec = spec
        self.config = cfg
        clock = clock or ManualClock()
        block_bytes = cfg.cache.block_size * spec.kv_bytes_per_token(cfg.dtype_bytes)
        num_blocks = device_tier_bytes(spec, hw, cfg) // block_bytes
        self.adapter_bytes = dict(adapters)
        self.remote = remote
        lora_bytes = (lambda a: 0) if remote else self.adapter_bytes.__getitem__
        self.cost = StepCost(spec, hw, cfg.dtype_bytes, cfg.tp, lora_bytes, cfg.lora_eff, cfg.lora_dtype_bytes)
        super().__init__(cfg.cache, cfg.scheduler, num_blocks, cfg.cache.host_bytes // block_bytes, block_bytes,
                         cfg.max_model_len, clock, LinkMover(clock, duration=self.cost.copy_time),
                         PacedExecutor(NullExecutor(), self, clock),
                         LoraSlots(cfg.scheduler.max_num_seqs if remote else cfg.scheduler.max_loras))
        for name, size in adapters.items():
            if remote:
                self.cache.add_remote_adapter(name)
            else:
                self.cache.add_adapter(name, size)
        self._ids = itertools.count()

    def step_time(self, plan: StepPlan) -> float:
        """The modelled step, after any adapter load it must wait for (`blocking_loads`)."""
        stall = max(0.0, self.mover.loads_done_at - self.clock.now()) if self.config.blocking_loads else 0.0
        return stall + self.cost.step_time(plan)

    def add_request(self, prompt: list[int], sampling: SamplingParams | None = None, adapter: str | None = None,
                    request_id: str | None = None) -> Request:
        sampling = sampling or SamplingParams()
        if adapter is not None and adapter not in self.adapter_bytes:
            raise KeyError(f"no adapter named {adapter!r}")
        self.cache.check_request_size(len(prompt) + sampling.max_tokens)
        req = Request(request_id or f"req-{next(self._ids)}", list(prompt), sampling, adapter=adapter,
                      adapter_name=adapter, arrival_time=self.clock.now())
        self.scheduler.add(req)
        return req

    def step(self) -> list[RequestOutput]:
        """Outputs of the requests this step finished (there is no text to stream)."""
        out = self.run_step()
        done = [r for r in out.failed + out.touched if r.is_finished]
        for r in done:
            self.forget(r)
        return [make_output(r, "", 0) for r in done]
