"""`loraserve workload`: generate a workload file, or convert a trace into one."""

from __future__ import annotations

import argparse

from loraserve.flags import add_flag
from loraserve.workload.arrivals import ARRIVALS, ArrivalConfig
from loraserve.workload.popularity import POPULARITY, PopularityConfig
from loraserve.workload.workload import LENGTHS, Lengths, WorkloadConfig, from_trace, generate


def add_parser(subparsers) -> argparse.ArgumentParser:
    w = subparsers.add_parser("workload", help="generate a workload file (or convert a CSV/JSONL trace)")
    w.add_argument("--out", required=True, help="workload file to write (JSONL)")
    w.add_argument("--trace", help="convert this trace (CSV/JSONL: timestamp, adapter, input_len, output_len"
                                   "[, session, turn]) instead of generating")
    add_flag(w, "--sessions", WorkloadConfig, "num_sessions", help="sessions to generate")
    add_flag(w, "--adapters", WorkloadConfig, "num_adapters", help="adapters named <prefix>0 .. <prefix>N-1")
    add_flag(w, "--adapter-prefix", WorkloadConfig, "adapter_prefix", help="adapter names' prefix")
    add_flag(w, "--base-fraction", WorkloadConfig, "base_fraction")
    add_flag(w, "--arrival", ArrivalConfig, "kind", choices=ARRIVALS, help="how sessions start")
    add_flag(w, "--rate", ArrivalConfig, "rate", help="sessions started per second")
    add_flag(w, "--cv", ArrivalConfig, "cv", help="gamma arrivals: coefficient of variation of the gaps")
    add_flag(w, "--on", ArrivalConfig, "on_s", help="onoff arrivals: seconds on")
    add_flag(w, "--off", ArrivalConfig, "off_s", help="onoff arrivals: seconds off")
    add_flag(w, "--popularity", PopularityConfig, "kind", choices=POPULARITY, help="which adapters sessions use")
    add_flag(w, "--zipf", PopularityConfig, "s", help="Zipf exponent (zipf, shifting)")
    add_flag(w, "--sigma", PopularityConfig, "sigma", help="gaussian popularity: spread as a share of adapters")
    add_flag(w, "--period", PopularityConfig, "period", help="shifting: seconds between rotations of the hot set")
    add_flag(w, "--shift", PopularityConfig, "shift", help="shifting: adapters rotated each period (0: a tenth)")
    add_flag(w, "--turns", WorkloadConfig, "turns", help="mean turns per session (geometric above 1)")
    add_flag(w, "--think", WorkloadConfig, "think_s", help="mean seconds between a reply and the next turn")
    add_flag(w, "--first-input", WorkloadConfig, "first_input.mean", help="mean tokens of a session's first prompt")
    add_flag(w, "--input", WorkloadConfig, "input.mean", help="mean new tokens of each later turn")
    add_flag(w, "--output", WorkloadConfig, "output.mean", help="mean output tokens")
    # the command line spreads lengths by default; a WorkloadConfig built in code keeps them fixed
    w.add_argument("--lengths", choices=LENGTHS, default="uniform",
                   help="distribution of all three lengths (default: %(default)s)")
    add_flag(w, "--spread", Lengths, "spread", help="uniform: ±share of the mean; lognormal: sigma")
    add_flag(w, "--seed", WorkloadConfig, "seed", help="seed of every random draw: the same flags give the same file")
    w.set_defaults(func=run)
    return w


def workload_config(args: argparse.Namespace) -> WorkloadConfig:
    """The `workload` flags as a WorkloadConfig."""
    def lengths(mean: int) -> Lengths:
        return Lengths(mean, args.lengths, args.spread)

    return WorkloadConfig(
        num_sessions=args.sessions, num_adapters=args.adapters, adapter_prefix=args.adapter_prefix,
        base_fraction=args.base_fraction,
        arrival=ArrivalConfig(args.arrival, args.rate, args.cv, args.on, args.off),
        popularity=PopularityConfig(args.popularity, args.zipf, args.sigma, args.period, args.shift),
        turns=args.turns, think_s=args.think, first_input=lengths(args.first_input), input=lengths(args.input),
        output=lengths(args.output), seed=args.seed)


def run(args: argparse.Namespace) -> int:
    wl = from_trace(args.trace) if args.trace else generate(workload_config(args))
    wl.save(args.out)
    print(f"{args.out}: {len(wl.sessions())} sessions, {wl.num_requests} requests, {len(wl.adapters)} adapters, "
          f"{wl.rate:.3g} sessions/s")
    return 0
