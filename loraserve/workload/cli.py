"""`loraserve workload`: generate a workload file, or convert a trace into one."""

from __future__ import annotations

import argparse

from loraserve.workload.arrivals import ARRIVALS, ArrivalConfig
from loraserve.workload.popularity import POPULARITY, PopularityConfig
from loraserve.workload.workload import LENGTHS, Lengths, WorkloadConfig, from_trace, generate


def add_parser(subparsers) -> argparse.ArgumentParser:
    w = subparsers.add_parser("workload", help="generate a workload file (or convert a CSV/JSONL trace)")
    w.add_argument("--out", required=True, help="workload file to write (JSONL)")
    w.add_argument("--trace", help="convert this trace (CSV/JSONL: timestamp, adapter, input_len, output_len"
                                   "[, session, turn]) instead of generating")
    w.add_argument("--sessions", type=int, default=100)
    w.add_argument("--adapters", type=int, default=50, help="adapters named <prefix>0 .. <prefix>N-1")
    w.add_argument("--adapter-prefix", default="lora-")
    w.add_argument("--base-fraction", type=float, default=0.0, help="share of sessions on the base model")
    w.add_argument("--arrival", choices=ARRIVALS, default="poisson")
    w.add_argument("--rate", type=float, default=1.0, help="sessions started per second")
    w.add_argument("--cv", type=float, default=2.0, help="gamma arrivals: coefficient of variation of the gaps")
    w.add_argument("--on", type=float, default=5.0, help="onoff arrivals: seconds on")
    w.add_argument("--off", type=float, default=5.0, help="onoff arrivals: seconds off")
    w.add_argument("--popularity", choices=POPULARITY, default="zipf")
    w.add_argument("--zipf", type=float, default=1.0, help="Zipf exponent (zipf, shifting)")
    w.add_argument("--sigma", type=float, default=0.15, help="gaussian popularity: spread as a share of adapters")
    w.add_argument("--period", type=float, default=30.0, help="shifting: seconds between rotations of the hot set")
    w.add_argument("--shift", type=int, default=0, help="shifting: adapters rotated each period (0: a tenth)")
    w.add_argument("--turns", type=float, default=1.0, help="mean turns per session (geometric above 1)")
    w.add_argument("--think", type=float, default=5.0, help="mean seconds between a reply and the next turn")
    w.add_argument("--first-input", type=int, default=256, help="mean tokens of a session's first prompt")
    w.add_argument("--input", type=int, default=64, help="mean new tokens of each later turn")
    w.add_argument("--output", type=int, default=128, help="mean output tokens")
    w.add_argument("--lengths", choices=LENGTHS, default="uniform", help="distribution of all three lengths")
    w.add_argument("--spread", type=float, default=0.5, help="uniform: ±share of the mean; lognormal: sigma")
    w.add_argument("--seed", type=int, default=0)
    w.set_defaults(func=run)
    return w


def run(args: argparse.Namespace) -> int:
    if args.trace:
        wl = from_trace(args.trace)
    else:
        def lengths(mean: int) -> Lengths:
            return Lengths(mean, args.lengths, args.spread)

        wl = generate(WorkloadConfig(
            num_sessions=args.sessions, num_adapters=args.adapters, adapter_prefix=args.adapter_prefix,
            base_fraction=args.base_fraction,
            arrival=ArrivalConfig(args.arrival, args.rate, args.cv, args.on, args.off),
            popularity=PopularityConfig(args.popularity, args.zipf, args.sigma, args.period, args.shift),
            turns=args.turns, think_s=args.think, first_input=lengths(args.first_input), input=lengths(args.input),
            output=lengths(args.output), seed=args.seed))
    wl.save(args.out)
    print(f"{args.out}: {len(wl.sessions())} sessions, {wl.num_requests} requests, {len(wl.adapters)} adapters, "
          f"{wl.rate:.3g} sessions/s")
    return 0
