"""Generations do not depend on block size, chunking, LoRA slot churn or preemption."""

from __future__ import annotations

import pytest

from loraserve import LLM, SamplingParams
from loraserve.config import CacheConfig, SchedulerConfig
from loraserve.lora.adapter import load_adapter
from loraserve.model.spec import ModelSpec

PROMPTS = [list(range(10 + i, 10 + i + n)) for i, n in enumerate([5, 37, 16, 61, 2, 23])]
ADAPTERS = [None, "r4", "r8", "r16", "r8", "r4"]
SP = SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True)


@pytest.fixture(scope="session")
def run(device):
    """Generate PROMPTS under `adapters` on an engine on the test device; (token ids, engine)."""
    def generate(root, adapters=ADAPTERS, **config):
        names = sorted({a for a in adapters if a})
        llm = LLM(str(root / "model"), dtype="float32", adapters={n: str(root / "adapters" / n) for n in names},
                  device=str(device), **config)
        outs = llm.generate(PROMPTS, SP, adapter=adapters)
        return [o.token_ids for o in outs], llm.engine
    return generate


@pytest.fixture(scope="module", params=["llama", "qwen3_moe"])
def setup(request, tiny, run):
    root = tiny(request.param)
    return root, run(root)[0]


@pytest.mark.parametrize("block_size", [1, 4, 32])
def test_block_size_does_not_matter(setup, block_size, run):
    root, expected = setup
    assert run(root, cache=CacheConfig(block_size=block_size))[0] == expected


def test_chunked_prefill_and_small_steps(setup, run):
    root, expected = setup
    got, _ = run(root, scheduler=SchedulerConfig(max_num_batched_tokens=7, max_num_seqs=3))
    assert got == expected


def test_one_lora_slot_churns_but_matches(setup, run):
    root, expected = setup
    got, _ = run(root, scheduler=SchedulerConfig(max_loras=1))
    assert got == expected


def test_preemption_recomputes_identically(setup, run):
    root, _ = setup
    base = [None] * len(PROMPTS)  # no adapters: they could be evicted to make room instead
    expected = run(root, base)[0]
    # 12 blocks of 8 tokens: each request fits alone, all six together do not
    per_token = 2 * 3 * 2 * 16 * 4  # K and V, 3 layers, 2 KV heads, head dim 16, fp32
    got, engine = run(root, base, cache=CacheConfig(block_size=8, device_bytes=12 * 8 * per_token, policy="slora"))
    assert engine.num_blocks == 12
    assert got == expected
    assert engine.cache.usage() == {"used": 0, "free": 12, "total": 12}
    assert engine.scheduler.num_preemptions > 0


def test_adapters_share_a_small_pool_with_kv(setup, run):
    """The pool holds the three adapters plus 12 KV blocks: adapters not in use
    are evicted to make room for KV, and outputs do not change."""
    root, expected = setup
    per_token = 2 * 3 * 2 * 16 * 4
    adapter_blocks = sum(-(-load_adapter(root / "adapters" / n, ModelSpec.from_dir(root / "model"), 64).num_bytes
                           // (8 * per_token)) for n in ("r4", "r8", "r16"))
    for policy in ("elora", "slora", "vllm"):
        cache = CacheConfig(block_size=8, device_bytes=(adapter_blocks + 12) * 8 * per_token, policy=policy,
                            adapter_fraction=0.8)
        assert run(root, cache=cache)[0] == expected
