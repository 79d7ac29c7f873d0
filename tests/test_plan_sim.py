"""The planner against the cluster simulator (issue 15): its cache meets the
P95 TTFT SLO at the planned rate in simulation, and a cache 20% smaller does
not. The setting (`loraserve.plan.simcheck.SimCheck`'s defaults) is one where
a miss cannot make the SLO: whole-adapter loads from NVMe, 0.32 s for a
Mixtral adapter. Virtual time and a seeded workload: the values are exact
from run to run."""

from __future__ import annotations

from loraserve.plan.simcheck import SimCheck, check, plan_of


def test_a_miss_cannot_make_the_slo_in_the_checked_setting():
    c = SimCheck()
    plan = plan_of(c)
    # 1.92 GB over 8 links of 0.75 GB/s, plus the link latency: the miss alone is past the SLO
    assert plan.miss_delay_s > c.slo_ttft
    assert plan.iar >= plan.required_iar == 0.95
    # Zipf 1.2 over 16 adapters: the top 13 carry 95.7% of requests, and LRU slots need more than a pinned set
    assert 13 < plan.cache_adapters < c.adapters


def test_planned_cache_meets_p95_ttft_and_a_fifth_less_does_not():
    c = SimCheck()
    out = check(c)
    planned, smaller = out["runs"]["1"], out["runs"]["0.8"]
    assert planned["cache_bytes"] == out["plan"]["cache_bytes"]
    assert smaller["slots"] < planned["slots"] == out["plan"]["cache_adapters"] - 1  # one adapter stages loads
    assert planned["p95_ttft"] <= c.slo_ttft and planned["meets"]
    assert smaller["p95_ttft"] > c.slo_ttft and not smaller["meets"]
    # the smaller cache misses for longer than the SLO on more than 5% of requests, the plan on fewer
    assert planned["late_share"] <= 0.05 < smaller["late_share"]
