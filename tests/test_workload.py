"""Workload generators: their statistics, reproducibility, files and traces."""

from __future__ import annotations

import collections
import random
import statistics

import pytest

from loraserve.workload import (ArrivalConfig, Lengths, Popularity, PopularityConfig, Workload, WorkloadConfig,
                                arrival_times, from_trace, generate, input_ids, input_text)


def gaps(times: list[float]) -> list[float]:
    return [b - a for a, b in zip([0.0] + times, times)]


def test_poisson_arrivals_have_the_right_mean_and_cv():
    g = gaps(arrival_times(ArrivalConfig("poisson", rate=4.0), 20_000, random.Random(1)))
    assert statistics.mean(g) == pytest.approx(0.25, rel=0.03)
    assert statistics.stdev(g) / statistics.mean(g) == pytest.approx(1.0, rel=0.05)


def test_gamma_arrivals_are_bursty_at_the_same_rate():
    g = gaps(arrival_times(ArrivalConfig("gamma", rate=4.0, cv=3.0), 40_000, random.Random(2)))
    assert statistics.mean(g) == pytest.approx(0.25, rel=0.05)
    assert statistics.stdev(g) / statistics.mean(g) == pytest.approx(3.0, rel=0.1)


def test_onoff_arrivals_are_silent_when_off():
    times = arrival_times(ArrivalConfig("onoff", rate=2.0, on_s=1.0, off_s=3.0), 5_000, random.Random(3))
    assert all(t % 4.0 < 1.0 for t in times)
    assert len(times) / times[-1] == pytest.approx(2.0, rel=0.05)  # the mean rate holds over whole periods


def test_zipf_frequencies():
    pop = Popularity(PopularityConfig("zipf", s=1.0), 10)
    rng = random.Random(4)
    counts = collections.Counter(pop.sample(rng) for _ in range(50_000))
    h = sum(1 / (i + 1) for i in range(10))
    for i in (0, 1, 4, 9):
        assert counts[i] / 50_000 == pytest.approx(1 / (i + 1) / h, abs=0.01)


def test_uniform_and_gaussian_popularity():
    assert Popularity(PopularityConfig("uniform"), 8).probs == [pytest.approx(1 / 8)] * 8
    g = Popularity(PopularityConfig("gaussian", sigma=0.1), 21).probs
    assert max(range(21), key=g.__getitem__) == 10 and g[0] < g[5] < g[10] and g[0] == pytest.approx(g[20])


def test_shifting_popularity_rotates_the_hot_set():
    pop = Popularity(PopularityConfig("shifting", s=1.2, period=10.0, shift=3), 12)
    rng = random.Random(5)
    hot = [collections.Counter(pop.sample(rng, t) for _ in range(4000)).most_common(1)[0][0] for t in (0, 10, 25)]
    assert hot == [0, 3, 6]
    assert pop.prob(3, 10.0) == pop.prob(0, 0.0)


def test_lengths():
    rng = random.Random(6)
    assert {Lengths(50).sample(rng) for _ in range(10)} == {50}
    u = [Lengths(100, "uniform", 0.5).sample(rng) for _ in range(5000)]
    assert min(u) >= 50 and max(u) <= 150 and statistics.mean(u) == pytest.approx(100, rel=0.02)
    ln = [Lengths(200, "lognormal", 0.8, hi=10_000).sample(rng) for _ in range(20_000)]
    assert statistics.mean(ln) == pytest.approx(200, rel=0.05)
    with pytest.raises(ValueError, match="unknown length distribution"):
        Lengths(10, "zipf").sample(rng)


def test_sessions_turns_and_reproducibility():
    cfg = WorkloadConfig(num_sessions=2000, num_adapters=5, turns=3.0, base_fraction=0.2, seed=7)
    wl = generate(cfg)
    assert generate(cfg).turns == wl.turns  # seeded
    assert generate(WorkloadConfig(num_sessions=2000, num_adapters=5, turns=3.0, seed=8)).turns != wl.turns
    sessions = wl.sessions()
    assert statistics.mean(len(s) for s in sessions) == pytest.approx(3.0, rel=0.05)
    assert all(len({t.adapter for t in s}) == 1 for s in sessions)  # a session keeps its adapter
    assert sum(s[0].adapter is None for s in sessions) / len(sessions) == pytest.approx(0.2, abs=0.03)
    assert statistics.mean(t.time for t in wl.turns if t.turn > 0) == pytest.approx(cfg.think_s, rel=0.05)


def test_save_load_and_rate_scaling(tmp_path):
    wl = generate(WorkloadConfig(num_sessions=50, num_adapters=4, turns=2.0, seed=9))
    wl.save(tmp_path / "w.jsonl")
    back = Workload.load(tmp_path / "w.jsonl")
    assert back.turns == wl.turns and back.adapters == wl.adapters and back.rate == wl.rate
    fast = wl.at_rate(4.0)
    firsts = [t for t in wl.turns if t.turn == 0]
    assert [t.time for t in fast.turns if t.turn == 0] == [pytest.approx(t.time / 4) for t in firsts]
    assert [t.time for t in fast.turns if t.turn > 0] == [t.time for t in wl.turns if t.turn > 0]
    (tmp_path / "bad.jsonl").write_text('{"timestamp": 1}\n')
    with pytest.raises(ValueError, match="not a loraserve workload"):
        Workload.load(tmp_path / "bad.jsonl")


def test_traces_csv_and_jsonl(tmp_path):
    (tmp_path / "t.csv").write_text("timestamp,adapter,input_len,output_len,session,turn\n"
                                    "100.0,a,50,10,x,0\n101.5,,20,5,,\n103.0,a,8,12,x,1\n")
    wl = from_trace(tmp_path / "t.csv")
    assert [(t.session, t.turn, t.adapter, t.input_len, t.output_len, t.time) for t in wl.turns] == [
        (0, 0, "a", 50, 10, 0.0), (0, 1, "a", 8, 12, 3.0), (1, 0, None, 20, 5, 1.5)]
    assert wl.adapters == ["a"]
    (tmp_path / "t.jsonl").write_text('{"timestamp": 5, "adapter": "b", "input_len": 3, "output_len": 4}\n')
    assert from_trace(tmp_path / "t.jsonl").turns[0].adapter == "b"
    (tmp_path / "bad.csv").write_text("timestamp,adapter\n1,a\n")
    with pytest.raises(ValueError, match="row 1 needs"):
        from_trace(tmp_path / "bad.csv")


def test_prompt_content_is_deterministic_and_sized():
    assert input_ids(0, 3, 1, 40) == input_ids(0, 3, 1, 40) != input_ids(0, 3, 2, 40)
    assert len(input_ids(0, 1, 0, 77)) == 77 and all(1000 <= t < 30000 for t in input_ids(0, 1, 0, 77))
    assert len(input_text(0, 1, 0, 30).split()) == 30
