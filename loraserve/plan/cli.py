"""`loraserve plan`: the LoRA server's cache and GPU count for an SLO."""

from __future__ import annotations

import argparse
import json

from loraserve.flags import add_flag
from loraserve.plan.provision import CACHE_MODELS, Plan, PlanInput, provision


def add_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser("plan", help="size the LoRA server's cache and GPUs for a TTFT/TPOT SLO "
                                           "(a reconstruction of InfiniLoRA's provisioning)")
    p.add_argument("--model", required=True, help="preset (mixtral-8x7b, qwen3-30b-a3b, ...) or a model directory")
    add_flag(p, "--adapters", PlanInput, "adapters", type=int)
    add_flag(p, "--zipf", PlanInput, "zipf", type=float)
    add_flag(p, "--workload", PlanInput, "workload")
    add_flag(p, "--fit-zipf", PlanInput, "fit_zipf", action="store_true")
    add_flag(p, "--rate", PlanInput, "rate", type=float)
    add_flag(p, "--slo-ttft", PlanInput, "slo_ttft")
    add_flag(p, "--slo-tpot", PlanInput, "slo_tpot")
    add_flag(p, "--quantile", PlanInput, "quantile")
    add_flag(p, "--hardware", PlanInput, "hardware", help="GPU profile name or a profile JSON")
    add_flag(p, "--rank", PlanInput, "rank")
    add_flag(p, "--dtype-bytes", PlanInput, "dtype_bytes")
    add_flag(p, "--lora-dtype-bytes", PlanInput, "lora_dtype_bytes", type=int)
    add_flag(p, "--mean-input", PlanInput, "mean_input", type=float)
    add_flag(p, "--mean-output", PlanInput, "mean_output", type=float)
    add_flag(p, "--cache-model", PlanInput, "cache_model", choices=CACHE_MODELS)
    add_flag(p, "--layerwise", PlanInput, "layerwise", action=argparse.BooleanOptionalAction)
    add_flag(p, "--load-bw", PlanInput, "load_bw", type=float)
    add_flag(p, "--load-latency", PlanInput, "load_latency_s", type=float)
    add_flag(p, "--load-s", PlanInput, "load_s", type=float)
    add_flag(p, "--load-links", PlanInput, "load_links")
    add_flag(p, "--instances", PlanInput, "instances")
    add_flag(p, "--instance-gpus", PlanInput, "instance_gpus")
    add_flag(p, "--ttft-includes-prefill", PlanInput, "ttft_includes_prefill", action="store_true")
    add_flag(p, "--link-bw", PlanInput, "link_bw")
    add_flag(p, "--mem-util", PlanInput, "mem_util")
    add_flag(p, "--max-util", PlanInput, "max_util")
    p.add_argument("--json", action="store_true", help="print the plan as JSON (every field, the residency included)")
    p.set_defaults(func=run)
    return p


def plan_input(args: argparse.Namespace) -> PlanInput:
    """The `plan` flags as a PlanInput."""
    return PlanInput(
        model=args.model, adapters=args.adapters, zipf=args.zipf, workload=args.workload, fit_zipf=args.fit_zipf,
        rate=args.rate, slo_ttft=args.slo_ttft, slo_tpot=args.slo_tpot, quantile=args.quantile,
        hardware=args.hardware, rank=args.rank, dtype_bytes=args.dtype_bytes,
        lora_dtype_bytes=args.lora_dtype_bytes, mean_input=args.mean_input,
        mean_output=args.mean_output, cache_model=args.cache_model, layerwise=args.layerwise,
        load_bw=args.load_bw, load_latency_s=args.load_latency, load_s=args.load_s, load_links=args.load_links,
        instances=args.instances, instance_gpus=args.instance_gpus,
        ttft_includes_prefill=args.ttft_includes_prefill, link_bw=args.link_bw, mem_util=args.mem_util,
        max_util=args.max_util)


def run(args: argparse.Namespace) -> int:
    plan = provision(plan_input(args))
    print(json.dumps(plan.as_dict(), indent=1) if args.json else table(plan))
    return 0


def table(plan: Plan) -> str:
    """The plan for a person: the answer first, then why."""
    zipf = f", Zipf s = {plan.zipf_s:.3g}" if plan.zipf_s is not None else ""
    rows = [
        ("server_gpus", f"{plan.server_gpus}  (cache {plan.gpus_for_cache}, compute {plan.gpus_for_compute}, "
                        f"bandwidth {plan.gpus_for_bandwidth})"),
        ("cache_bytes", f"{plan.cache_bytes} ({plan.cache_bytes / 1e9:.1f} GB)"),
        ("cache_adapters", f"{plan.cache_adapters}  ({plan.resident_adapters} resident, "
                           f"{plan.resident_bytes / 1e9:.1f} GB, + {plan.working_adapters} working slots; "
                           f"of {plan.num_adapters}{zipf})"),
        ("iar", f"{plan.iar:.4f}  (required {plan.required_iar:.4f}; hits on time {plan.hit_on_time:.3f})"),
        ("rate", f"{plan.rate:.4g} req/s"),
        ("miss_delay", f"{1e3 * plan.miss_delay_s:.2f} ms  ("
                       + (f"layer compute {1e3 * plan.layer_compute_s:.2f} ms" if plan.layer_compute_s
                          else "whole adapter first")
                       + f", load links {plan.load_links} at {plan.load_utilisation:.0%})"),
        ("server work", f"{plan.flops_per_s / 1e12:.3g} TFLOP/s, weights {plan.weight_bytes_per_s / 1e9:.3g} GB/s, "
                        f"link {plan.link_bytes_per_s / 1e9:.3g} GB/s"),
    ]
    width = max(len(k) for k, _ in rows)
    lines = [f"{k:<{width}}  {v}" for k, v in rows]
    lines += ["assumptions:"] + [f"  - {a}" for a in plan.assumptions]
    return "\n".join(lines)
