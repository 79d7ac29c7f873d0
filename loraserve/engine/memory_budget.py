"""How much GPU memory the device tier may take.

A fraction of free memory means nothing before the weights are loaded, and
the tier is not the only thing after them: the LoRA bank grows to
max_loras x max_lora_rank (experts included, once an adapter has them), and a
step allocates its activations, LoRA temporaries and logits. So the tier is
sized after loading, from what is free then, less both. Plain arithmetic over
the model's shapes (the bank's layout is `lora/bank.py`'s), plus what a tier
copy stages on the device at once.
"""

from __future__ import annotations

import dataclasses

from loraserve.config import CacheConfig, EngineConfig
from loraserve.engine.tier_memory import COPY_CHUNK_BYTES
from loraserve.model.spec import ModelSpec
from loraserve.model.targets import in_dim, layer_targets, out_dim

HEADROOM = 0.05
"""Share of the rest kept free for the allocator's rounding and fragmentation."""


def bank_bytes(spec: ModelSpec, num_slots: int, rank: int, itemsize: int) -> int:
    """The LoRA bank at `rank` (rounded up to 4, as the bank does), every target allocated."""
    rank = -(-rank // 4) * 4
    total = 0
    for layer in range(spec.num_layers):
        for t in layer_targets(spec, layer):
            lead = spec.num_experts * (num_slots + 1) if t.is_expert else num_slots
            total += lead * rank * (t.width * in_dim(spec, t) + out_dim(spec, t))  # A [in, W r], B [r, out]
    return total * itemsize


def step_bytes(spec: ModelSpec, max_tokens: int, max_seqs: int, lora_rank: int, itemsize: int) -> int:
    """A generous bound on one step's temporaries: a few activations of the widest
    projection per token (MoE: its routed copies), LoRA shrink outputs, and fp32
    logits with the sampler's copies for every sequence."""
    k = max(spec.num_experts_per_tok, 1) if spec.num_experts else 1
    mlp = max(2 * spec.intermediate_size, k * (spec.hidden_size + 2 * (spec.moe_intermediate_size or 0)))
    qkv = spec.q_size + 2 * spec.kv_size
    per_token = 4 * spec.hidden_size + qkv + 3 * mlp + 3 * lora_rank * k
    return max_tokens * per_token * itemsize + 4 * max_seqs * spec.vocab_size * 4


def device_tier_bytes(free_bytes: int, fraction: float, reserved: int) -> int:
    """The tier for `fraction` of `free_bytes` (free after loading), less `reserved` and headroom."""
    return max(0, int((fraction * free_bytes - reserved) * (1 - HEADROOM)))


def sized_cache(config: EngineConfig, spec: ModelSpec, itemsize: int, free_bytes: int) -> CacheConfig:
    """config.cache with its fractional device tier in bytes, given the device's
    free memory once the weights are in: the bank at max_loras x max_lora_rank
    and a step of the scheduler's largest size come off first."""
    sc = config.scheduler
    reserved = (bank_bytes(spec, sc.max_loras, config.max_lora_rank, itemsize)
                + step_bytes(spec, sc.max_num_batched_tokens, sc.max_num_seqs, config.max_lora_rank, itemsize)
                + 2 * COPY_CHUNK_BYTES)  # a tier copy's device temporary, gathered and scattered
    device_bytes = device_tier_bytes(free_bytes, config.cache.device_fraction, reserved)
    return dataclasses.replace(config.cache, device_bytes=max(device_bytes, 1))
