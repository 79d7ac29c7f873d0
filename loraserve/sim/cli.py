"""`loraserve simulate run | calibrate`."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from loraserve.cache.policy import POLICIES
from loraserve.units import parse_bytes


def add_parser(subparsers) -> argparse.ArgumentParser:
    s = subparsers.add_parser("simulate", help="run the engine's policies on a hardware model (capacity planning)")
    sub = s.add_subparsers(dest="simulate_command", required=True)

    r = sub.add_parser("run", help="simulate a workload file on a model and hardware")
    r.add_argument("--workload", required=True, help="workload file (`loraserve workload`)")
    r.add_argument("--model", required=True, help="preset (llama3-8b, mixtral-8x7b, ...) or a model directory")
    r.add_argument("--hardware", default="h100", help="a100-80g, h100, h800, h20, cpu, or a profile JSON")
    r.add_argument("--tp", type=int, default=1, help="tensor-parallel degree")
    r.add_argument("--dtype-bytes", type=int, default=2, help="bytes per weight and KV element (2: bf16)")
    r.add_argument("--rank", type=int, default=32, help="rank of every adapter (all seven projections)")
    r.add_argument("--policy", nargs="+", default=["elora", "vllm", "slora"], choices=list(POLICIES))
    r.add_argument("--rate", type=float, help="replay at this many sessions/s (default: the workload's)")
    r.add_argument("--device-tier", type=parse_bytes, help="device tier bytes (default: memory left by the weights)")
    r.add_argument("--mem-util", type=float, default=0.9, help="share of device memory for weights + device tier")
    r.add_argument("--host-cache", type=parse_bytes, default=parse_bytes("64GiB"), help="host tier bytes")
    r.add_argument("--adapter-fraction", type=float, default=0.2, help="vllm policy: device share for adapters")
    r.add_argument("--block-size", type=int, default=16)
    r.add_argument("--max-num-seqs", type=int, default=256)
    r.add_argument("--max-num-batched-tokens", type=int, default=8192)
    r.add_argument("--max-loras", type=int, default=32)
    r.add_argument("--max-model-len", type=int, default=8192)
    r.add_argument("--slo-ttft", type=float, help="TTFT SLO (s) on P95")
    r.add_argument("--slo-tpot", type=float, help="mean TPOT SLO (s)")
    r.add_argument("--out", help="write summaries (and per-request records) to this JSON file")
    r.add_argument("--plots", help="write PNG figures (CDFs, device memory by kind) into this directory")
    r.set_defaults(func=cmd_run)

    c = sub.add_parser("calibrate", help="fit a hardware profile to step times of the real engine here")
    c.add_argument("--model", required=True, help="model directory (HF format)")
    c.add_argument("--adapter", action="append", default=[], metavar="NAME=PATH", help="PEFT adapter (repeatable)")
    c.add_argument("--base", default="cpu", help="profile whose peaks the fit starts from")
    c.add_argument("--sessions", type=int, default=40)
    c.add_argument("--rate", type=float, default=4.0, help="sessions/s of the measuring run")
    c.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    c.add_argument("--out", required=True, help="profile JSON to write (pass it to --hardware)")
    c.set_defaults(func=cmd_calibrate)
    return s


def cmd_run(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from loraserve.bench.metrics import SLO
    from loraserve.config import CacheConfig, SchedulerConfig
    from loraserve.sim.engine import SimConfig
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
        cfg = SimConfig(tp=args.tp, dtype_bytes=args.dtype_bytes, mem_util=args.mem_util,
                        max_model_len=args.max_model_len, device_tier_bytes=args.device_tier,
                        cache=CacheConfig(block_size=args.block_size, policy=policy, host_bytes=args.host_cache,
                                          adapter_fraction=args.adapter_fraction),
                        scheduler=SchedulerConfig(args.max_num_seqs, args.max_num_batched_tokens, args.max_loras))
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
    from loraserve.config import CacheConfig, EngineConfig
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
