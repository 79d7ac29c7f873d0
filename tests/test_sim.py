"""The simulator: its cost model, and that it is the engine's own policy on virtual time.

The central test runs one workload twice: through the real engine (the tiny
model really computes; a cost model sets the clock and the copy times) and
through the simulator. The decision logs (admissions, pends, preemptions,
moves and drops, with their times) must be identical.
"""

from __future__ import annotations

import statistics
from dataclasses import replace

import pytest

from loraserve.bench.metrics import summarize
from loraserve.clock import ManualClock
from loraserve.config import CacheConfig, EngineConfig, SchedulerConfig
from loraserve.engine.llm_engine import LLMEngine
from loraserve.engine.plan import ScheduledSeq, StepPlan
from loraserve.request import Request
from loraserve.sampling import SamplingParams
from loraserve.sim.calibrate import fit, measure
from loraserve.sim.cost import StepCost, StepWork
from loraserve.sim.engine import SimConfig, SimEngine
from loraserve.sim.hardware import PROFILES, Hardware
from loraserve.sim.models import lora_params, model_spec
from loraserve.sim.paced import pace_engine
from loraserve.sim.replay import replay
from loraserve.sim.run import simulate, to_records
from loraserve.workload import ArrivalConfig, Lengths, Workload, WorkloadConfig, generate

SLOW = Hardware("test", flops=2e10, mem_bw=5e9, mem_bytes=2**30, pcie_bw=2e7, pcie_latency=1e-4,
                step_overhead=1e-3, seq_overhead=1e-4)
"""Copies slow enough next to steps that requests really wait for them."""


def decode_plan(spec, batch: int, context: int, adapter: str | None = None) -> StepPlan:
    plan = StepPlan()
    for i in range(batch):
        r = Request(f"r{i}", list(range(context)), SamplingParams(), adapter=adapter)
        r.num_computed_tokens = context - 1
        plan.seqs.append(ScheduledSeq.of(r, 1))
    return plan


def test_roofline_decode_is_memory_bound_and_prefill_compute_bound():
    spec, hw = model_spec("llama3-8b"), PROFILES["h100"]
    cost = StepCost(spec, hw)
    one = cost.work(decode_plan(spec, 1, 1024))
    weights = 2 * (cost.dense + cost.head)
    assert one.bytes == pytest.approx(weights + 1024 * spec.kv_bytes_per_token(2), rel=1e-6)
    # batch-1 decode of an 8B model on an H100: ~16 GB / (3.35 TB/s · 0.8) ≈ 6 ms + overheads
    assert 5e-3 < cost.time(one) < 8e-3
    prefill = StepPlan([ScheduledSeq.of(Request("p", list(range(4096)), SamplingParams()), 4096)])
    w = cost.work(prefill)
    assert w.flops / (hw.flops * hw.flops_eff) > w.bytes / (hw.mem_bw * hw.bw_eff)  # compute bound
    # tensor parallelism halves the work per GPU and adds all-reduces
    tp2 = StepCost(spec, replace(hw, interconnect_bw=450e9), tp=2)
    assert tp2.work(prefill).flops == pytest.approx(w.flops / 2)
    assert tp2.time(tp2.work(prefill)) < cost.time(w)


def test_moe_reads_only_the_experts_its_tokens_touch():
    spec = model_spec("mixtral-8x7b")
    cost = StepCost(spec, PROFILES["h100"])
    b1, b64 = cost.work(decode_plan(spec, 1, 16)), cost.work(decode_plan(spec, 64, 16))
    expert_bytes = 2 * cost.expert
    # one token touches 2 of 8 experts; 64 tokens touch (nearly) all 8
    assert b1.bytes - 2 * (cost.dense + cost.head) == pytest.approx(2 * expert_bytes + 16 * cost.kv_per_token, rel=1e-6)
    assert b64.bytes - 2 * (cost.dense + cost.head) > 7.99 * expert_bytes


def test_lora_cost_follows_adapter_size():
    spec = model_spec("llama3-8b")
    size = lora_params(spec, 64) * 2
    assert size == 64 * 32 * (4096 * 2 + 4096 * 2 + (4096 + 1024) * 2 + 3 * (4096 + 14336)) * 2  # r·Σ(in+out)·layers
    cost = StepCost(spec, PROFILES["h100"], lora_bytes={"a": size, "b": size}.__getitem__)
    base = cost.work(decode_plan(spec, 8, 128))
    one = cost.work(decode_plan(spec, 8, 128, adapter="a"))
    assert one.bytes - base.bytes == size
    assert one.flops - base.flops == pytest.approx(2 * 8 * size / 2)



def test_simulator_rejects_what_the_engine_rejects():
    """One size check for both: a request that could never get its blocks is refused, not queued."""
    spec = model_spec("llama3-8b")
    block = 16 * spec.kv_bytes_per_token(2)
    sim = SimEngine(spec, PROFILES["h100"], SimConfig(device_tier_bytes=64 * block), {"a": 8 * block})
    assert sim.cache.max_request_blocks == 64 - 8
    sim.add_request(list(range(56 * 16 - 8)), SamplingParams(max_tokens=8), adapter="a")  # exactly fits
    with pytest.raises(ValueError, match=r"more KV blocks than the device pool has for a request \(56 of 16"):
        sim.add_request(list(range(56 * 16)), SamplingParams(max_tokens=1), adapter="a")
    with pytest.raises(KeyError, match="no adapter named 'b'"):
        sim.add_request([1, 2, 3], adapter="b")
    assert len(sim.scheduler.waiting) == 1

def test_calibration_recovers_a_known_profile():
    import random

    truth = replace(PROFILES["cpu"], flops_eff=0.3, bw_eff=0.5, step_overhead=2e-3, seq_overhead=1e-4,
                    token_overhead=2e-5)
    cost = StepCost(model_spec("llama3-8b"), truth)
    rng = random.Random(0)
    works = [StepWork(rng.uniform(1e8, 5e10), rng.uniform(1e8, 2e10), rng.randint(1, 32), rng.randint(1, 512))
             for _ in range(200)]
    fitted, err = fit([(w, cost.time(w)) for w in works], PROFILES["cpu"])
    assert err < 0.01
    assert (fitted.flops_eff, fitted.bw_eff) == pytest.approx((0.3, 0.5), rel=0.05)
    fitted_cost = StepCost(cost.spec, fitted)
    assert max(abs(fitted_cost.time(w) / cost.time(w) - 1) for w in works) < 0.03


def small_workload(names: list[str], sessions: int = 12, rate: float = 40.0):
    wl = generate(WorkloadConfig(num_sessions=sessions, num_adapters=len(names), turns=2, think_s=0.05,
                                 arrival=ArrivalConfig(rate=rate), first_input=Lengths(40, "uniform"),
                                 input=Lengths(12, "uniform"), output=Lengths(10, "uniform"), seed=3))
    return wl.renamed(names)


@pytest.mark.parametrize("policy,blocks", [("elora", 40), ("vllm", 64)])
def test_engine_and_simulator_make_identical_decisions(tiny, policy, blocks):
    """Adapters take 6, 12 and 24 blocks of 12 KiB; under vllm the r16 adapter
    fills the 25-block adapter region alone."""
    root = tiny("llama")
    names = ["r4", "r8", "r16"]
    cache = CacheConfig(policy=policy, device_bytes=blocks * 12 * 2**10, host_bytes=4 * 2**20, swap_interval=0.002,
                        adapter_fraction=0.4)
    sched = SchedulerConfig(max_num_seqs=6, max_num_batched_tokens=64, max_loras=2)
    engine = LLMEngine(EngineConfig(model=str(root / "model"), dtype="float32", cache=cache, scheduler=sched), clock=ManualClock())
    for n in names:
        engine.add_adapter(n, str(root / "adapters" / n))
    pace_engine(engine, StepCost(engine.spec, SLOW, 4, lora_bytes=lambda a: engine.adapters.by_id[a].num_bytes))
    real_log: list[tuple] = []
    engine.scheduler.log = engine.cache.log = real_log
    wl = small_workload(names)
    real = replay(engine, wl)
    engine.close()

    sizes = {n: engine.adapters.resolve(n).num_bytes for n in names}
    to_name = {engine.adapters.resolve(n).id: n for n in names}
    sim = SimEngine(engine.spec, SLOW, SimConfig(dtype_bytes=4, max_model_len=engine.max_model_len, cache=cache,
                                                 scheduler=sched, device_tier_bytes=engine.num_blocks * engine.block_bytes),
                    sizes)
    assert sim.cache.num_device_blocks == engine.cache.num_device_blocks
    sim_log: list[tuple] = []
    sim.scheduler.log = sim.cache.log = sim_log
    simulated = replay(sim, wl)

    def named(entry: tuple) -> tuple:
        t, event, what, *rest = entry
        if isinstance(what, tuple):
            what = (to_name.get(what[0], what[0]), what[1])
        return (t, event, to_name.get(what, what) if isinstance(what, str) else what, *rest)

    real_log = [named(e) for e in real_log]
    kinds = {e[1] for e in real_log}
    assert {"admit", "pend", "move"} <= kinds  # the workload exercises swaps and waiting
    assert any(e[1] == "drop" or e[1] == "move" and e[3] == "device" for e in real_log)  # and evictions
    assert real_log == sim_log
    by_id = {r.request_id: r for r in simulated}
    assert len(real) == len(simulated) == wl.num_requests
    for r in real:
        s = by_id[r.request_id]
        assert (r.first_token_time, r.finish_time, r.num_output_tokens) == (s.first_token_time, s.finish_time,
                                                                             s.num_output_tokens)


def test_simulated_latency_of_a_real_run_within_25_percent(tiny):
    """Calibrate on a real run (wall clock), then simulate the same workload."""
    root = tiny("llama")
    names = ["r4", "r8", "r16"]
    cache = CacheConfig(device_bytes=64 * 2**20, host_bytes=256 * 2**20)
    config = EngineConfig(model=str(root / "model"), dtype="float32", cache=cache)
    wl = small_workload(names, sessions=30, rate=4.0)
    samples, requests, cost = measure(config, {n: str(root / "adapters" / n) for n in names}, wl, PROFILES["cpu"])
    hw, _ = fit(samples, PROFILES["cpu"])
    t0 = min(r.arrival_time for r in requests)
    real = summarize(to_records(requests, t0))
    sizes = {n: lora_params(cost.spec, 8) * 4 for n in names}
    sim = simulate(wl, cost.spec, hw, SimConfig(dtype_bytes=4, cache=cache, device_tier_bytes=cache.device_bytes,
                                                max_model_len=2048), sizes).summary
    for metric in ("ttft_s", "tpot_s"):
        assert sim[metric]["mean"] == pytest.approx(real[metric]["mean"], rel=0.25), metric
    assert statistics.mean(t for _, t in samples) > 0


def test_workload_and_simulate_commands(tmp_path, capsys):
    from loraserve.cli import main

    wl = tmp_path / "w.jsonl"
    assert main(["workload", "--out", str(wl), "--sessions", "30", "--adapters", "8", "--turns", "2",
                 "--rate", "4", "--first-input", "200", "--output", "32"]) == 0
    out = tmp_path / "sim.json"
    assert main(["simulate", "run", "--workload", str(wl), "--model", "llama3-8b", "--hardware", "h100",
                 "--rank", "16", "--policy", "elora", "slora", "--device-tier", "4GiB", "--out", str(out),
                 "--plots", str(tmp_path / "plots")]) == 0
    import json

    res = json.loads(out.read_text())["results"]
    n = len(Workload.load(wl).turns)
    for policy in ("elora", "slora"):
        assert res[policy]["summary"]["completed"] == n
        assert 0 < res[policy]["summary"]["ttft_s"]["mean"] < 1.0
    assert res["elora"]["stats"]["kv_hit_rate"] > 0 == res["slora"]["stats"]["kv_hit_rate"]
    assert (tmp_path / "plots" / "memory_elora.png").stat().st_size > 1000
    assert "elora" in capsys.readouterr().out
    assert main(["simulate", "run", "--workload", str(wl), "--model", "nonesuch"]) == 2
