"""The benchmark harness: metric math on hand-made timelines, the serviceable-rate
search on a synthetic system, and the load client and `bench run` against a fake
OpenAI streaming server (real HTTP, known delays) running in a thread."""

from __future__ import annotations

import argparse
import asyncio
import json
import socket
import threading
import time
from types import SimpleNamespace

import numpy as np
import pytest
import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse
from matplotlib.image import imread

from loraserve.bench import SLO, RequestRecord, percentile, run_workload_sync, serviceable_rate, summarize
from loraserve.bench.metrics import bracket_rate
from loraserve.bench.cli import add_parser
from loraserve.bench.plots import latency_cdfs, latency_vs_rate, memory_over_time
from loraserve.bench.scrape import memory_by_kind, parse_prometheus
from loraserve.workload import Turn, Workload, input_text

FIRST_DELAY = 0.05  # the fake server's time to first token (s)
TOKEN_DELAY = 0.02  # and between later tokens
THINK = 0.1
GAP = 0.03
LATE = 2.0  # how late a loaded 2-core CI box may run a timer: upper bounds only catch gross errors


def rec(adapter, arrival, first, finish, n, error=None) -> RequestRecord:
    return RequestRecord(f"r{arrival}", 0, 0, adapter, arrival, first, finish, [], 4, n, error)


def timeline() -> list[RequestRecord]:
    """TTFTs .1 .2 .4 .8; TPOTs .1 .2 .1 (the 1-token reply has none); one failure."""
    return [rec("a", 0, 0.1, 0.5, 5), rec("a", 1, 1.2, 1.6, 3), rec("b", 2, 2.4, 2.5, 2),
            rec("b", 3, 3.8, 4.0, 1), rec(None, 4, None, None, 0, error="boom")]


# -- metrics ------------------------------------------------------------------

def test_percentile_is_numpys_linear_and_none_when_empty():
    xs = list(np.random.default_rng(0).exponential(size=37))
    for q in (0, 12.5, 50, 95, 99, 100):
        assert percentile(xs, q) == pytest.approx(np.percentile(xs, q))
    assert percentile([], 50) is None and percentile([3.0], 99) == 3.0


def test_summary_of_a_hand_made_timeline():
    s = summarize(timeline(), SLO(ttft=0.3, tpot=0.15))
    assert (s["requests"], s["completed"], s["failed"]) == (5, 4, 1)
    assert s["ttft_s"] == pytest.approx({"mean": 0.375, "p50": 0.3, "p95": 0.74, "p99": 0.788})
    assert s["tpot_s"] == pytest.approx({"mean": 0.4 / 3, "p50": 0.1, "p95": 0.19, "p99": 0.198})
    assert s["duration_s"] == 4.0 and s["output_tokens"] == 11
    assert s["output_throughput_tok_s"] == 2.75 and s["request_throughput_rps"] == 1.0
    assert s["slo_attainment"] == pytest.approx(1 / 5)  # only r1; the failure is a miss
    assert s["adapter_slo_attainment"] == 0.0 and s["meets_slo"] is False
    loose = summarize(timeline(), SLO(ttft=0.5, tpot=0.25), duration=8.0)
    assert loose["slo_attainment"] == pytest.approx(3 / 5)
    assert loose["adapter_slo_attainment"] == pytest.approx(1 / 3)  # a: 2/2 > 90%; b: 1/2; base: 0/1
    assert loose["output_throughput_tok_s"] == 11 / 8 and loose["request_throughput_rps"] == 0.5


def test_meets_slo_is_the_percentile_ttft_mean_tpot_and_no_failures():
    ok = timeline()[:4]
    assert summarize(ok, SLO(0.8, 0.15))["meets_slo"] is True  # P95 .74, mean TPOT .133
    assert summarize(ok, SLO(0.7, 0.15))["meets_slo"] is False
    assert summarize(ok, SLO(0.8, 0.13))["meets_slo"] is False
    assert summarize(ok, SLO(0.3, 0.15, ttft_percentile=50))["meets_slo"] is True  # P50 .3
    assert summarize(ok, SLO(1, 1, ttft_percentile=90))["ttft_s"]["p90"] == pytest.approx(0.68)
    assert summarize(timeline(), SLO(10, 10))["meets_slo"] is False  # one failure
    empty = summarize([], SLO(1, 1))
    assert empty["ttft_s"]["mean"] is None and empty["output_throughput_tok_s"] is None
    assert empty["meets_slo"] is False and summarize(ok)["meets_slo"] is None


def synthetic(rate: float) -> dict:
    """A system whose every TTFT is 0.05·rate s: it meets a 1 s TTFT SLO up to rate 20."""
    return summarize([rec("a", i, i + 0.05 * rate, i + 0.05 * rate + 0.09, 10) for i in range(20)], SLO(1.0, 0.02))


def test_serviceable_rate_bisects_to_the_threshold():
    best, history = serviceable_rate(synthetic, SLO(1.0, 0.02), lo=1, hi=64, iters=6)
    assert 20 - 63 / 64 <= best <= 20
    assert [r for r, _ in history[:3]] == [1, 64, 32.5] and len(history) == 8
    assert best == max(r for r, s in history if s["meets_slo"])
    assert serviceable_rate(synthetic, SLO(1.0, 0.02), lo=25, hi=64)[0] == 0.0
    best, history = serviceable_rate(synthetic, SLO(1.0, 0.02), lo=2, hi=10)
    assert best == 10 and len(history) == 2


def test_bracket_rate_steps_from_a_start_until_it_brackets_the_threshold_then_bisects():
    tried = []

    def ok(rate: float) -> bool:
        tried.append(rate)
        return synthetic(rate)["meets_slo"]

    assert bracket_rate(ok, 4.0) == 20 and tried == [4, 8, 16, 32, 24, 20]  # up by 2, then [16, 32] halved twice
    tried.clear()
    assert bracket_rate(ok, 64.0) == 20 and tried == [64, 32, 16, 24, 20]  # down first
    assert bracket_rate(lambda r: True, 1.0, steps=3) == 4.0  # never refused: the search's ceiling
    assert bracket_rate(lambda r: False, 1.0, steps=3) == 0.0


# -- the fake server ----------------------------------------------------------

def sse(obj: dict) -> str:
    return "data: " + json.dumps(obj) + "\n\n"


def closed_url() -> str:
    """A loopback URL nothing listens at."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return f"http://127.0.0.1:{sock.getsockname()[1]}/v1"


def fake_app(received: list[dict]) -> FastAPI:
    """Streams `max_tokens` chunks ` <model>#<i>` with known delays; model `missing` is a 404."""
    app = FastAPI()

    @app.post("/v1/completions")
    async def completions(request: Request):
        body = await request.json()
        received.append(body)
        if body["model"] == "missing":
            return JSONResponse({"error": {"message": "no such model"}}, status_code=404)

        async def events():
            await asyncio.sleep(FIRST_DELAY)
            for i in range(body["max_tokens"]):
                if i:
                    await asyncio.sleep(TOKEN_DELAY)
                yield sse({"model": body["model"], "choices": [{"index": 0, "text": f" {body['model']}#{i}"}]})
            if (body.get("stream_options") or {}).get("include_usage"):
                yield sse({"choices": [], "usage": {"prompt_tokens": len(body["prompt"].split()),
                                                    "completion_tokens": body["max_tokens"]}})
            yield "data: [DONE]\n\n"

        return StreamingResponse(events(), media_type="text/event-stream")

    @app.get("/metrics")
    async def metrics():
        return PlainTextResponse(f'loraserve_cache_bytes{{tier="device",kind="adapters"}} {len(received) << 20}\n'
                                 'loraserve_cache_bytes{kind="history_kv",tier="device"} 2097152\n'
                                 'loraserve_cache_bytes{tier="host",kind="adapters"} 5\n'
                                 f"loraserve_num_requests_running {len(received)}\n")

    return app


@pytest.fixture(scope="module")
def fake():
    """The fake server on a loopback port, in a thread (its tests are marked slow: they start a server)."""
    received: list[dict] = []
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))  # the port is ours until the server closes it: no free-port race
    server = uvicorn.Server(uvicorn.Config(fake_app(received), log_level="warning"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.01)
    root = f"http://127.0.0.1:{sock.getsockname()[1]}"
    yield SimpleNamespace(url=root + "/v1", metrics=root + "/metrics", received=received)
    server.should_exit = True
    thread.join(timeout=10)


def two_turns(n: int = 6, models=("a", "b", None)) -> Workload:
    turns = []
    for s in range(n):
        m = models[s % len(models)]
        turns += [Turn(s, 0, m, 10, 5, GAP * s), Turn(s, 1, m, 8, 7, THINK)]
    return Workload(turns, ["a", "b"], rate=1 / GAP, seed=3)


# -- the load client ----------------------------------------------------------

@pytest.mark.slow
def test_client_replays_sessions_with_history_think_times_and_timings(fake):
    fake.received.clear()
    res = run_workload_sync(two_turns(), fake.url, "base", progress=False)
    recs = res.records
    assert [(r.session, r.turn) for r in recs] == [(s, t) for s in range(6) for t in (0, 1)]
    assert all(r.ok for r in recs) and [r.output_len for r in recs] == [5, 7] * 6
    prompts = {(b["model"], b["prompt"]) for b in fake.received}
    for s in range(6):
        model = ("a", "b", "base")[s % 3]
        p0 = input_text(3, s, 0, 10)
        p1 = p0 + "".join(f" {model}#{i}" for i in range(5)) + input_text(3, s, 1, 8)
        assert {(model, p0), (model, p1)} <= prompts
        t0, t1 = recs[2 * s], recs[2 * s + 1]
        assert t0.adapter == (None if model == "base" else model) and t1.input_len == 10 + 5 + 8
        assert GAP * s <= t0.arrival < GAP * s + LATE
        assert t0.finish + THINK <= t1.arrival < t0.finish + THINK + LATE
    assert len(fake.received) == 12
    for r in recs:
        assert FIRST_DELAY <= r.ttft < FIRST_DELAY + LATE
        assert TOKEN_DELAY * 0.95 <= r.tpot < TOKEN_DELAY + LATE / 4
        assert len(r.token_times) == r.output_len and r.first_token == r.token_times[0] <= r.finish
    s = summarize(recs, SLO(ttft=FIRST_DELAY + LATE, tpot=TOKEN_DELAY + LATE / 4))
    assert s["meets_slo"] is True and s["slo_attainment"] == 1.0 and s["output_tokens"] == 72
    assert res.duration >= max(r.finish for r in recs)
    assert json.loads(res.to_json())["records"][3]["output_len"] == 7


@pytest.mark.slow
def test_a_failed_turn_ends_its_session_only(fake):
    res = run_workload_sync(two_turns(3, models=("missing", "a", None)), fake.url, progress=False)
    errors = [r.error for r in res.records]
    assert errors[0].startswith("StreamError: HTTP 404") and "no such model" in errors[0]
    assert errors[1] == "skipped: s0-t0 failed" and errors[2:] == [None] * 4
    s = summarize(res.records, SLO(10, 10))
    assert (s["failed"], s["completed"], s["meets_slo"]) == (2, 4, False)


def test_unreachable_server_records_errors():
    res = run_workload_sync(two_turns(2), closed_url(), progress=False, timeout=5)
    assert [r.error.split(":")[0] for r in res.records] == ["ConnectError", "skipped"] * 2
    assert summarize(res.records)["completed"] == 0


@pytest.mark.slow
def test_metrics_are_scraped_and_a_missing_endpoint_is_tolerated(fake):
    res = run_workload_sync(two_turns(), fake.url, progress=False, metrics_url=fake.metrics, scrape_interval=0.05)
    assert len(res.metrics) >= 4 and [m["t"] for m in res.metrics] == sorted(m["t"] for m in res.metrics)
    rows = memory_by_kind(res.metrics)
    assert set(rows[-1]) == {"t", "adapters", "history_kv"} and rows[-1]["history_kv"] == 2 << 20
    assert [r["adapters"] for r in rows] == sorted(r["adapters"] for r in rows)  # requests only accumulate
    res = run_workload_sync(two_turns(2), fake.url, progress=False, metrics_url=fake.url + "/nothing",
                            scrape_interval=0.05)
    assert res.metrics == [] and all(r.ok for r in res.records)


def test_prometheus_parsing_sorts_labels_and_drops_buckets():
    text = ('# HELP x y\nloraserve_cache_bytes{tier="device",kind="free"} 1.5e3\n'
            'lat_bucket{le="0.1"} 3\nlat_sum 2.5\nloraserve_low_lora 0.25\n')
    assert parse_prometheus(text) == {'loraserve_cache_bytes{kind="free",tier="device"}': 1500.0,
                                      "lat_sum": 2.5, "loraserve_low_lora": 0.25}


def test_plots_are_pngs_of_the_requested_size(tmp_path):
    runs = {"x": [(1.0, synthetic(1.0)), (2.0, synthetic(2.0))], "y": [(1.0, synthetic(3.0))]}
    img = imread(latency_vs_rate(runs, tmp_path / "lat.png"))
    assert img.shape[:2] == (440, 1100)  # 10x4 in at 110 dpi
    assert imread(latency_cdfs({"x": timeline()}, tmp_path / "cdf.png")).shape[:2] == (440, 1100)
    mem = memory_over_time([{"t": 0, "adapters": 1 << 20}, {"t": 1, "adapters": 3 << 20}], tmp_path / "m.png")
    assert imread(mem).shape[:2] == (440, 880)


# -- bench run ----------------------------------------------------------------

def bench(*argv: str) -> int:
    parser = argparse.ArgumentParser(prog="loraserve")
    add_parser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["bench", "run", "--no-progress", *argv])
    return args.func(args)


@pytest.mark.slow
def test_bench_run_writes_json_plots_and_finds_the_serviceable_rate(fake, tmp_path, capsys):
    two_turns(4).save(tmp_path / "w.jsonl")
    rc = bench("--workload", str(tmp_path / "w.jsonl"), "--url", fake.url, "--rates", "20", "40", "--search",
               "--slo-ttft", "1", "--slo-tpot", "0.2", "--metrics-url", fake.metrics, "--scrape-interval", "0.05",
               "--out", str(tmp_path / "out" / "r.json"), "--plots", str(tmp_path / "plots"), "--label", "fake")
    assert rc == 0
    out = json.loads((tmp_path / "out" / "r.json").read_text())
    assert out["serviceable_rate"] == 40 and out["slo"] == {"ttft_s": 1.0, "tpot_s": 0.2, "ttft_percentile": 95}
    assert [r["rate"] for r in out["runs"]] == [20, 40]  # the search reused both sweep runs
    for run in out["runs"]:
        assert run["summary"]["requests"] == 8 and run["summary"]["meets_slo"] is True
        assert [r["output_len"] for r in run["records"]] == [5, 7] * 4 and run["metrics"]
    first_starts = [r["arrival"] for r in out["runs"][0]["records"] if r["turn"] == 0]
    assert first_starts[3] >= 3 / 20  # replayed at 20 sessions/s, not the file's 33
    names = {p.name for p in (tmp_path / "plots").iterdir()}
    assert names == {"latency_vs_rate.png", "cdf.png", "memory_20.png", "memory_40.png"}
    assert all((tmp_path / "plots" / n).read_bytes()[:4] == b"\x89PNG" for n in names)
    stdout = capsys.readouterr().out
    assert "fake (latencies in ms)" in stdout and "serviceable rate: 40 sessions/s" in stdout


@pytest.mark.slow
def test_bench_run_reports_zero_when_even_the_lowest_rate_misses(fake, tmp_path, capsys):
    two_turns(2).save(tmp_path / "w.jsonl")
    rc = bench("--workload", str(tmp_path / "w.jsonl"), "--url", fake.url, "--rates", "5", "10", "--search",
               "--slo-ttft", "0.01", "--slo-tpot", "1", "--out", str(tmp_path / "r.json"))
    out = json.loads((tmp_path / "r.json").read_text())
    assert rc == 0 and out["serviceable_rate"] == 0.0 and [r["rate"] for r in out["runs"]] == [5, 10]
    assert "serviceable rate: 0 sessions/s" in capsys.readouterr().out


@pytest.mark.slow
def test_bench_run_bad_input_exits_2_with_one_line(fake, tmp_path, capsys):
    assert bench("--workload", str(tmp_path / "nope.jsonl"), "--url", fake.url) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("loraserve bench: error: cannot read workload")
    two_turns(2).save(tmp_path / "w.jsonl")
    url = closed_url()
    assert bench("--workload", str(tmp_path / "w.jsonl"), "--url", url) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"loraserve bench: error: cannot reach {url}")
    assert bench("--workload", str(tmp_path / "w.jsonl"), "--url", fake.url, "--rates", "1", "--search") == 2
    assert "--search needs an SLO" in capsys.readouterr().err
