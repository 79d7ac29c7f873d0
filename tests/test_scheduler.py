"""The scheduling policy on its own: pure Python, a manual clock, no model."""

from __future__ import annotations

import subprocess
import sys

from loraserve.cache import LinkMover, TieredCacheManager
from loraserve.clock import ManualClock
from loraserve.config import CacheConfig, SchedulerConfig
from loraserve.engine.plan import SampledToken, StepResult
from loraserve.engine.scheduler import Scheduler
from loraserve.lora.slots import LoraSlots
from loraserve.request import Request
from loraserve.sampling import SamplingParams


def make(num_blocks=16, block_size=4, policy="slora", **cfg):
    """slora keeps no history, so block counts below are the running requests' alone."""
    clock = ManualClock()
    cache = TieredCacheManager(CacheConfig(block_size=block_size, policy=policy), num_blocks, 64, 100, clock,
                               LinkMover(clock, bytes_per_s=1e9))
    for adapter in ("A", "B"):
        cache.add_adapter(adapter, 100)  # one block each, on the host tier
    return Scheduler(SchedulerConfig(**cfg), cache, LoraSlots(cfg.get("max_loras", 8)), clock, 10_000)


def req(rid, n_prompt, max_tokens=4, adapter=None):
    return Request(rid, list(range(n_prompt)), SamplingParams(max_tokens=max_tokens), adapter=adapter)


def step(s: Scheduler):
    """Schedule, 'execute' by sampling token 1 for every finishing seq, update; a step takes 1 ms."""
    plan = s.schedule()
    result = StepResult({q.request_id: SampledToken(1) for q in plan.seqs if q.samples})
    s.update(plan, result)
    s.clock.advance(0.001)
    s.cache.check()
    usage = s.cache.usage()
    assert usage["used"] + usage["free"] == usage["total"]
    adapters = {r.adapter for r in s.running + s.pending if r.adapter} | {
        n.key for n in s.cache.tree.adapters.values() if n.tier.value == "device" and n.num_blocks}
    assert usage["used"] == sum(len(r.block_ids) for r in s.running) + len(adapters)
    return plan


def test_token_budget_chunks_prefill_and_mixes_decodes():
    s = make(max_num_batched_tokens=8)
    s.add(req("a", 3))
    step(s)  # a prefilled (3 tokens) and sampled
    s.add(req("b", 20))
    plan = step(s)
    assert [(q.request_id, q.num_new_tokens) for q in plan.seqs] == [("a", 1), ("b", 7)]
    assert not plan.seqs[1].samples  # b's prefill continues next step


def test_seat_limit():
    s = make(max_num_seqs=2)
    for i in range(3):
        s.add(req(str(i), 2))
    plan = step(s)
    assert [q.request_id for q in plan.seqs] == ["0", "1"]
    assert [r.request_id for r in s.waiting] == ["2"]


def test_lora_slots_cap_distinct_adapters_without_blocking_others():
    s = make(max_loras=1)
    s.add(req("x", 2, adapter="A"))
    s.add(req("y", 2, adapter="B"))
    s.add(req("z", 2))  # base model needs no slot
    plan = step(s)  # x and y wait for their adapters' copies to the device; z does not wait for them
    assert [q.request_id for q in plan.seqs] == ["z"]
    assert [r.request_id for r in s.pending] == ["x", "y"]
    plan = step(s)  # copies landed: x takes the one slot, y has none while A runs: skipped
    assert [q.request_id for q in plan.seqs] == ["z", "x"]
    assert [a for a, _ in plan.lora_loads] == ["A"] and s.adapters.slot_of("A") == 0
    assert s.requests["x"].lora_wait == 0.001 and s.requests["z"].lora_wait == 0
    while s.requests["x"].status.value != "finished":
        step(s)
    plan = step(s)
    assert [a for a, _ in plan.lora_loads] == ["B"] and s.adapters.slot_of("B") == 0


def test_preemption_frees_and_requeues_the_newest():
    s = make(num_blocks=4, block_size=4, max_num_batched_tokens=64)
    s.cache.remove_adapter("A")
    s.cache.remove_adapter("B")
    s.add(req("old", 7, max_tokens=8))
    s.add(req("new", 7, max_tokens=8))
    step(s)  # both admitted: 2 blocks each (8 tokens), cache full
    assert s.cache.usage()["free"] == 0
    assert step(s).preempted == []  # token 8 still fits
    plan = step(s)  # old needs a 3rd block for token 9 -> new is preempted
    assert plan.preempted == ["new"] and s.waiting[0].request_id == "new"
    assert s.requests["new"].num_computed_tokens == 0 and s.requests["new"].block_ids == []
    assert s.num_preemptions == 1


def test_finish_frees_everything():
    s = make()
    for i in range(5):
        s.add(req(str(i), 5 + i, max_tokens=3, adapter="A" if i % 2 else None))
    while s.has_unfinished():
        step(s)
    assert s.cache.usage()["used"] == 1  # adapter A stays on the device
    assert all(r.num_output_tokens == 3 and r.finish_reason.value == "length" for r in s.requests.values())


def test_policy_modules_do_not_import_torch():
    code = ("import sys; import loraserve.engine.scheduler, loraserve.cache, loraserve.lora.slots, "
            "loraserve.clock, loraserve.model.spec; print('torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_token_slice_spans_prompt_and_output():
    r = req("t", 4)
    r.output_token_ids = [7, 8, 9]
    for start in range(8):
        for end in range(start, 8):
            assert r.token_slice(start, end) == r.token_ids[start:end]
