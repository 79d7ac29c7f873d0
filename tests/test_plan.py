"""`loraserve plan`: the provisioning model on cases with answers known in
closed form or by brute force, and the command as a subprocess."""

from __future__ import annotations

import itertools
import json
import math
import random
import subprocess
import sys
from collections import OrderedDict
from dataclasses import replace

import pytest

from loraserve.plan import PlanInput, provision
from loraserve.plan.admission import (Loading, LoadQueue, che_residency, erlang_c_wait_within, iar,
                                      required_iar)
from loraserve.plan.capacity import Knapsack, smallest
from loraserve.plan.popularity import fit_zipf, from_workload, zipf
from loraserve.plan.working import absorb_hot, memory, presence, quantile_count
from loraserve.sim.hardware import GiB, Hardware
from loraserve.sim.models import lora_params, model_spec
from loraserve.workload import ArrivalConfig, PopularityConfig, WorkloadConfig, generate

# a miss that can never meet the SLO (the whole adapter first, 10 s to load) and a rate too low to
# leave anything in flight: the plan's IAR is then the resident share alone, the paper's static case
STATIC = dict(slo_ttft=0.25, slo_tpot=0.1, layerwise=False, load_s=10.0, load_links=1, rate=1e-4)


@pytest.mark.parametrize("n,q", [(40, 0.95), (40, 0.9), (512, 0.95), (100, 0.95), (7, 0.5)])
def test_uniform_popularity_needs_ceil_q_n_adapters(n, q):
    plan = provision(PlanInput("mixtral-8x7b", adapters=n, zipf=0.0, quantile=q, **STATIC))
    c = math.ceil(q * n - 1e-9)
    assert plan.required_iar == pytest.approx(q)
    assert plan.resident_adapters == c and plan.working_adapters == 0 and plan.cache_adapters == c
    assert plan.iar == pytest.approx(c / n)
    size = lora_params(model_spec("mixtral-8x7b"), 64) * 2
    assert plan.cache_bytes == plan.resident_bytes == c * size
    # the IAR of a static cache of C of N uniform adapters is C/N, for every C
    load = Loading(32, 1e9, 0.0, 0.0)
    for k in (0, 1, n // 2, n):
        assert iar([1 / n] * n, [size] * n, [1.0] * k + [0.0] * (n - k), 1e-4, 0.25, load) == pytest.approx(k / n)


def test_a_single_hot_adapter_needs_one_slot():
    plan = provision(PlanInput("qwen3-30b-a3b", rank=32, adapters=50, zipf=25.0, **STATIC))
    assert plan.cache_adapters == 1 and plan.resident == ["lora-0"] and plan.iar > 0.999999
    assert plan.cache_bytes == lora_params(model_spec("qwen3-30b-a3b"), 32) * 2


def test_zipf_cache_is_the_shortest_prefix_reaching_the_quantile():
    n, s = 512, 1.2
    weights = [1 / (i + 1) ** s for i in range(n)]
    cum = list(itertools.accumulate(w / sum(weights) for w in weights))
    for q in (0.9, 0.95, 0.99):
        direct = next(i + 1 for i, c in enumerate(cum) if c >= q)
        plan = provision(PlanInput("mixtral-8x7b", adapters=n, zipf=s, quantile=q, **STATIC))
        assert plan.resident_adapters == direct
        assert plan.resident == [f"lora-{i}" for i in range(direct)]
        assert plan.iar == pytest.approx(cum[direct - 1])
    # the figures papers.md §2.5 worked out by hand for N = 512
    assert [next(i + 1 for i, c in enumerate(cum) if c >= q) for q in (0.9, 0.95, 0.99)] == [144, 261, 444]


def test_the_dp_finds_the_brute_force_minimum_over_mixed_sizes():
    rng = random.Random(3)
    for trial in range(20):
        n = 9
        probs = [rng.random() ** 3 for _ in range(n)]
        probs = [p / sum(probs) for p in probs]
        sizes = [rng.choice([1, 2, 3, 5, 8]) * 1000 for _ in range(n)]
        knapsack = Knapsack.build(probs, sizes)
        for need in (0.3, 0.6, 0.9, 0.99):
            brute = min(sum(sizes[i] for i in sub) for k in range(n + 1) for sub in itertools.combinations(range(n), k)
                        if sum(probs[i] for i in sub) >= need)
            members = smallest(knapsack, lambda m: sum(probs[i] for i in m) >= need)
            assert sum(sizes[i] for i in members) == brute, (trial, need)
            assert sum(probs[i] for i in members) >= need


def test_mixed_sizes_through_provision_take_the_most_requests_per_byte():
    """Two adapters of equal popularity, one 4× the other's size: at a need one
    of them meets, the plan holds the small one."""
    big, small = 4 * 10**9, 10**9
    sizes = (big, small, small, small)
    plan = provision(PlanInput("mixtral-8x7b", adapters=4, zipf=0.0, quantile=0.5, adapter_bytes=sizes, **STATIC))
    assert plan.resident_adapters == 2 and plan.cache_bytes == 2 * small and "lora-0" not in plan.resident


def test_a_miss_loaded_layer_wise_within_the_budget_is_admissible():
    # Δ = lat + β + (L-1)·max(0, β - τ): the first layer's load when the pipeline keeps ahead of compute
    assert Loading(4, 1.0, 0.5, 2.0).miss_delay(4.0) == pytest.approx(0.5 + 1.0)
    assert Loading(4, 1.0, 0.5, 0.25).miss_delay(4.0) == pytest.approx(0.5 + 1.0 + 3 * 0.75)
    assert Loading(4, 1.0, 0.5, 0.0).miss_delay(4.0) == pytest.approx(0.5 + 4.0)  # whole adapter first
    assert Loading(4, 1.0, 0.0, 0.0, links=2).miss_delay(4.0) == pytest.approx(2.0)
    # same demand, fast layer-wise loads: no adapter need be resident, the IAR is met by loads in time
    fast = provision(PlanInput("mixtral-8x7b", adapters=100, zipf=0.0, slo_ttft=0.25, slo_tpot=0.1, rate=1e-4))
    assert fast.resident_adapters == 0 and fast.iar > 0.999 and fast.miss_delay_s < 0.01


def test_the_load_queue_has_the_pollaczek_khinchine_mean():
    # one adapter size: M/D/1, E[W] = ρ s / (2 (1 - ρ)) with s the transfer time
    load = Loading(10, 100.0, 0.0, 0.0)
    q = LoadQueue.of([0.5, 0.5], [100.0, 100.0], [0.0, 1.0], rate=1.0, load=load)  # misses at 0.5/s, s = 1
    assert q.rho == pytest.approx(0.5) and q.mean_wait_s == pytest.approx(0.5 * 1 / (2 * 0.5))
    assert q.p_wait_within(0.0) == pytest.approx(0.5)  # the atom at 0 is 1 - ρ
    assert q.p_wait_within(1.0) == pytest.approx(1 - 0.5 * math.exp(-0.5 * 1.0 / 0.5))
    assert LoadQueue.of([1.0], [300.0], [0.0], 1.0, load).p_wait_within(100.0) == 0.0  # ρ = 3: never


def test_required_iar_and_the_instance_queue():
    assert required_iar(0.95, 1.0) == pytest.approx(0.95)
    assert required_iar(0.95, 0.97) == pytest.approx(0.95 / 0.97)
    assert required_iar(0.95, 0.9) > 1  # no cache can help
    # Erlang C with one server is M/M/1: P(W <= t) = 1 - ρ exp(-(μ - λ) t)
    assert erlang_c_wait_within(0.3, 1, 2.0, 0.25) == pytest.approx(1 - 0.5 * math.exp(-(4 - 2) * 0.3))
    # two servers, a = 1: C(2, 1) = 1/3
    assert erlang_c_wait_within(0.0, 2, 1.0, 1.0) == pytest.approx(1 - 1 / 3)
    with pytest.raises(ValueError, match="no cache meets"):
        provision(PlanInput("mixtral-8x7b", adapters=10, zipf=1.0, rate=50.0, instances=1))


def test_che_matches_lru_simulated_on_zipf():
    n, cap, s = 60, 12, 0.9
    probs = zipf(n, s).probs
    h = che_residency(probs, [1] * n, cap)
    assert sum(h) == pytest.approx(cap)
    assert che_residency([1 / n] * n, [1] * n, cap) == pytest.approx([cap / n] * n)
    rng, lru, hits, total = random.Random(0), OrderedDict(), 0, 200_000
    names = list(range(n))
    for k in range(total):
        a = rng.choices(names, probs)[0]
        if k > 10_000:
            hits += a in lru
        lru.pop(a, None)
        lru[a] = True
        if len(lru) > cap:
            lru.popitem(last=False)
    assert sum(p * x for p, x in zip(probs, h)) == pytest.approx(hits / (total - 10_001), abs=0.01)


def test_working_slots_are_the_quantile_of_misses_in_flight():
    assert quantile_count([0.5, 0.5], 0.8) == 2  # P(0) = 0.25, P(≤1) = 0.75
    assert quantile_count([0.5, 0.5], 0.75) == 1
    assert quantile_count([0.5, 0.5], 0.2) == 0
    assert quantile_count([1e-6] * 10, 0.95) == 0
    assert presence([0.5, 0.0], 2) == pytest.approx([0.75, 0.0])
    # an adapter always in flight becomes resident at no cost; a rarely seen one does not
    present = [1.0, 0.999999, 0.01, 0.01]
    grown = absorb_hot([0.0] * 4, [1] * 4, present, 0.95)
    assert grown == [1.0, 1.0, 0.0, 0.0]
    assert memory(grown, [1] * 4, present, 0.95).total == memory([0.0] * 4, [1] * 4, present, 0.95).total


def test_gpu_counts_on_a_hand_computed_case(tmp_path):
    hw = Hardware("toy", flops=1e12, mem_bw=1e15, mem_bytes=10 * GiB, pcie_bw=1e9, flops_eff=0.5)
    path = tmp_path / "toy.json"
    hw.save(path)
    n, rate = 20, 10.0
    inp = PlanInput("mixtral-8x7b", adapters=n, zipf=0.0, rate=rate, hardware=str(path), mean_input=300,
                    mean_output=100, rank=8, layerwise=False, load_s=10.0, load_links=1, link_bw=1e9, max_util=0.5,
                    mem_util=1.0, slo_ttft=0.25, slo_tpot=0.1)
    plan = provision(inp)
    h, inter, q, kv, r, k, layers = 4096, 14336, 4096, 1024, 8, 2, 32
    applied = layers * r * ((3 * h + q + 2 * kv) + (q + h) + k * ((2 * h + 2 * inter) + (inter + h)))
    tokens = rate * 400
    assert plan.flops_per_s == pytest.approx(2 * applied * tokens)
    assert plan.gpus_for_compute == math.ceil(2 * applied * tokens / (1e12 * 0.5) / 0.5)
    per_token = layers * 2 * ((h + q + 2 * kv) + (q + h) + (h + k * 2 * inter) + (k * inter + h))  # down combined
    assert plan.link_bytes_per_s == pytest.approx(per_token * tokens)
    assert plan.gpus_for_bandwidth == math.ceil(per_token * tokens / (1e9 * 0.5))
    # uniform popularity, misses never in time: 19 resident; in flight 10 × (0.25 + 100 × 0.1) = 102.5
    # requests cover every adapter, so the 20th holds a working slot: 20 adapters of memory
    size = lora_params(model_spec("mixtral-8x7b"), 8) * 2
    assert plan.resident_adapters + plan.working_adapters == 20
    assert plan.gpus_for_cache == math.ceil(20 * size / (10 * GiB))
    assert plan.server_gpus == max(plan.gpus_for_cache, plan.gpus_for_compute, plan.gpus_for_bandwidth)
    # adapters kept in fp32 beside the bf16 model: twice the bytes to cache, the same FLOPs and activations
    fp32 = provision(replace(inp, lora_dtype_bytes=4))
    assert fp32.flops_per_s == pytest.approx(plan.flops_per_s)
    assert fp32.link_bytes_per_s == pytest.approx(plan.link_bytes_per_s)
    assert fp32.weight_bytes_per_s == pytest.approx(2 * plan.weight_bytes_per_s)
    assert fp32.gpus_for_cache == math.ceil(20 * 2 * size / (10 * GiB))


def test_popularity_from_a_workload_file(tmp_path):
    wl = generate(WorkloadConfig(num_sessions=20_000, num_adapters=100, popularity=PopularityConfig("zipf", 1.2),
                                 arrival=ArrivalConfig(rate=10.0)))
    assert fit_zipf([round(1e7 * p) for p in zipf(30, 0.8).probs]) == pytest.approx(0.8, abs=1e-6)
    assert from_workload(wl, fit=True).zipf_s == pytest.approx(1.2, abs=0.05)
    shares = from_workload(wl)
    assert shares.probs == sorted(shares.probs, reverse=True) and sum(shares.probs) == pytest.approx(1)
    assert shares.names[0] == "lora-0" and shares.request_rate == pytest.approx(10.0)
    path = tmp_path / "wl.jsonl"
    wl.save(path)
    plan = provision(PlanInput("mixtral-8x7b", workload=str(path), slo_ttft=0.25, slo_tpot=0.1, layerwise=False,
                               load_s=10.0, load_links=1))
    assert plan.rate == pytest.approx(10.0) and plan.num_adapters == 100
    cum = list(itertools.accumulate(shares.probs))
    assert plan.resident[:3] == shares.names[:3]
    assert plan.resident_adapters >= next(i + 1 for i, c in enumerate(cum) if c >= 0.95)


def test_popularity_counted_from_a_trace(tmp_path):
    rows = ["timestamp,adapter,input_len,output_len"] + [f"{i * 0.5},{a},100,50" for i, a in
                                                          enumerate(["b"] * 6 + ["a"] * 3 + ["c"] + [""] * 2)]
    path = tmp_path / "trace.csv"
    path.write_text("\n".join(rows) + "\n")
    plan = provision(PlanInput("qwen3-30b-a3b", rank=32, workload=str(path), quantile=0.6, **STATIC))
    assert plan.num_adapters == 3 and plan.residency == {"b": 1.0, "a": 0.0, "c": 0.0}  # b alone: 6 of 10
    assert plan.iar == pytest.approx(0.6)


def cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "loraserve.cli", "plan", *args], capture_output=True, text=True,
                          timeout=120)


def test_the_plan_command_prints_json_and_refuses_bad_input(tmp_path):
    base = ["--model", "mixtral-8x7b", "--adapters", "512", "--zipf", "1.2", "--slo-ttft", "0.25",
            "--slo-tpot", "0.1"]
    out = cli(*base, "--rate", "20", "--json")
    assert out.returncode == 0, out.stderr
    plan = json.loads(out.stdout)
    for key in ("cache_bytes", "cache_adapters", "server_gpus", "iar", "gpus_for_cache", "gpus_for_compute",
                "gpus_for_bandwidth", "required_iar", "assumptions", "resident", "rate"):
        assert key in plan
    expected = provision(PlanInput("mixtral-8x7b", adapters=512, zipf=1.2, rate=20.0)).as_dict()
    assert plan == json.loads(json.dumps(expected))
    table = cli(*base, "--rate", "20")
    assert table.returncode == 0 and table.stdout.startswith("server_gpus") and "reconstruction" in table.stdout
    out = cli(*base, "--rate", "-1")
    assert out.returncode == 2 and out.stderr == "loraserve: error: the rate must be positive, got -1.0\n"
    out = cli("--model", "no-such-model", "--adapters", "5", "--zipf", "1", "--rate", "1")
    assert out.returncode == 2 and len(out.stderr.strip().splitlines()) == 1
    assert out.stderr.startswith("loraserve: error: unknown model 'no-such-model'")


def test_bad_plan_inputs_name_the_flag(tmp_path):
    for kwargs, message in [(dict(workload=str(tmp_path / "w.jsonl"), zipf=1.0), "give --zipf S or --workload"),
                            (dict(zipf=1.0), "give --adapters N and --zipf S"),
                            (dict(adapters=5, zipf=1.0, slo_tpot=0.0), "--slo-tpot must be positive"),
                            (dict(adapters=5, zipf=1.0, cache_model="fifo"), "unknown cache model"),
                            (dict(workload=str(tmp_path / "w.jsonl")), "no such workload or trace file"),
                            (dict(adapters=5, zipf=1.0, rate=None), "give --rate"),
                            (dict(adapters=5, zipf=1.0, quantile=1.5), "quantile must be in"),
                            (dict(adapters=5, zipf=1.0, lora_dtype_bytes=0), "--lora-dtype-bytes must be positive")]:
        with pytest.raises(ValueError, match=message):
            provision(PlanInput("mixtral-8x7b", **{"rate": 1.0, **kwargs}))


def test_the_readme_shows_what_the_command_prints():
    from pathlib import Path

    from loraserve.plan.cli import table

    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    example = table(provision(PlanInput("mixtral-8x7b", adapters=512, zipf=1.2, rate=20.0)))
    assert example in readme
