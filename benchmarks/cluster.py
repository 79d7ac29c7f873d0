"""Scale-out on Ray Serve (issue 16), on this machine: what the endpoint costs
and what routing buys.

1. Endpoint overhead: the same tiny engine served by one process (`serve`) and
   as one Ray Serve replica behind the endpoint (`serve --replicas 1`), both up
   at once; short streaming requests alternate between them. The figure is the
   difference of the median TTFTs (and of p90).
2. Load: the project's load client (`loraserve bench`'s `run_workload`) replays
   one multi-turn workload over 32 distinct rank-16 adapters (Zipf) against one
   process, 1 replica, 2 replicas routed by `affinity` and by `round-robin`, and
   2 replicas calling a LoRA server actor (`--lora-server-ranks 1x1`).
   Each replica's device tier holds about 8 of the 32 adapters beside its KV, so
   where a request lands decides adapter hits; later turns decide KV hits.

A 2-core box can show the routing's effect on hit rates and the endpoint's cost;
it cannot show throughput scaling: every engine gets one torch thread (one
process, one replica, or each of two replicas), the endpoint and Ray's own
processes share the same two cores, and the tiny model's steps are short, so
per-request overheads weigh more than they would on a GPU.

    python benchmarks/cluster.py            # both parts (~12 minutes)
    python benchmarks/cluster.py --quick    # fewer requests
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))
from disagg import fresh_adapters, model, scrape, serve  # noqa: E402
from remote_roundtrip import free_port, git_commit, machine, stop, write_results  # noqa: E402

from loraserve.bench.client import run_workload_sync  # noqa: E402
from loraserve.bench.metrics import summarize  # noqa: E402
from loraserve.workload import ArrivalConfig, Lengths, PopularityConfig, WorkloadConfig, generate  # noqa: E402

OUT = Path(__file__).resolve().parent / "results" / "cluster.json"
DEVICE = str(4 << 20)
"""Each engine's device tier: 341 blocks of tiny-llama, ~8 rank-16 adapters (24 blocks each) beside the KV."""


def ttft(port: int, n_tokens: int = 4) -> float:
    start = time.perf_counter()
    with httpx.stream("POST", f"http://127.0.0.1:{port}/v1/completions", timeout=60,
                      json={"model": "base", "prompt": "Hello there", "max_tokens": n_tokens, "stream": True}) as r:
        for line in r.iter_lines():
            if line.startswith("data:") and '"text"' in line:
                return time.perf_counter() - start
    raise RuntimeError("no token came")


def overhead(model_dir: Path, n: int) -> dict:
    ports = {"one process": free_port(), "endpoint + 1 replica": free_port()}
    procs = []
    try:
        procs.append(serve(model_dir, ports["one process"], 1, "--dtype", "float32", "--device-cache", DEVICE))
        procs.append(serve(model_dir, ports["endpoint + 1 replica"], 1, "--dtype", "float32", "--device-cache",
                           DEVICE, "--replicas", "1", "--replica-cpus", "1"))
        times: dict[str, list[float]] = {k: [] for k in ports}
        for i in range(n + 5):
            for name, port in ports.items():
                t = ttft(port)
                if i >= 5:  # warm-up
                    times[name].append(t)
        out = {name: {"median_ms": 1e3 * statistics.median(t), "p90_ms": 1e3 * sorted(t)[int(0.9 * len(t))]}
               for name, t in times.items()}
        out["added_median_ms"] = out["endpoint + 1 replica"]["median_ms"] - out["one process"]["median_ms"]
        out["added_p90_ms"] = out["endpoint + 1 replica"]["p90_ms"] - out["one process"]["p90_ms"]
        out["requests_each"] = n
        return out
    finally:
        for p in procs:
            stop(p)


def load(model_dir: Path, adapters: dict[str, Path], sessions: int, rate: float) -> dict:
    wl = generate(WorkloadConfig(num_sessions=sessions, num_adapters=len(adapters), adapter_prefix="lora-",
                                 arrival=ArrivalConfig(kind="poisson", rate=rate),
                                 popularity=PopularityConfig(kind="zipf", s=1.0), turns=3.0, think_s=1.0,
                                 first_input=Lengths(96), input=Lengths(24), output=Lengths(24), seed=7))
    lora = [a for name, path in adapters.items() for a in ("--lora", f"{name}={path}")]
    systems = {"one process": [], "1 replica": ["--replicas", "1", "--replica-cpus", "1"],
               "2 replicas, affinity": ["--replicas", "2", "--replica-cpus", "1", "--routing", "affinity"],
               "2 replicas, round-robin": ["--replicas", "2", "--replica-cpus", "1", "--routing", "round-robin"],
               "2 replicas + LoRA server actor": ["--replicas", "2", "--replica-cpus", "1", "--lora-server-ranks",
                                                  "1x1"]}
    out = {"requests": wl.num_requests, "sessions": sessions, "rate": rate}
    for name, extra in systems.items():
        port = free_port()
        # one torch thread per engine: two replicas get a core each, and one engine is not starved by Ray's own
        # processes (two OpenMP threads on two busy cores run several times slower)
        proc = serve(model_dir, port, 1, "--dtype", "float32", "--device-cache", DEVICE, *lora, *extra, timeout=600)
        try:
            result = run_workload_sync(wl, f"http://127.0.0.1:{port}/v1", "base", progress=False, timeout=120)
            m = scrape(port)
        finally:
            stop(proc)
        s = summarize(result.records)
        routed = {k: v for k, v in m.items() if k.startswith("loraserve_routed_requests_total")}
        reasons: dict[str, float] = {}
        for k, v in routed.items():
            reason = k.split('reason="')[1].split('"')[0]
            reasons[reason] = reasons.get(reason, 0) + v
        out[name] = {"ttft_p50_s": s["ttft_s"]["p50"], "ttft_p95_s": s["ttft_s"]["p95"],
                     "tpot_mean_s": s["tpot_s"]["mean"], "output_tok_s": s["output_throughput_tok_s"],
                     "failed": s["failed"],
                     "adapter_hit_rate": m.get("loraserve_adapter_hit_rate"),
                     "kv_hit_rate": m.get("loraserve_kv_hit_rate"), "routed": reasons}
        print(name, out[name], flush=True)
    return out


def table(r: dict) -> str:
    lines = [f"# Scale-out on Ray Serve, {r['machine'].get('model_name', '?')} family {r['machine'].get('family', '?')} ({r['machine'].get('class', '?')}), "
             f"commit {r['commit']}", ""]
    if "overhead" in r:
        lines += overhead_table(r["overhead"])
    if "load" in r:
        lines += load_table(r["load"])
    return "\n".join(lines) + "\n"


def overhead_table(o: dict) -> list[str]:
    lines = [f"## Endpoint overhead (tiny-llama, {o['requests_each']} alternating requests each, TTFT of a 4-token stream)",
             "", "| path | median TTFT ms | p90 ms |", "|---|---|---|"]
    for name in ("one process", "endpoint + 1 replica"):
        lines.append(f"| {name} | {o[name]['median_ms']:.1f} | {o[name]['p90_ms']:.1f} |")
    return lines + ["", f"added by the endpoint: median {o['added_median_ms']:+.1f} ms, p90 {o['added_p90_ms']:+.1f} ms",
                     ""]


def load_table(ld: dict) -> list[str]:
    lines = [f"## Load: {ld['requests']} requests ({ld['sessions']} sessions × ~3 turns, {ld['rate']} sessions/s), "
              "32 adapters (Zipf 1.0), ~8 fit a replica's device tier", "",
              "| system | TTFT p50 s | TTFT p95 s | TPOT ms | output tok/s | adapter hit | KV hit | routed (session/adapter/load) | failed |",
              "|---|---|---|---|---|---|---|---|---|"]
    for name in ("one process", "1 replica", "2 replicas, affinity", "2 replicas, round-robin",
                 "2 replicas + LoRA server actor"):
        x = ld[name]
        routed = "/".join(str(int(x["routed"].get(k, 0))) for k in ("session", "adapter", "load")) if x["routed"] else "-"
        lines.append(f"| {name} | {x['ttft_p50_s']:.3f} | {x['ttft_p95_s']:.3f} | {1e3 * x['tpot_mean_s']:.1f} | "
                     f"{x['output_tok_s']:.1f} | {x['adapter_hit_rate']:.2f} | {x['kv_hit_rate']:.2f} | {routed} | "
                     f"{x['failed']} |")
    return lines


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--out", type=Path, default=OUT)
    ap.add_argument("--only", choices=["overhead", "load"], help="one part (the table then shows only it)")
    args = ap.parse_args()
    model_dir, _, template = model("tiny-llama")
    adapters = fresh_adapters("tiny-llama", template, 32)
    result = {"commit": git_commit(), "machine": machine()}
    if args.only != "load":
        result["overhead"] = overhead(model_dir, 20 if args.quick else 150)
        print(result["overhead"], flush=True)
    if args.only != "overhead":
        result["load"] = load(model_dir, adapters, 20 if args.quick else 60, 2.0)
    write_results(result, args.out, table)


if __name__ == "__main__":
    main()
