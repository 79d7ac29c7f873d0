"""`loraserve simulate run | calibrate`."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from loraserve.cache.policy import POLICIES
from loraserve.config import DTYPES, CacheConfig, EngineConfig, SchedulerConfig
from loraserve.flags import add_flag
from loraserve.sim.engine import SimConfig
from loraserve.units import format_bytes, parse_bytes


def add_parser(subparsers) -> argparse.ArgumentParser:
    s = subparsers.add_parser("simulate", help="run the engine's policies on a hardware model (capacity planning)")
    sub = s.add_subparsers(dest="simulate_command", required=True)

    r = sub.add_parser("run", help="simulate a workload file on a model and hardware")
    r.add_argument("--workload", required=True, help="workload file (`loraserve workload`)")
    r.add_argument("--model", required=True, help="preset (llama3-8b, mixtral-8x7b, ...) or a model directory")
    r.add_argument("--hardware", default="h100",
                   help="a100-80g, h100, h800, h20, cpu, or a profile JSON (default: %(default)s)")
    add_flag(r, "--tp", SimConfig, "tp", help="tensor-parallel degree")
    add_flag(r, "--dtype-bytes", SimConfig, "dtype_bytes", help="bytes per weight and KV element (2: bf16)")
    r.add_argument("--rank", type=int, default=32,
                   help="rank of every adapter (all seven projections; default: %(default)s)")
    r.add_argument("--policy", nargs="+", default=["elora", "vllm", "slora"], choices=list(POLICIES),
                   help="cache policies to compare (default: %(default)s)")
    r.add_argument("--rate", type=float, help="replay at this many sessions/s (default: the workload's)")
    add_flag(r, "--device-tier", SimConfig, "device_tier_bytes", type=parse_bytes,
             help="device tier bytes (default: memory left by the weights)")
    add_flag(r, "--mem-util", SimConfig, "mem_util", help="share of device memory for weights + device tier")
    add_flag(r, "--host-cache", CacheConfig, "host_bytes", type=parse_bytes, show=format_bytes, help="host tier bytes")
    add_flag(r, "--adapter-fraction", CacheConfig, "adapter_fraction")
    add_flag(r, "--block-size", CacheConfig, "block_size")
    add_flag(r, "--max-num-seqs", SchedulerConfig, "max_num_seqs")
    add_flag(r, "--max-num-batched-tokens", SchedulerConfig, "max_num_batched_tokens")
    add_flag(r, "--max-loras", SchedulerConfig, "max_loras")
    add_flag(r, "--max-model-len", SimConfig, "max_model_len", help="prompt + output limit")
    r.add_argument("--slo-ttft", type=float, help="TTFT SLO (s) on P95")
    r.add_argument("--slo-tpot", type=float, help="mean TPOT SLO (s)")
    r.add_argument("--out", help="write summaries (and per-request records) to this JSON file")
    r.add_argument("--plots", help="write PNG figures (CDFs, device memory by kind) into this directory")
    r.set_defaults(func=cmd_run)

    c = sub.add_parser("calibrate", help="fit a hardware profile to step times of the real engine here")
    c.add_argument("--model", required=True, help="model directory (HF format)")
    c.add_argument("--adapter", action="append", default=[], metavar="NAME=PATH", help="PEFT adapter (repeatable)")
    c.add_argument("--base", default="cpu", help="profile whose peaks the fit starts from")
    c.add_argument("--sessions", type=int, default=40, help="sessions of the measuring run (default: %(default)s)")
    c.add_argument("--rate", type=float, default=4.0, help="sessions/s of the measuring run")
    add_flag(c, "--dtype", EngineConfig, "dtype", choices=DTYPES)
    c.add_argument("--out", required=True, help="profile JSON to write (pass it to --hardware)")
    c.set_defaults(func=cmd_calibrate)
    return s


def sim_config(args: argparse.Namespace, policy: str) -> SimConfig:
    """The `simulate run` flags as the SimConfig of one policy."""
    return SimConfig(tp=args.tp, dtype_bytes=args.dtype_bytes, mem_util=args.mem_util,
                     max_model_len=args.max_model_len, device_tier_bytes=args.device_tier,
                     cache=CacheConfig(block_size=args.block_size, policy=policy, host_bytes=args.host_cache,
                                       adapter_fraction=args.adapter_fraction),
                     scheduler=SchedulerConfig(max_num_seqs=args.max_num_seqs,
                                               max_num_batched_tokens=args.max_num_batched_tokens,
                                               max_loras=args.max_loras))


def cmd_run(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from loraserve.bench.metrics import SLO
    from loraserve.sim.hardware import hardware
    from loraserve.sim.models import model_spec
    from loraserve.sim.run import adapter_sizes, simulate
    from loraserve.workload import Workload

    wl = Workload.load(args.workload)
    if args.rate:
        wl = wl.at_rate(args.rate)
    spec, hw = model_spec(args.model), hardware(args.hardware)
    if (args.slo_ttft is None) != (args.slo_tpot is None):
        raise ValueError("give both --slo-ttft and --slo-tpot, or neither")
    slo = SLO(args.slo_ttft, args.slo_tpot) if args.slo_ttft is not None else None
    sizes = adapter_sizes(wl.adapters, spec, args.rank, args.dtype_bytes)
    results = {}
    for policy in args.policy:
        cfg = sim_config(args, policy)
        with tqdm(total=wl.num_requests, desc=policy, unit="req", leave=False, disable=None) as bar:
            results[policy] = simulate(wl, spec, hw, cfg, sizes, slo, progress=bar)
    print(f"{wl.num_requests} requests at {wl.rate:.3g} sessions/s, {args.model} on {args.tp}× {hw.name}")
    print(f"{'policy':>10} {'TTFT mean':>10} {'P95':>8} {'TPOT mean':>10} {'P95':>7}  adapter-hit  kv-hit  wall")
    for policy, res in results.items():
        t, p, st = res.summary["ttft_s"], res.summary["tpot_s"], res.stats
        print(f"{policy:>10} {_ms(t['mean']):>10} {_ms(t['p95']):>8} {_ms(p['mean']):>10} {_ms(p['p95']):>7}"
              f"  {st['adapter_hit_rate']:11.2f} {st['kv_hit_rate']:7.2f} {res.wall_s:5.1f}s")
    if args.out:
        Path(args.out).write_text(json.dumps({
            "args": {k: v for k, v in vars(args).items() if k != "func"},
            "results": {p: {"summary": r.summary, "stats": r.stats, "memory": r.memory,
                            "records": [vars(x) for x in r.records]} for p, r in results.items()}}, indent=1))
    if args.plots:
        from loraserve.bench import plots

        Path(args.plots).mkdir(parents=True, exist_ok=True)
        plots.latency_cdfs({p: r.records for p, r in results.items()}, Path(args.plots) / "cdf.png")
        for p, r in results.items():
            plots.memory_over_time(r.memory, Path(args.plots) / f"memory_{p}.png")
    return 0


def _ms(x: float | None) -> str:
    return "-" if x is None else f"{1e3 * x:.0f}ms"


def cmd_calibrate(args: argparse.Namespace) -> int:
    from loraserve.sim.calibrate import fit, measure
    from loraserve.sim.hardware import hardware
    from loraserve.workload import ArrivalConfig, Lengths, WorkloadConfig, generate

    adapters = dict(a.split("=", 1) for a in args.adapter)
    names = list(adapters)
    wl = generate(WorkloadConfig(num_sessions=args.sessions, num_adapters=len(names), turns=2, think_s=0.5,
                                 arrival=ArrivalConfig(rate=args.rate), first_input=Lengths(96, "uniform"),
                                 input=Lengths(24, "uniform"), output=Lengths(32, "uniform")))
    wl = wl.renamed(names) if names else wl
    base = hardware(args.base)
    samples, _, _ = measure(EngineConfig(model=args.model, dtype=args.dtype, cache=CacheConfig()), adapters, wl, base)
    fitted, err = fit(samples, base)
    fitted.save(args.out)
    print(f"{args.out}: fitted on {len(samples)} steps, mean error {err:.1%} per step: flops_eff "
          f"{fitted.flops_eff:.3f} bw_eff {fitted.bw_eff:.3f} step {1e3 * fitted.step_overhead:.2f} ms "
          f"per seq {1e6 * fitted.seq_overhead:.0f} µs per token {1e6 * fitted.token_overhead:.1f} µs")
    return 0
