"""How long a step and a copy take: a roofline over the plan.

A step reads every weight once (MoE: the experts its tokens touch), the KV of
every scheduled sequence and the weights of every adapter in the batch (MoE:
of the experts its tokens touch), and
does 2 FLOPs per weight per token plus attention and LoRA shrink/expand.
Its time is the larger of compute and memory time at the profile's achieved
efficiency, plus fixed costs per step, per sequence and per token, plus the
all-reduces of tensor parallelism. Only sizes and counts go in: the plan's
tokens never matter, so the same model prices the real engine's plans.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from loraserve.cache.mover import CopyJob
from loraserve.engine.plan import StepPlan
from loraserve.model.spec import ModelSpec
from loraserve.sim.hardware import Hardware
from loraserve.model.targets import Target
from loraserve.sim.models import linear_params, lora_params


@dataclass(frozen=True)
class StepWork:
    """What a step does, in the units the hardware is priced in."""

    flops: float
    bytes: float
    num_seqs: int
    num_tokens: int
    comm_bytes: float = 0.0
    """Bytes each accelerator all-reduces (tensor parallelism)."""


class StepCost:
    def __init__(self, spec: ModelSpec, hw: Hardware, dtype_bytes: int = 2, tp: int = 1,
                 lora_bytes: Callable[[str], int] | None = None, lora_eff: float = 1.0,
                 lora_dtype_bytes: int | None = None) -> None:
        self.spec = spec
        self.hw = hw
        self.dtype_bytes = dtype_bytes
        self.tp = tp
        self.lora_bytes = lora_bytes or (lambda adapter: 0)
        """An adapter's size in bytes, by id (its params are bytes / lora_dtype_bytes)."""
        self.lora_dtype_bytes = lora_dtype_bytes or dtype_bytes
        self.lora_eff = lora_eff
        """Efficiency of the LoRA kernels relative to the base GEMMs' (their FLOPs and bytes count 1/lora_eff)."""
        self.dense, self.expert, self.num_experts = linear_params(spec)
        self.head = spec.vocab_size * spec.hidden_size
        self.kv_per_token = spec.kv_bytes_per_token(dtype_bytes)
        experts = frozenset(t for t in Target if t.is_expert)
        self.lora_expert_share = lora_params(spec, 1, experts) / lora_params(spec, 1) if spec.num_experts else 0.0
        """Share of an adapter's weights in per-expert LoRA: a token reads only its top-k experts' part."""

    def work(self, plan: StepPlan) -> StepWork:
        s, d = self.spec, self.dtype_bytes
        tokens = plan.num_tokens
        sampled = sum(1 for q in plan.seqs if q.samples)
        params = self.dense + self.head
        flops = 2.0 * tokens * self.dense + 2.0 * sampled * self.head
        if self.num_experts:
            k, e = s.num_experts_per_tok, self.num_experts
            params += e * (1 - (1 - k / e) ** tokens) * self.expert  # distinct experts touched
            flops += 2.0 * tokens * k * self.expert
        nbytes = params * d
        per_adapter: dict[str, int] = {}
        for q in plan.seqs:
            done, n = q.start, q.num_new_tokens
            flops += 4.0 * s.num_layers * s.q_size * n * (done + (n + 1) / 2)  # QK^T and PV, causal
            nbytes += (done + n) * self.kv_per_token  # read the context, write the new KV
            if q.adapter is not None:
                per_adapter[q.adapter] = per_adapter.get(q.adapter, 0) + n
        for adapter, n in per_adapter.items():
            size, share = self.lora_bytes(adapter), self.lora_expert_share
            read = used = 1.0
            if share:  # per-expert LoRA: the experts its n tokens touch are read, k of them used per token
                k, e = s.num_experts_per_tok, self.num_experts
                read = 1 - share + share * (1 - (1 - k / e) ** n)
                used = 1 - share + share * k / e
            nbytes += size * read / self.lora_eff
            # shrink and expand: 2 FLOPs per weight per token
            flops += 2.0 * n * used * size / self.lora_dtype_bytes / self.lora_eff
        for adapter, _ in plan.lora_loads:  # filling a LoRA slot: a device-to-device copy
            nbytes += 2 * self.lora_bytes(adapter)
        comm = 2 * s.num_layers * tokens * s.hidden_size * d * 2 * (self.tp - 1) / self.tp
        return StepWork(flops / self.tp, nbytes / self.tp, len(plan.seqs), tokens, comm)

    def time(self, w: StepWork) -> float:
        hw = self.hw
        if w.num_tokens == 0:
            return 0.0
        roof = max(w.flops / (hw.flops * hw.flops_eff), w.bytes / (hw.mem_bw * hw.bw_eff))
        comm = 0.0
        if self.tp > 1:
            comm = 2 * self.spec.num_layers * hw.interconnect_latency + w.comm_bytes / hw.interconnect_bw
        return hw.step_overhead + hw.seq_overhead * w.num_seqs + hw.token_overhead * w.num_tokens + roof + comm

    def step_time(self, plan: StepPlan) -> float:
        return self.time(self.work(plan))

    def copy_time(self, job: CopyJob) -> float:
        """One block copy job between tiers (or an adapter read from disk); under
        tensor parallelism each accelerator moves its shard over its own link."""
        hw = self.hw
        bw = hw.disk_bw if job.src_tier == "disk" else hw.pcie_bw
        return hw.pcie_latency + job.num_bytes / self.tp / bw
