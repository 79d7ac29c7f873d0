"""The disaggregated rungs of the InfiniLoRA ablation on Mixtral over many workload seeds.

`infinilora_sim.py` runs each rung once per seed, and one run's P95 TTFT is
a noisy reading: the P95 of a few hundred judged requests is decided by the
dozen that arrived behind another request's long prefill on their instance,
and which those are depends on the least-loaded router's choices, which
shift as soon as two runs' step timings differ by a millisecond. On seeds
1-8 "+layer-wise loading" came out above "+overlap" at 7.5 and 5 req/s on 7
and 6 seeds, although layer-wise loading can only let a delta start
earlier. This runs the four rungs at each rate over many seeds (60 s of
arrivals each, the main script's run) and reports each P95 TTFT (prefill
excluded), the mean over seeds, and for each rung against the one before it
the paired difference (mean over seeds ± its standard error) and on how
many seeds it is higher: a cost must show in the mean difference, not in
one seed's table. It also reports what the layer-wise rung acts on directly:
the median TTFT of the requests that waited for their adapter's copy to the
server's device tier (`ClusterResult.stats["cold"]`).

    python benchmarks/ladder_seeds.py [--rates 10 7.5 5] [--seeds 16]   # writes results/ladder_seeds.txt
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from infinilora_sim import ROOT, Bench, in_parallel  # noqa: E402

RUNGS = ("disagg-naive", "disagg+overlap", "disagg+loading", "disagg")


def paired(before: list[float | None], after: list[float | None], ms: bool = False) -> str:
    """after − before over the seeds that have both (seconds, shown in s or ms): mean ± standard
    error, and on how many seeds `after` is higher."""
    scale, digits, unit = (1e3, 1, "ms") if ms else (1.0, 3, "s")
    diff = [scale * (b - a) for a, b in zip(before, after) if a is not None and b is not None]
    se = statistics.stdev(diff) / len(diff) ** 0.5 if len(diff) > 1 else float("nan")
    higher = sum(d > 0 for d in diff)
    return f"{statistics.mean(diff):+.{digits}f} ± {se:.{digits}f} {unit} (higher on {higher} of {len(diff)} seeds)"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rates", type=float, nargs="+", default=[10.0, 7.5, 5.0],
                    help="req/s (10: disagg's serviceable rate on Mixtral, seed 1)")
    ap.add_argument("--seeds", type=int, default=16)
    ap.add_argument("--jobs", type=int, default=2)
    args = ap.parse_args()
    seeds = range(1, args.seeds + 1)
    calls = [(Bench(seed=s), "run", ("mixtral-8x7b", rung, rate), {})
             for rate in args.rates for s in seeds for rung in RUNGS]
    got = iter(in_parallel(calls, args.jobs))
    lines = []
    for rate in args.rates:
        p95 = {rung: [] for rung in RUNGS}
        cold = {rung: [] for rung in RUNGS}
        for _ in seeds:
            for rung in RUNGS:
                run = next(got)
                p95[rung].append(run["p95_ttft"])
                cold[rung].append(run["cold_median_ttft"])
        lines += [f"# Mixtral-8x7B at {rate:g} req/s, 60 s of arrivals, P95 TTFT (s, prefill excluded) per seed",
                  "| rung | " + " | ".join(f"seed {s}" for s in seeds) + " | mean | median | against the rung before |",
                  "|---|" + "---|" * (len(seeds) + 3)]
        for k, rung in enumerate(RUNGS):
            step = paired(p95[RUNGS[k - 1]], p95[rung]) if k else ""
            lines.append(f"| {rung} | " + " | ".join(f"{v:.3f}" for v in p95[rung])
                         + f" | {statistics.mean(p95[rung]):.3f} | {statistics.median(p95[rung]):.3f} | {step} |")
        naive, full = p95["disagg-naive"], p95["disagg"]
        lines += [f"\nnaive / full system: {statistics.mean(naive) / statistics.mean(full):.1f}x over the means, "
                  f"{statistics.median(naive) / statistics.median(full):.1f}x over the medians; per seed "
                  + ", ".join(f"{n / f:.1f}x" for n, f in zip(naive, full)),
                  "\nWhat layer-wise loading can shorten: the median TTFT (prefill excluded) of the requests whose "
                  "adapter was not on the server's device tier (or still on its way) when they arrived, mean over "
                  "seeds (runs without one left out): "
                  + "; ".join(f"{rung} {1e3 * statistics.mean(v for v in cold[rung] if v is not None):.1f} ms"
                              for rung in RUNGS)
                  + "; +layer-wise loading against +overlap: "
                  + paired(cold["disagg+overlap"], cold["disagg+loading"], ms=True),
                  ""]
    print("\n".join(lines))
    out = ROOT / "benchmarks" / "results" / "ladder_seeds.txt"
    out.write_text("\n".join(lines))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
