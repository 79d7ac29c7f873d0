"""The tiered cache on the real engine: history reuse, adapter isolation, swapping."""

from __future__ import annotations

import pytest

from loraserve import LLM, SamplingParams
from loraserve.config import CacheConfig
from loraserve.lora.adapter import load_adapter
from loraserve.model.spec import ModelSpec
from tests.oracle import greedy

SP = SamplingParams(max_tokens=16, temperature=0.0, ignore_eos=True)
BS = 8
PER_TOKEN = 2 * 3 * 2 * 16 * 4  # tiny models: K and V, 3 layers, 2 KV heads, head dim 16, fp32


@pytest.fixture(scope="session")
def make(device):
    """An engine on the test device with the three adapters, its cache configured by keywords."""
    def build(root, **cache) -> LLM:
        adapters = {n: str(root / "adapters" / n) for n in ("r4", "r8", "r16")}
        return LLM(str(root / "model"), dtype="float32", adapters=adapters,
                   cache=CacheConfig(block_size=BS, **cache), device=str(device))
    return build


def prefilled(llm: LLM, prompt: list[int], adapter: str | None) -> tuple[list[int], int]:
    """Generate; returns (output ids, prompt tokens served from cache)."""
    before = llm.engine.cache.counters["kv_hit_tokens"]
    out = llm.generate([prompt], SP, adapter=adapter, use_tqdm=False)[0]
    return out.token_ids, llm.engine.cache.counters["kv_hit_tokens"] - before


@pytest.mark.parametrize("family", ["llama", "qwen3_moe"])
def test_second_turn_prefills_only_new_tokens_and_matches_oracle(tiny, family, make):
    root = tiny(family)
    llm = make(root)
    turn1 = list(range(40, 77))
    out1, hit1 = prefilled(llm, turn1, "r8")
    assert hit1 == 0
    turn2 = turn1 + out1 + list(range(500, 511))
    out2, hit2 = prefilled(llm, turn2, "r8")
    # everything the first turn computed (its prompt and all but its last output token), in whole blocks
    assert hit2 == (len(turn1) + len(out1) - 1) // BS * BS
    ref, _ = greedy(str(root / "model"), str(root / "adapters" / "r8"), turn2, SP.max_tokens)
    assert out2 == ref
    # the same prompt under another adapter (and the base model) reuses nothing
    for other in ("r4", None):
        out, hit = prefilled(llm, turn2, other)
        assert hit == 0
        assert out == greedy(str(root / "model"), other and str(root / "adapters" / other), turn2, SP.max_tokens)[0]


def conversations(llm: LLM) -> list[list[int]]:
    """Four conversations over three adapters and the base model, three turns each,
    with turns of different conversations interleaved in batches."""
    adapters = ["r4", "r8", "r16", None]
    history = [list(range(10 + 7 * c, 30 + 9 * c)) for c in range(4)]
    outputs = []
    for turn in range(3):
        prompts = [h + list(range(900 + 10 * turn, 905 + 10 * turn)) for h in history]
        outs = llm.generate(prompts, SP, adapter=adapters, use_tqdm=False)
        history = [p + o.token_ids for p, o in zip(prompts, outs)]
        outputs.append([o.token_ids for o in outs])
    return outputs


@pytest.fixture(scope="module")
def uncached(tiny, make):
    return conversations(make(tiny("llama"), policy="slora"))


@pytest.mark.parametrize("policy", ["elora", "vllm", "elora-wom", "elora-wos"])
def test_outputs_identical_with_caching_on_and_off(tiny, uncached, policy, make):
    llm = make(tiny("llama"), policy=policy)
    assert conversations(llm) == uncached
    assert llm.engine.cache.counters["kv_hit_tokens"] > 0
    llm.engine.cache.check()


def test_outputs_identical_under_heavy_swapping(tiny, uncached, make):
    """A device pool that holds the largest adapter and a few KV blocks, a small
    host tier, a swapper running every step with low watermarks: adapters and
    history move back and forth all the time, and nothing changes the tokens."""
    root = tiny("llama")
    spec = ModelSpec.from_dir(root / "model")
    largest = -(-load_adapter(root / "adapters" / "r16", spec, 64).num_bytes // (BS * PER_TOKEN))
    llm = make(root, device_bytes=(largest + 16) * BS * PER_TOKEN, host_bytes=(2 * largest + 20) * BS * PER_TOKEN,
               swap_interval=0.0, high_watermark=0.5, target_watermark=0.4, low_watermark=0.3)
    assert conversations(llm) == uncached
    c = llm.engine.cache.counters
    assert c["swap_out_bytes"] > 0 and c["swap_in_bytes"] > 0 and c["adapter_misses"] > 0
    llm.engine.cache.check()
