"""`loraserve simulate run | cluster | calibrate`."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from loraserve.cache.policy import POLICIES
from loraserve.config import CacheConfig, EngineConfig, SchedulerConfig
from loraserve.dtypes import CHOICES
from loraserve.flags import add_flag
from loraserve.sim.engine import SimConfig
from loraserve.sim.hardware import PROFILES
from loraserve.sim.models import PAPER_LORA_DTYPE_BYTES
from loraserve.units import format_bytes, parse_bytes


def add_parser(subparsers) -> argparse.ArgumentParser:
    s = subparsers.add_parser("simulate", help="run the engine's policies on a hardware model (capacity planning)")
    sub = s.add_subparsers(dest="simulate_command", required=True)

    r = sub.add_parser("run", help="simulate a workload file on a model and hardware")
    r.add_argument("--workload", required=True, help="workload file (`loraserve workload`)")
    r.add_argument("--model", required=True, help="preset (llama3-8b, mixtral-8x7b, ...) or a model directory")
    r.add_argument("--hardware", default="h100",
                   help=f"{', '.join(PROFILES)}, or a profile JSON (default: %(default)s)")
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

    k = sub.add_parser("cluster", help="a 16-GPU-style cluster, coupled or disaggregated (InfiniLoRA), on a "
                                       "BurstGPT-like Poisson workload")
    k.add_argument("--model", required=True, help="gpt-oss-20b, qwen3-30b-a3b, mixtral-8x7b, dbrx, scaled-moe")
    k.add_argument("--deployment", nargs="+", default=["disagg", "slora"],
                   help="slora, slora-sjf, slora-less, elora, disagg, disagg-naive, disagg+overlap, disagg+loading, "
                        "disagg-pull, disagg-nvlink, disagg-lru (default: %(default)s)")
    k.add_argument("--rate", type=float, required=True, help="requests/s (Poisson)")
    k.add_argument("--requests", type=int, default=200)
    k.add_argument("--adapters", type=int, default=512)
    k.add_argument("--zipf", type=float, default=1.2)
    k.add_argument("--hardware", default="h20")
    k.add_argument("--gpus", type=int, default=16, help="GPUs in all (default: %(default)s)")
    k.add_argument("--server-gpus", type=int, default=8, help="of them, the LoRA server's (disagg)")
    k.add_argument("--server-cache", type=parse_bytes,
                   help="the LoRA server's adapter cache (default: its GPUs' memory)")
    k.add_argument("--lora-dtype-bytes", type=int, default=PAPER_LORA_DTYPE_BYTES, choices=(2, 4),
                   help="bytes per adapter weight: 4 (fp32, the size InfiniLoRA states for its adapters) or 2 "
                        "(bf16) (default: %(default)s)")
    k.add_argument("--slo-ttft", type=float, default=0.25, help="P95 TTFT SLO, prefill excluded (s)")
    k.add_argument("--slo-tpot", type=float, default=0.1, help="mean TPOT SLO (s)")
    k.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    k.set_defaults(func=cmd_cluster)

    c = sub.add_parser("calibrate", help="fit a hardware profile to step times of the real engine here")
    c.add_argument("--model", required=True, help="model directory (HF format)")
    c.add_argument("--adapter", action="append", default=[], metavar="NAME=PATH", help="PEFT adapter (repeatable)")
    c.add_argument("--base", default="cpu", help="profile whose peaks the fit starts from")
    c.add_argument("--sessions", type=int, default=40, help="sessions of the measuring run (default: %(default)s)")
    c.add_argument("--rate", type=float, default=4.0, help="sessions/s of the measuring run")
    add_flag(c, "--dtype", EngineConfig, "dtype", choices=CHOICES)
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


def cmd_cluster(args: argparse.Namespace) -> int:
    from loraserve.bench.metrics import SLO
    from loraserve.sim.cluster import simulate_cluster
    from loraserve.sim.deployments import deployment
    from loraserve.sim.hardware import hardware
    from loraserve.sim.models import INFINILORA_MODELS, model_spec
    from loraserve.sim.run import adapter_sizes
    from loraserve.workload import generate
    from loraserve.workload.burstgpt import burstgpt_config

    if args.model not in INFINILORA_MODELS:
        raise ValueError(f"--model must be one of {', '.join(INFINILORA_MODELS)}")
    d, spec, hw = INFINILORA_MODELS[args.model], model_spec(args.model), hardware(args.hardware)
    wl = generate(burstgpt_config(args.requests, args.adapters, args.rate, args.zipf))
    sizes = adapter_sizes(wl.adapters, spec, d.rank, args.lora_dtype_bytes)
    slo = SLO(args.slo_ttft, args.slo_tpot)
    out = {}
    for name in args.deployment:
        extra = {"server_cache_bytes": args.server_cache} if name.startswith("disagg") else {}
        cfg = deployment(name, spec, hw, d.rank, d.gpus, sizes[wl.adapters[0]], len(sizes), args.gpus,
                         args.server_gpus, args.lora_dtype_bytes, **extra)
        res = simulate_cluster(wl, spec, hw, cfg, sizes, slo, warmup=0.25, lead_in=20.0)
        s, f = res.summary, res.summary_with_prefill
        out[name] = {"meets_slo": s["meets_slo"], "p95_ttft_s": s["ttft_s"]["p95"],
                     "p95_ttft_with_prefill_s": f["ttft_s"]["p95"], "mean_tpot_s": s["tpot_s"]["mean"],
                     "adapter_slo_attainment": s["adapter_slo_attainment"], "instances": res.stats["instances"]}
    if args.json:
        print(json.dumps({"model": args.model, "rate": args.rate, "results": out}))
        return 0
    print(f"{args.model} at {args.rate:g} req/s on {args.gpus}× {hw.name} (TTFT without prefill; SLO P95 "
          f"{args.slo_ttft:g} s, TPOT {args.slo_tpot:g} s)")
    for name, r in out.items():
        print(f"{name:>15}: P95 TTFT {_ms(r['p95_ttft_s']):>7} (with prefill {_ms(r['p95_ttft_with_prefill_s'])}),"
              f" TPOT {_ms(r['mean_tpot_s'])}, adapters in SLO {r['adapter_slo_attainment']:.2f},"
              f" {'meets' if r['meets_slo'] else 'misses'} the SLO")
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
