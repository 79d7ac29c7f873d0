"""`loraserve bench run`: replay a workload file against a server at one or
more rates, optionally search for the serviceable rate, and write JSON and plots.

Each rate is a separate replay of the same sessions (`Workload.at_rate`), so
runs differ only in load. The search reuses any rate already measured.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from urllib.parse import urlparse

import httpx

from loraserve.bench.client import BenchResult, run_workload, run_workload_sync
from loraserve.bench.metrics import SLO, serviceable_rate, summarize
from loraserve.flags import add_flag
from loraserve.workload import Workload


class BenchInputError(Exception):
    """Bad input: reported as one line on stderr, exit status 2."""


def add_parser(subparsers) -> argparse.ArgumentParser:
    """Add `bench run` to a `loraserve` subparsers object; `args.func` is `run`."""
    bench = subparsers.add_parser("bench", help="benchmark an OpenAI-compatible server with a workload")
    sub = bench.add_subparsers(dest="bench_command", required=True)
    r = sub.add_parser("run", help="replay a workload file at one or more rates")
    r.add_argument("--workload", required=True, help="workload JSONL file (`Workload.save`)")
    r.add_argument("--url", required=True, help="API base URL, e.g. http://127.0.0.1:8000/v1")
    add_flag(r, "--base-model", run_workload, "base_model", help="model name for turns without an adapter")
    r.add_argument("--api-key", default=os.environ.get("OPENAI_API_KEY"), help="bearer token (default: $OPENAI_API_KEY)")
    r.add_argument("--rate", type=float, help="replay at this many sessions/s (default: the workload's rate)")
    r.add_argument("--rates", type=float, nargs="+", help="replay once per rate (sessions/s)")
    r.add_argument("--search", action="store_true", help="bisect for the serviceable rate between min and max of --rates")
    add_flag(r, "--search-iters", serviceable_rate, "iters", help="bisection steps after checking both ends")
    r.add_argument("--slo-ttft", type=float, help="TTFT bound (s) on the --slo-percentile TTFT")
    r.add_argument("--slo-tpot", type=float, help="bound (s) on the mean time per output token")
    add_flag(r, "--slo-percentile", SLO, "ttft_percentile", help="TTFT percentile the SLO bounds")
    r.add_argument("--metrics-url", help="Prometheus endpoint to scrape during runs, e.g. http://host:port/metrics")
    add_flag(r, "--scrape-interval", run_workload, "scrape_interval", help="seconds between scrapes")
    add_flag(r, "--timeout", run_workload, "timeout", help="seconds a request may wait for its next chunk")
    r.add_argument("--out", help="write summaries, records and the serviceable rate to this JSON file")
    r.add_argument("--plots", help="write PNG figures into this directory")
    r.add_argument("--label", help="system name in tables and plots (default: the URL's host:port)")
    r.add_argument("--no-progress", action="store_true", help="no progress bar")
    r.set_defaults(func=run)
    return bench


def run(args: argparse.Namespace) -> int:
    try:
        return _run(args)
    except BenchInputError as e:
        print(f"loraserve bench: error: {e}", file=sys.stderr)
        return 2


def _run(args: argparse.Namespace) -> int:
    workload, slo, rates = _inputs(args)
    _check_reachable(args.url, args.api_key)
    label = args.label or urlparse(args.url).netloc or args.url
    runs: dict[float, tuple[BenchResult, dict]] = {}

    def measure(rate: float) -> dict:
        if rate not in runs:
            wl = workload if rate == workload.rate else workload.at_rate(rate)
            result = run_workload_sync(wl, args.url, args.base_model, api_key=args.api_key,
                                       metrics_url=args.metrics_url, scrape_interval=args.scrape_interval,
                                       progress=not args.no_progress, timeout=args.timeout)
            runs[rate] = result, summarize(result.records, slo)
        return runs[rate][1]

    for rate in rates:
        measure(rate)
    best = serviceable_rate(measure, slo, min(rates), max(rates), args.search_iters)[0] if args.search else None
    ordered = sorted(runs.items())
    print(format_table(label, [(rate, summary) for rate, (_, summary) in ordered]))
    if best is not None:
        print(f"serviceable rate: {best:g} sessions/s (SLO: P{slo.ttft_percentile:g} TTFT <= {slo.ttft:g} s, "
              f"mean TPOT <= {slo.tpot:g} s, no failures)")
    if args.out:
        _write_json(Path(args.out), args, label, slo, ordered, best)
    if args.plots:
        _write_plots(Path(args.plots), label, ordered)
    return 0


def _inputs(args: argparse.Namespace) -> tuple[Workload, SLO | None, list[float]]:
    try:
        workload = Workload.load(args.workload)
    except (OSError, ValueError, KeyError) as e:
        raise BenchInputError(f"cannot read workload {args.workload}: {e}") from None
    if args.rate is not None and args.rates:
        raise BenchInputError("give --rate or --rates, not both")
    rates = args.rates or [args.rate if args.rate is not None else workload.rate]
    if any(r <= 0 for r in rates):
        raise BenchInputError(f"rates must be positive, got {rates}")
    if (args.slo_ttft is None) != (args.slo_tpot is None):
        raise BenchInputError("an SLO needs both --slo-ttft and --slo-tpot")
    slo = SLO(args.slo_ttft, args.slo_tpot, args.slo_percentile) if args.slo_ttft is not None else None
    if args.search and (slo is None or len(set(rates)) < 2):
        raise BenchInputError("--search needs an SLO (--slo-ttft, --slo-tpot) and at least two distinct --rates")
    return workload, slo, rates


def _check_reachable(url: str, api_key: str | None) -> None:
    """Fail fast on a URL nothing answers at (any HTTP status means something does)."""
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    try:
        httpx.get(url.rstrip("/") + "/models", headers=headers, timeout=10.0)
    except (httpx.HTTPError, httpx.InvalidURL) as e:
        raise BenchInputError(f"cannot reach {url}: {e}") from None


def _ms(x: float | None) -> str:
    return "-" if x is None else f"{x * 1000:.1f}"


def _num(x: float | None, fmt: str = ".2f") -> str:
    return "-" if x is None else format(x, fmt)


def format_table(label: str, rows: list[tuple[float, dict]]) -> str:
    """One line per rate: counts, latencies (ms), throughput and SLO columns."""
    head = ["rate/s", "reqs", "fail", "TTFT mean", "p50", "p95", "p99", "TPOT mean", "p95", "tok/s", "req/s",
            "SLO att", "adapt att", "meets"]
    lines = [[f"{rate:g}", str(s["requests"]), str(s["failed"]), _ms(s["ttft_s"]["mean"]), _ms(s["ttft_s"]["p50"]),
              _ms(s["ttft_s"]["p95"]), _ms(s["ttft_s"]["p99"]), _ms(s["tpot_s"]["mean"]), _ms(s["tpot_s"]["p95"]),
              _num(s["output_throughput_tok_s"], ".1f"), _num(s["request_throughput_rps"]),
              _num(s["slo_attainment"]), _num(s["adapter_slo_attainment"]),
              "-" if s["meets_slo"] is None else ("yes" if s["meets_slo"] else "no")] for rate, s in rows]
    widths = [max(len(row[i]) for row in [head, *lines]) for i in range(len(head))]
    return "\n".join([f"{label} (latencies in ms)"] + ["  ".join(c.rjust(w) for c, w in zip(row, widths))
                                                         for row in [head, *lines]])


def _write_json(path: Path, args: argparse.Namespace, label: str, slo: SLO | None,
                runs: list[tuple[float, tuple[BenchResult, dict]]], best: float | None) -> None:
    out = {"label": label, "workload": str(args.workload), "url": args.url, "base_model": args.base_model,
           "slo": None if slo is None else {"ttft_s": slo.ttft, "tpot_s": slo.tpot,
                                            "ttft_percentile": slo.ttft_percentile},
           "serviceable_rate": best,
           "runs": [{"rate": rate, "summary": summary, **result.to_dict()} for rate, (result, summary) in runs]}
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(out, indent=1))


def _write_plots(folder: Path, label: str, runs: list[tuple[float, tuple[BenchResult, dict]]]) -> None:
    from loraserve.bench import plots  # matplotlib only when plotting: `loraserve` starts faster

    plots.latency_vs_rate({label: [(rate, summary) for rate, (_, summary) in runs]}, folder / "latency_vs_rate.png")
    plots.latency_cdfs({f"{label} @ {rate:g}/s": result.records for rate, (result, _) in runs}, folder / "cdf.png")
    for rate, (result, _) in runs:
        if result.metrics:
            plots.memory_over_time(result.metrics, folder / f"memory_{rate:g}.png")
