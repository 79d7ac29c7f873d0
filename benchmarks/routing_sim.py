"""Adapter-aware routing at scale, in the simulator (issue 16).

Coupled replicas, each a whole loraserve engine (the ELORA cache: adapters
beside KV in one device pool, history KV kept, idle prefetch), behind the
router the Ray Serve deployment calls (`loraserve/router`): 8, 16, 32 and 64
replicas, 1,000 adapters, multi-turn sessions. Routing policies compared on
the same workloads: `affinity` (a session's later turns to the replica holding
its history, else a replica with its adapter resident, else the least loaded,
within the imbalance bound), `round-robin`, and `least-loaded`.

Set-up: Llama3-8B in bf16 on one A10-class GPU per replica (the `a10` profile:
24 GB, 600 GB/s, 125 TFLOP/s; the weights leave ~6.6 GiB of device tier), 1,000
rank-16 adapters on all seven projections (80 MiB each: at most ~80 fit on a
replica's device beside no KV at all, so routing decides which replicas hold
which), every adapter waiting in host memory (a miss is an 80 MiB copy over
PCIe). Workload: elora_sim's `chatbot` (Zipf(1) popularity, 3 turns per
session on average, 3 s think time, 400-token first prompts, 100-token later
inputs, 128-token replies), sessions arriving (Poisson) for `--window` seconds at
a rate per replica, so the cluster's rate scales with it. The adapters are
registered in a shuffled order: ELORA's idle prefetch takes never-used adapters
in registration order, which would otherwise be the Zipf ranking itself.

SLO: P95 TTFT <= 1 s as the client sees it (prefill included: reusing a
session's history KV is one of the things routing decides) and mean TPOT <= 0.1 s,
judged on the requests after the first 25% of arrivals (caches start cold).

1. At a fixed rate per replica: P95 TTFT (all turns, later turns), mean TPOT,
   SLO attainment, adapter and KV hit rates and why the router chose as it did.
2. Serviceable rate per replica for each policy and replica count: from the fixed
   rate, steps of 1.25x up (or down) until the SLO is met at one rate and missed
   at the next (`loraserve.bench.metrics.bracket_rate`, infinilora_sim's search).

    python benchmarks/routing_sim.py              # the whole run: 24 simulations, ~30 CPU-minutes
    python benchmarks/routing_sim.py --no-search  # the fixed-rate comparison alone, ~14 CPU-minutes
    python benchmarks/routing_sim.py --quick      # 8 replicas at the fixed rate, ~1 minute

Each simulation drives the real scheduler and cache of every replica, ~50 us of
CPU per token decoded; a 64-replica simulation decodes ~2M tokens.
"""

from __future__ import annotations

import argparse
import random
import sys
import time
from dataclasses import replace
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from loraserve.bench.metrics import SLO, bracket_rate, percentile  # noqa: E402
from loraserve.sim.cluster import simulate_cluster  # noqa: E402
from loraserve.sim.deployments import deployment  # noqa: E402
from loraserve.sim.engine import device_tier_bytes  # noqa: E402
from loraserve.sim.hardware import PROFILES  # noqa: E402
from loraserve.sim.models import model_spec  # noqa: E402
from loraserve.sim.run import adapter_sizes  # noqa: E402
from elora_sim import workload  # noqa: E402  (sibling scripts)
from infinilora_sim import capped  # noqa: E402
from remote_roundtrip import git_commit, machine, write_results  # noqa: E402

MODEL, HW, RANK, ADAPTERS = "llama3-8b", "a10", 16, 1000
COUNTS = (8, 16, 32, 64)
POLICIES = ("affinity", "round-robin", "least-loaded")
SLO_ = SLO(1.0, 0.1)
WARMUP = 0.25
FIXED = 12.5
"""Sessions per second per replica of the fixed-rate comparison, and where every search starts."""

FACTOR, STEPS, ITERS = 1.25, 6, 0
WINDOW = 6.0
"""Seconds of session arrivals per simulation (later turns go on after it)."""


class Bench:
    """Simulations by (replicas, policy, rate), each run once: a search starting at the
    fixed rate reuses the fixed-rate run."""

    def __init__(self, window: float = WINDOW, seed: int = 1) -> None:
        self.window, self.seed = window, seed
        self.spec, self.hw = model_spec(MODEL), PROFILES[HW]
        names = [f"lora-{i}" for i in range(ADAPTERS)]
        random.Random(seed).shuffle(names)
        self.sizes = adapter_sizes(names, self.spec, RANK)
        self.runs: dict[tuple, dict] = {}
        self.sim_s = 0.0

    def config(self, replicas: int, policy: str):
        size = next(iter(self.sizes.values()))
        return replace(deployment("elora", self.spec, self.hw, RANK, 1, size, ADAPTERS, total_gpus=replicas),
                       router=policy)

    def run(self, replicas: int, policy: str, rate: float) -> dict:
        key = (replicas, policy, rate)
        if key not in self.runs:
            sessions = max(8, round(rate * replicas * self.window))
            wl = workload("chatbot", ADAPTERS, sessions, self.seed).at_rate(rate * replicas)
            res = simulate_cluster(wl, self.spec, self.hw, self.config(replicas, policy), self.sizes, SLO_, WARMUP)
            self.sim_s += res.wall_s
            s, st = res.summary_with_prefill, res.stats
            later = [r.ttft for r in res.records if r.ok and r.turn > 0]
            routed = sum(st["routed"].values())
            self.runs[key] = {
                "replicas": replicas, "policy": policy, "rate": rate, "cluster_rate": rate * replicas,
                "sessions": sessions, "requests": s["requests"], "meets": s["meets_slo"],
                "p95_ttft": s["ttft_s"]["p95"], "mean_ttft": s["ttft_s"]["mean"],
                "p95_ttft_later_turns": percentile(later, 95), "mean_tpot": s["tpot_s"]["mean"],
                "slo_attainment": s["slo_attainment"], "adapter_hit_rate": st["adapter_hit_rate"],
                "kv_hit_rate": st["kv_hit_rate"], "routed": {k: v / routed for k, v in st["routed"].items()},
                "preemptions": st["preemptions"], "wall_s": round(res.wall_s, 1)}
        return self.runs[key]

    def serviceable(self, replicas: int, policy: str, start: float) -> dict:
        history = []

        def ok(rate: float) -> bool:
            history.append(self.run(replicas, policy, rate))
            return history[-1]["meets"]

        rate = bracket_rate(ok, start, STEPS, ITERS, FACTOR)
        missed = [h["rate"] for h in history if not h["meets"] and h["rate"] > rate]
        return {"rate": rate, "missed_at": min(missed) if missed else None, "capped": capped(history),
                "tried": [(h["rate"], h["meets"]) for h in history]}


def setup(bench: Bench) -> dict:
    cfg = bench.config(8, "affinity")
    size = next(iter(bench.sizes.values()))
    return {"model": MODEL, "hardware": HW, "rank": RANK, "adapters": ADAPTERS, "adapter_mib": size / 2**20,
            "device_tier_gib": round(device_tier_bytes(bench.spec, bench.hw, cfg.sim) / 2**30, 2),
            "host_tier_gib": round(cfg.sim.cache.host_bytes / 2**30, 1), "cache_policy": cfg.sim.cache.policy,
            "scheduler": vars(cfg.sim.scheduler), "lora_eff": cfg.sim.lora_eff, "window_s": bench.window,
            "workload": "elora_sim chatbot (Zipf 1.0, 3 turns, 3 s think, 400/100 in, 128 out)",
            "slo": {"p95_ttft_s": SLO_.ttft, "mean_tpot_s": SLO_.tpot, "ttft": "including prefill"},
            "warmup_share": WARMUP, "fixed_rate_per_replica": FIXED,
            "search": {"start": FIXED, "factor": FACTOR, "steps": STEPS, "bisections": ITERS}}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="8 replicas at the fixed rate, no search")
    ap.add_argument("--counts", type=int, nargs="+", default=list(COUNTS))
    ap.add_argument("--window", type=float, default=WINDOW, help="seconds of session arrivals per simulation")
    ap.add_argument("--no-search", action="store_true", help="the fixed-rate comparison only")
    ap.add_argument("--out", default=None, help="JSON path (default benchmarks/results/routing_sim[-quick].json)")
    args = ap.parse_args()
    counts = [8] if args.quick else args.counts
    out = Path(args.out or ROOT / "benchmarks" / "results" / f"routing_sim{'-quick' if args.quick else ''}.json")
    start = time.perf_counter()
    bench = Bench(args.window)
    result: dict = {"machine": machine(), "commit": git_commit(), "setup": setup(bench), "fixed": {},
                    "serviceable": {}}
    for n in counts:
        result["fixed"][n] = {p: bench.run(n, p, FIXED) for p in POLICIES}
        print(f"{n:>3} replicas at {FIXED} sessions/s each: "
              + ", ".join(f"{p} P95 TTFT {r['p95_ttft']:.3f} s" for p, r in result["fixed"][n].items())
              + f"  ({time.perf_counter() - start:.0f} s)", flush=True)
        if not (args.no_search or args.quick):
            result["serviceable"][n] = {p: bench.serviceable(n, p, FIXED) for p in POLICIES}
            print(f"{n:>3} replicas, serviceable sessions/s per replica: "
                  + ", ".join(f"{p} {s['rate']:.2f}" for p, s in result["serviceable"][n].items())
                  + f"  ({time.perf_counter() - start:.0f} s)", flush=True)
    result["sims"], result["sim_s"] = len(bench.runs), round(bench.sim_s, 1)
    result["runs"] = list(bench.runs.values())
    result["wall_s"] = round(time.perf_counter() - start, 1)
    result["cpu_s"] = round(time.process_time(), 1)  # this process's CPU time: the machine is shared
    write_results(result, out, table)


def table(r: dict) -> str:
    s = r["setup"]
    lines = [f"Routing policies in the simulator: {s['model']} on one {s['hardware']} per replica, {s['adapters']} "
             f"rank-{s['rank']} adapters ({s['adapter_mib']:.0f} MiB), device tier {s['device_tier_gib']} GiB, "
             f"commit {r['commit']}, {r['sims']} sims, wall {r['wall_s']} s (CPU {r['cpu_s']} s), "
             f"loadavg {r['machine']['loadavg']} -> {r.get('loadavg_end')}", "",
             f"At {s['fixed_rate_per_replica']} sessions/s per replica ({s['window_s']} s of arrivals); SLO P95 TTFT "
             f"<= {s['slo']['p95_ttft_s']} s (prefill included), mean TPOT <= {s['slo']['mean_tpot_s']} s", "",
             "| replicas | policy | P95 TTFT (s) | P95 TTFT, later turns (s) | mean TPOT (ms) | in SLO | adapter hit "
             "| KV hit | routed: session / adapter / load | preemptions |", "|---|---|---|---|---|---|---|---|---|---|"]
    for n, rows in r["fixed"].items():
        for p, x in rows.items():
            why = " / ".join(f"{x['routed'][k]:.2f}" for k in ("session", "adapter", "load"))
            lines.append(f"| {n} | {p} | {x['p95_ttft']:.3f} | {x['p95_ttft_later_turns']:.3f} | "
                         f"{1000 * x['mean_tpot']:.1f} | {x['slo_attainment']:.3f} | {x['adapter_hit_rate']:.3f} | "
                         f"{x['kv_hit_rate']:.3f} | {why} | {x['preemptions']} |")
    if r["serviceable"]:
        lines += ["", f"Serviceable rate, sessions/s per replica (met at the rate shown, missed at the next step of "
                      f"{s['search']['factor']}x; +: met at the search's ceiling)", "",
                  "| replicas | " + " | ".join(POLICIES) + " | affinity / round-robin |", "|---|---|---|---|---|"]
        for n, rows in r["serviceable"].items():
            cells = [f"{x['rate']:.2f}{'+' if x['capped'] else ''}" for x in rows.values()]
            rr = rows["round-robin"]["rate"]
            ratio = f"{rows['affinity']['rate'] / rr:.2f}" if rr else "n/a"
            lines.append(f"| {n} | " + " | ".join(cells) + f" | {ratio} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
