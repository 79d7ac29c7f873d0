"""Generations do not depend on block size, chunking, LoRA slot churn or preemption."""

from __future__ import annotations

import pytest

from loraserve import LLM, SamplingParams
from loraserve.config import CacheConfig, SchedulerConfig

PROMPTS = [list(range(10 + i, 10 + i + n)) for i, n in enumerate([5, 37, 16, 61, 2, 23])]
ADAPTERS = [None, "r4", "r8", "r16", "r8", "r4"]
SP = SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True)


def run(root, **config):
    llm = LLM(str(root / "model"), adapters={n: str(root / "adapters" / n) for n in ("r4", "r8", "r16")}, **config)
    outs = llm.generate(PROMPTS, SP, adapter=ADAPTERS)
    return [o.token_ids for o in outs], llm.engine


@pytest.fixture(scope="module", params=["llama", "qwen3_moe"])
def setup(request, tiny):
    root = tiny(request.param)
    return root, run(root)[0]


@pytest.mark.parametrize("block_size", [1, 4, 32])
def test_block_size_does_not_matter(setup, block_size):
    root, expected = setup
    assert run(root, cache=CacheConfig(block_size=block_size))[0] == expected


def test_chunked_prefill_and_small_steps(setup):
    root, expected = setup
    got, _ = run(root, scheduler=SchedulerConfig(max_num_batched_tokens=7, max_num_seqs=3))
    assert got == expected


def test_one_lora_slot_churns_but_matches(setup):
    root, expected = setup
    got, _ = run(root, scheduler=SchedulerConfig(max_loras=1))
    assert got == expected


def test_preemption_recomputes_identically(setup):
    root, expected = setup
    # 12 blocks of 8 tokens: each request fits alone, all six together do not
    per_token = 2 * 3 * 2 * 16 * 4  # K and V, 3 layers, 2 KV heads, head dim 16, fp32
    got, engine = run(root, cache=CacheConfig(block_size=8, kv_cache_bytes=12 * 8 * per_token))
    assert engine.num_blocks == 12
    assert got == expected
    assert engine.cache.usage() == {"used": 0, "free": 12, "total": 12}
    assert engine.scheduler.num_preemptions > 0
