"""The disaggregated rungs of the InfiniLoRA ablation on Mixtral over several workload seeds.

`infinilora_sim.py` runs each rung once per seed. On seeds 1 and 2 the
"+layer-wise loading" rung came out 7-11% above "+overlap", the rung before
it, although layer-wise loading can only let a delta start earlier. This runs
the four rungs at each rate over seeds 1-8 (60 s of arrivals each, the main
script's run) and reports each P95 TTFT (prefill excluded), the mean over
seeds and naive's over the full system's, to tell a cost from a run's noise:
single requests of one run move by a large fraction of a second between two
runs whose timings differ slightly, as an instance's queue forms or not.

    python benchmarks/ladder_seeds.py [--rates 10 7.5 5] [--seeds 8]   # writes results/ladder_seeds.txt
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from infinilora_sim import ROOT, Bench, in_parallel  # noqa: E402

RUNGS = ("disagg-naive", "disagg+overlap", "disagg+loading", "disagg")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rates", type=float, nargs="+", default=[10.0, 7.5, 5.0],
                    help="req/s (10: disagg's serviceable rate on Mixtral, seed 1)")
    ap.add_argument("--seeds", type=int, default=8)
    ap.add_argument("--jobs", type=int, default=2)
    args = ap.parse_args()
    seeds = range(1, args.seeds + 1)
    calls = [(Bench(seed=s), "run", ("mixtral-8x7b", rung, rate), {})
             for rate in args.rates for s in seeds for rung in RUNGS]
    got = iter(in_parallel(calls, args.jobs))
    lines = []
    for rate in args.rates:
        p95 = {rung: [] for rung in RUNGS}
        for _ in seeds:
            for rung in RUNGS:
                p95[rung].append(next(got)["p95_ttft"])
        lines += [f"# Mixtral-8x7B at {rate:g} req/s, 60 s of arrivals, P95 TTFT (s, prefill excluded) per seed",
                  "| rung | " + " | ".join(f"seed {s}" for s in seeds) + " | mean |",
                  "|---|" + "---|" * (len(seeds) + 1)]
        for rung in RUNGS:
            lines.append(f"| {rung} | " + " | ".join(f"{v:.3f}" for v in p95[rung])
                         + f" | {statistics.mean(p95[rung]):.3f} |")
        later = sum(b > a for a, b in zip(p95["disagg+overlap"], p95["disagg+loading"]))
        lines += [f"\n+layer-wise loading above +overlap on {later} of {len(seeds)} seeds; naive / full system: "
                  f"{statistics.mean(p95['disagg-naive']) / statistics.mean(p95['disagg']):.1f}x over the means, "
                  + ", ".join(f"{n / f:.1f}x" for n, f in zip(p95["disagg-naive"], p95["disagg"])) + " per seed", ""]
    print("\n".join(lines))
    out = ROOT / "benchmarks" / "results" / "ladder_seeds.txt"
    out.write_text("\n".join(lines))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
