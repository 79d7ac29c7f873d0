"""InfiniLoRA at cluster scale, in the simulator (issue 15; papers.md 2.7, 2.8, 3.4).

16 GPUs (4 nodes × 4 Hopper 96 GB: the `h20` profile), five MoE models with
adapters on attention and every expert, 512 adapters (Zipf 1.2), Poisson
arrivals, BurstGPT-like lengths (`loraserve/workload/burstgpt.py`), SLO P95
TTFT ≤ 0.25 s (excluding prefill, the paper's definition; with prefill also
recorded) and mean TPOT ≤ 0.1 s. Deployments are `loraserve/sim/deployments.py`'s.
Adapters are sized as the paper states them: 4 bytes a weight
(`PAPER_LORA_DTYPE_BYTES`); the main comparison is run again at bf16's 2 bytes.

1. serviceable rate (doubling or halving from 4 req/s up to 512, then two bisections) of `disagg`
   (8 GPUs of LoRA server, EP4-PP2, instances on the other 8) against coupled
   `slora`, `slora-sjf`, `slora-less`, and S-LoRA as vLLM integrates it (`slora-sync`: adapter
   loads inside the step; `slora-vllm`: also vLLM's default CPU LoRA cache of max_loras
   adapters), on all 16, for the five models;
2. per-adapter SLO attainment at a fixed rate (1.5 × S-LoRA's serviceable rate);
3. the same serviceable rates and attainment for disagg and slora with bf16 adapters, and
   (sensitivity) with adapter copies at pageable-memory speed (10 GB/s per GPU) instead of
   pinned DMA (50 GB/s);
4. the ablation ladder on Mixtral at 1.5 × S-LoRA's serviceable rate and at disagg's;
5. push vs pull, and the server over NVLink vs InfiniBand (Mixtral);
6. beyond the paper: the server's cache under ELORA's cost model vs LRU
   (a cache of 64 adapters), and multi-turn sessions with instances keeping
   ELORA history KV vs dropping it (S-LoRA), in the disaggregated deployment;
   and 1,024 adapters;
7. the planner checked against the simulator (`loraserve/plan/simcheck.py`'s setting, and the
   layer-wise one for contrast).

Each simulation replays `SECONDS` of Poisson arrivals (at least `MIN_REQUESTS` requests)
and judges the SLO on the requests after the first 25% (caches start cold), after 20 idle
seconds in which the LoRA server's ELORA swapper may prefetch (S-LoRA does nothing when idle).
A search's run stops as soon as its P95 TTFT is sure to miss (`MissWatch`: exact). Runs go
to `--jobs` processes (default 2: the machine's cores).

    python benchmarks/infinilora_sim.py            # the whole reproduction
    python benchmarks/infinilora_sim.py --quick    # Mixtral only, shorter runs
    python benchmarks/infinilora_sim.py --replot   # the plots again, from the recorded results
"""

from __future__ import annotations

import argparse
import json
import math
import multiprocessing
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import replace
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from loraserve.bench import plots  # noqa: E402
from loraserve.bench.metrics import SLO, bracket_rate  # noqa: E402
from loraserve.config import CacheConfig  # noqa: E402
from loraserve.sim.cluster import simulate_cluster  # noqa: E402
from loraserve.sim.deployments import deployment  # noqa: E402
from loraserve.sim.hardware import PROFILES  # noqa: E402
from loraserve.sim.models import INFINILORA_MODELS, PAPER_LORA_DTYPE_BYTES, model_spec  # noqa: E402
from loraserve.sim.run import adapter_sizes  # noqa: E402
from loraserve.workload import generate  # noqa: E402
from loraserve.workload.burstgpt import burstgpt_config  # noqa: E402
from remote_roundtrip import git_commit, machine, write_results  # noqa: E402  (a sibling script)

HW = PROFILES["h20"]
SLO_ = SLO(0.25, 0.1)
MAIN = ("disagg", "slora", "slora-sjf", "slora-less")
VLLM = ("slora-sync", "slora-vllm")
"""S-LoRA as vLLM integrates it (the paper's named baseline): loads inside the step, with every
adapter in host memory (`slora-sync`) or with vLLM's default CPU cache of max_loras adapters
(`slora-vllm`, misses beyond it read from disk). See `loraserve/sim/deployments.py`."""

PAIR = ("disagg", "slora")
BF16 = 2
WARMUP = 0.25
LEAD_IN = 20.0
"""Idle seconds before the traffic: the LoRA server's ELORA swapper prefetches popular adapters
(as a server up before the measurement would have); coupled S-LoRA has no idle work."""

SECONDS = 60.0
"""Seconds of arrivals per simulation. A serviceable rate is a steady-state property: the
recorded results before this (120 requests a run) covered 2-8 s of traffic at the rates that
decide, less than one request's own life (~5 s of decode), so an overloaded deployment's queue
had no time to grow and S-LoRA's slot-bound queueing never showed."""

MIN_REQUESTS = 120

PAGEABLE_BW = 10e9
"""Sensitivity: host-to-device adapter copies at 10 GB/s per GPU, what pageable-memory copies
tensor by tensor (as framework LoRA loaders do) reach on a PCIe 5 host, instead of the profile's
50 GB/s of pinned DMA. Applied to every deployment alike (the LoRA server still loads over all
its GPUs' links in parallel)."""


class Bench:
    """One reading of the comparison (hardware, adapter bytes, run length): runs and searches.
    Plain data, so a copy goes to each worker process."""

    def __init__(self, requests: int = MIN_REQUESTS, hw=HW, seed: int = 1, seconds: float = SECONDS,
                 lora_bytes: int = PAPER_LORA_DTYPE_BYTES) -> None:
        self.requests = requests
        self.seconds = seconds
        self.hw = hw
        self.seed = seed
        self.lora_bytes = lora_bytes

    def adapter_bytes(self, model: str) -> int:
        return adapter_sizes(["x"], model_spec(model), INFINILORA_MODELS[model].rank, self.lora_bytes)["x"]

    def run(self, model: str, name: str, rate: float, adapters: int = 512, turns: float = 1.0,
            stop_on_miss: bool = False, **kw) -> dict:
        d = INFINILORA_MODELS[model]
        spec = model_spec(model)
        n = max(self.requests, round(rate * self.seconds))
        wl = generate(burstgpt_config(n, adapters, rate, turns=turns, think_s=5.0, seed=self.seed))
        sizes = adapter_sizes(wl.adapters, spec, d.rank, self.lora_bytes)
        instance_cache = kw.pop("instance_cache", None)
        cfg = deployment(name, spec, self.hw, d.rank, d.gpus, next(iter(sizes.values())), len(sizes),
                         lora_dtype_bytes=self.lora_bytes, **kw)
        if instance_cache:  # instances keep (elora) or drop (slora) history KV; 64 GiB of host memory each
            cfg = replace(cfg, sim=replace(cfg.sim, cache=CacheConfig(policy=instance_cache, host_bytes=64 << 30)))
        if turns > 1:  # a session's later turns go where its history is (the router's session affinity)
            cfg = replace(cfg, router="affinity")
        res = simulate_cluster(wl, spec, self.hw, cfg, sizes, SLO_, WARMUP, LEAD_IN, stop_on_miss)
        s, f = res.summary, res.summary_with_prefill
        early = res.stopped_at is not None  # the verdict alone: its statistics cover the requests done by then
        return {"rate": rate, "requests": n, "meets": s["meets_slo"],
                "stopped_at_s": None if not early else round(res.stopped_at - LEAD_IN, 2),
                "p95_ttft": None if early else s["ttft_s"]["p95"],
                "p95_ttft_with_prefill": None if early else f["ttft_s"]["p95"],
                "mean_tpot": None if early else s["tpot_s"]["mean"],
                "adapter_attainment": None if early else s["adapter_slo_attainment"],
                "slo_attainment": None if early else s["slo_attainment"],
                "throughput_tok_s": None if early else s["output_throughput_tok_s"],
                "instances": res.stats["instances"],
                "adapter_hit_rate": (res.stats.get("server") or {}).get("adapter_hit_rate",
                                                                         res.stats["adapter_hit_rate"]),
                "kv_hit_rate": res.stats["kv_hit_rate"],
                "cold_median_ttft": None if early else (res.stats.get("cold") or {}).get("median_ttft_s"),
                "wall_s": round(res.wall_s, 2)}

    def serviceable(self, model: str, name: str, start: float = 4.0, steps: int = 8, iters: int = 2,
                    **kw) -> dict:
        """Bracket the highest rate meeting the SLO by doubling (or halving) from
        `start`, then bisect `iters` times; 0 if even start / 2**steps misses it.
        Doubling goes up to start * 2**(steps - 1) (512 req/s): a rate that still
        meets the SLO there is a ceiling of the search, not a measurement (`capped`)."""
        history = []

        def ok(rate: float) -> bool:
            history.append(self.run(model, name, rate, stop_on_miss=True, **kw))
            return history[-1]["meets"]

        rate = bracket_rate(ok, start, steps, iters)
        return {"rate": rate, "capped": capped(history), "history": history}

    def planner_separating(self, seed: int) -> dict:
        from loraserve.plan.simcheck import SimCheck, check

        return check(SimCheck(seed=seed))


def capped(history: list[dict]) -> bool:
    """A search that never missed the SLO: its rate is the search's ceiling, a lower bound."""
    return bool(history) and all(h["meets"] for h in history)


def in_parallel(calls: list[tuple], jobs: int) -> list:
    """[(bench, method, args, kwargs)] → each call's result, in order, over `jobs` forked
    processes (the simulations are independent and single-threaded)."""
    if jobs <= 1:
        return [getattr(b, m)(*a, **k) for b, m, a, k in calls]
    with ProcessPoolExecutor(jobs, mp_context=multiprocessing.get_context("fork")) as pool:
        futures = [pool.submit(_call, *c) for c in calls]
        return [f.result() for f in futures]


def _call(bench: Bench, method: str, args: tuple, kwargs: dict):
    return getattr(bench, method)(*args, **kwargs)


def sims_of(obj) -> tuple[int, float]:
    """(simulations, their wall seconds) in a result tree: every run record counts once."""
    if isinstance(obj, dict):
        if "wall_s" in obj and "rate" in obj:
            return 1, obj["wall_s"]
        parts = [sims_of(v) for v in obj.values()]
    elif isinstance(obj, list):
        parts = [sims_of(v) for v in obj]
    else:
        return 0, 0.0
    return sum(p[0] for p in parts), sum(p[1] for p in parts)


LADDER = ("slora", "disagg-naive", "disagg+overlap", "disagg+loading", "disagg")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seconds", type=float, help=f"seconds of arrivals per simulation (default {SECONDS:g}; "
                                                  "--quick: 20)")
    ap.add_argument("--requests", type=int, default=MIN_REQUESTS, help="at least this many requests per simulation")
    ap.add_argument("--models", nargs="+", default=list(INFINILORA_MODELS))
    ap.add_argument("--jobs", type=int, default=2, help="simulations run in this many processes")
    ap.add_argument("--seed", type=int, default=1, help="the workloads' seed (arrivals, adapters, lengths)")
    ap.add_argument("--quick", action="store_true", help="Mixtral only, 20 s runs unless --seconds")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "infinilora_sim.json"))
    ap.add_argument("--replot", action="store_true", help="only draw the plots again from the results at --out")
    args = ap.parse_args()
    if args.replot:
        draw(json.loads(Path(args.out).read_text()), Path(args.out).with_suffix(""))
        return
    if args.quick:
        args.models = ["mixtral-8x7b"]
    args.seconds = args.seconds or (20.0 if args.quick else SECONDS)
    start = time.perf_counter()
    started = {"machine": machine(), "commit": git_commit()}  # the load before the runs
    paper = Bench(args.requests, seed=args.seed, seconds=args.seconds)
    bf16 = Bench(args.requests, seed=args.seed, seconds=args.seconds, lora_bytes=BF16)
    slow = Bench(args.requests, replace(HW, name=f"{HW.name}-pageable", pcie_bw=PAGEABLE_BW), args.seed, args.seconds)
    models = args.models
    mix = "mixtral-8x7b" if "mixtral-8x7b" in models else models[0]

    # 1. every search at once
    keys = ([("paper", m, n) for m in models for n in MAIN + VLLM] + [("bf16", m, n) for m in models for n in PAIR]
            + [("pageable", m, n) for m in models for n in PAIR])
    benches = {"paper": paper, "bf16": bf16, "pageable": slow}
    found = dict(zip(keys, in_parallel([(benches[b], "serviceable", (m, n), {}) for b, m, n in keys], args.jobs)))
    print(f"searches done ({time.perf_counter() - start:.0f} s)", flush=True)
    rate = {(b, m, n): f["rate"] for (b, m, n), f in found.items()}

    # 2. runs at rates the searches found
    fixed = {(b, m): 1.5 * max(rate[(b, m, "slora")], 0.5) for b in ("paper", "bf16") for m in models}
    fmix = fixed[("paper", mix)]
    dmix = rate[("paper", mix, "disagg")] or 1.0
    small = 64 * paper.adapter_bytes(mix)
    runs = {**{("att", "paper", m, n): (paper, (m, n, fixed[("paper", m)]), {}) for m in models for n in MAIN + VLLM},
            **{("att", "bf16", m, n): (bf16, (m, n, fixed[("bf16", m)]), {}) for m in models for n in PAIR},
            **{("ladder", n): (paper, (mix, n, fmix), {}) for n in LADDER},
            **{("ladder@disagg", n): (paper, (mix, n, dmix), {}) for n in LADDER},
            ("pull",): (paper, (mix, "disagg-pull", fmix), {}),
            ("nvlink",): (paper, (mix, "disagg-nvlink", fmix), {}),
            ("cache", "elora"): (paper, (mix, "disagg", fmix), {"server_cache_bytes": small}),
            ("cache", "lru"): (paper, (mix, "disagg-lru", fmix), {"server_cache_bytes": small}),
            ("turns", "elora"): (paper, (mix, "disagg", fmix / 2), {"turns": 3.0, "instance_cache": "elora"}),
            ("turns", "slora"): (paper, (mix, "disagg", fmix / 2), {"turns": 3.0, "instance_cache": "slora"}),
            **{("1024", n): (paper, (mix, n, fmix), {"adapters": 1024}) for n in PAIR}}
    plan = planned_cache(paper, mix, dmix)
    runs.update({("plan", label): (paper, (mix, "disagg", dmix), {"server_cache_bytes": int(plan["cache_bytes"] * k)})
                 for label, k in (("planned", 1.0), ("planned_minus_20pct", 0.8))})
    calls = [(b, "run", a, kw) for b, a, kw in runs.values()] + [(paper, "planner_separating", (s,), {})
                                                                  for s in (1, 2, 3)]
    out = in_parallel(calls, args.jobs)
    got = dict(zip(runs, out))
    separating = {f"seed{s}": r for s, r in zip((1, 2, 3), out[len(runs):])}

    result: dict = {**started, "hardware": HW.name,
                    "slo": {"p95_ttft_s": SLO_.ttft, "mean_tpot_s": SLO_.tpot, "ttft": "excluding prefill"},
                    "lora_dtype_bytes": paper.lora_bytes, "seed": args.seed, "seconds_per_sim": args.seconds,
                    "min_requests_per_sim": args.requests, "warmup_share": WARMUP, "lead_in_s": LEAD_IN,
                    "jobs": args.jobs, "models": {}}
    for m in models:
        result["models"][m] = {
            "adapter_bytes": paper.adapter_bytes(m),
            "serviceable_rate": {n: rate[("paper", m, n)] for n in MAIN + VLLM},
            "capped": [n for n in MAIN + VLLM if found[("paper", m, n)]["capped"]],
            "searches": {n: found[("paper", m, n)]["history"] for n in MAIN + VLLM},
            "fixed_rate": fixed[("paper", m)],
            "attainment": {n: got[("att", "paper", m, n)] for n in MAIN + VLLM}}
    result["bf16_adapters"] = {"lora_dtype_bytes": BF16, "models": {m: {
        "adapter_bytes": bf16.adapter_bytes(m),
        "serviceable_rate": {n: rate[("bf16", m, n)] for n in PAIR},
        "capped": [n for n in PAIR if found[("bf16", m, n)]["capped"]],
        "searches": {n: found[("bf16", m, n)]["history"] for n in PAIR},
        "fixed_rate": fixed[("bf16", m)],
        "attainment": {n: got[("att", "bf16", m, n)] for n in PAIR}} for m in models}}
    result["pageable_loads"] = {"pcie_bw": PAGEABLE_BW, "serviceable_rate": {
        m: {n: rate[("pageable", m, n)] for n in PAIR} for m in models},
        "capped": [f"{m}/{n}" for m in models for n in PAIR if found[("pageable", m, n)]["capped"]]}
    ladder = {n: got[("ladder", n)] for n in LADDER}
    result["ablation"] = {"model": mix, "rate": fmix, "rungs": ladder}
    result["ablation_at_disagg_rate"] = {"model": mix, "rate": dmix,
                                         "rungs": {n: got[("ladder@disagg", n)] for n in LADDER}}
    result["transport"] = {"model": mix, "rate": fmix, "push_ib": ladder["disagg"], "pull_ib": got[("pull",)],
                           "push_nvlink": got[("nvlink",)]}
    result["beyond"] = {
        "server_cache": {"cache_bytes": small, "rate": fmix, "elora": got[("cache", "elora")],
                         "lru": got[("cache", "lru")]},
        "multi_turn": {"rate": fmix / 2, "turns": 3, "elora_history_kv": got[("turns", "elora")],
                       "no_history_kv": got[("turns", "slora")]},
        "adapters_1024": {"rate": fmix, **{n: got[("1024", n)] for n in PAIR}}}
    result["planner"] = {"separating": separating, "layerwise_pcie": {
        "rate": dmix, "plan": plan, **{k: got[("plan", k)] for k in ("planned", "planned_minus_20pct")}}}
    result["sims"], sim_s = sims_of([found, out])
    result["sim_s"] = round(sim_s, 1)
    result["wall_s"] = round(time.perf_counter() - start, 1)
    path = Path(args.out)
    write_results(result, path, table)
    draw(result, path.with_suffix(""))


def draw(result: dict, folder: Path) -> None:
    """The plots, from a result (`--replot` draws them again from the recorded JSON)."""
    plots.grouped_bars({m: e["serviceable_rate"] for m, e in result["models"].items()},
                       folder / "serviceable_rate.png", "serviceable rate (req/s)",
                       "Serviceable rate, P95 TTFT ≤ 0.25 s and mean TPOT ≤ 0.1 s")
    plots.grouped_bars({m: {n: r["adapter_attainment"] for n, r in e["attainment"].items()}
                        for m, e in result["models"].items()}, folder / "adapter_attainment.png",
                       "share of adapters within SLO", "Per-adapter SLO attainment at 1.5 × S-LoRA's rate")
    ladders = (result["ablation_at_disagg_rate"], result["ablation"])
    plots.grouped_bars({n: {f"{a['rate']:g} req/s": a["rungs"][n]["p95_ttft"] for a in ladders}
                        for n in ladders[1]["rungs"]}, folder / "ablation.png", "P95 TTFT (s), log scale",
                       f"Ablation on {result['ablation']['model']} (one seed; benchmarks/ladder_seeds.py: sixteen)",
                       log=True)
    t = result["transport"]
    variants = {"push, InfiniBand": t["push_ib"], "pull, InfiniBand": t["pull_ib"], "push, NVLink": t["push_nvlink"]}
    plots.grouped_bars({metric: {v: r[key] for v, r in variants.items()}
                        for metric, key in (("P95 TTFT (s)", "p95_ttft"), ("mean TPOT (s)", "mean_tpot"))},
                       folder / "transport.png", "seconds, log scale",
                       f"The LoRA server's link, {t['model']} at {t['rate']:g} req/s", log=True)
    p = result["planner"]
    cases = {f"{k} (2 req/s)": r["runs"] for k, r in p["separating"].items()}
    lw = p["layerwise_pcie"]
    cases[f"paper's setting ({lw['rate']:g} req/s)"] = {"1": lw["planned"], "0.8": lw["planned_minus_20pct"]}
    plots.grouped_bars({c: {"planned cache": r["1"]["p95_ttft"], "20% smaller": r["0.8"]["p95_ttft"]}
                        for c, r in cases.items()}, folder / "planner.png", "P95 TTFT (s), log scale",
                       "The planner's cache in the simulator (SLO: 0.25 s)", log=True)
    b = result["beyond"]
    plots.grouped_bars({f"server cache of {b['server_cache']['cache_bytes'] / 2**30:.0f} GiB":
                        {"ELORA": b["server_cache"]["elora"]["p95_ttft"],
                         "LRU / no history KV": b["server_cache"]["lru"]["p95_ttft"]},
                        f"multi-turn, {b['multi_turn']['rate']:g} req/s":
                        {"ELORA": b["multi_turn"]["elora_history_kv"]["p95_ttft"],
                         "LRU / no history KV": b["multi_turn"]["no_history_kv"]["p95_ttft"]}},
                       folder / "beyond.png", "P95 TTFT (s, prefill excluded)",
                       "Beyond the paper: cache policy; history KV")


def planned_cache(bench: Bench, model: str, rate: float) -> dict:
    """The planner's LoRA server for the paper's workload at disagg's serviceable rate: layer-wise
    loads from host memory over 8 PCIe links (a ~5 ms miss) and the deployment's slots, which
    `server_cache_bytes` does not bound (kept for contrast: it does not separate). The
    separating check is `loraserve.plan.simcheck`'s setting (Mixtral, 16 adapters Zipf 1.2,
    2 req/s, whole-adapter loads from one NVMe SSD per server node, 0.32 s a miss, the plan's
    bytes as LRU compute slots), on seeds 1-3."""
    from loraserve.plan import PlanInput, provision
    from loraserve.workload.burstgpt import BURSTGPT_INPUT, BURSTGPT_OUTPUT

    p = provision(PlanInput(model, adapters=512, zipf=1.2, rate=rate, slo_ttft=SLO_.ttft, slo_tpot=SLO_.tpot,
                            hardware=HW.name, rank=INFINILORA_MODELS[model].rank, lora_dtype_bytes=bench.lora_bytes,
                            mean_input=BURSTGPT_INPUT.mean, mean_output=BURSTGPT_OUTPUT.mean))
    return {k: getattr(p, k) for k in ("cache_bytes", "cache_adapters", "server_gpus", "iar")}


def ratio_summary(models: dict, over: str) -> str:
    """disagg / `over` across models: the arithmetic mean (the paper's "average") and the
    geometric mean (one model's large ratio cannot carry it), over models where `over` serves."""
    ratios = [e["serviceable_rate"]["disagg"] / e["serviceable_rate"][over] for e in models.values()
              if e["serviceable_rate"][over]]
    if not ratios:
        return f"disagg/{over}: {over} serves no rate on any model"
    geo = math.exp(sum(math.log(x) for x in ratios) / len(ratios)) if all(ratios) else 0.0
    return (f"disagg/{over}: mean {sum(ratios) / len(ratios):.2f}, geometric mean {geo:.2f} "
            f"over the {len(ratios)} of {len(models)} models where {over} serves some rate")


def attainment_summary(models: dict) -> str:
    gaps = [e["attainment"]["disagg"]["adapter_attainment"] - e["attainment"]["slora"]["adapter_attainment"]
            for e in models.values()]
    return f"adapters in SLO at 1.5 x slora's rate, disagg - slora: {100 * sum(gaps) / len(gaps):+.0f} points, mean"


def rate_rows(models: dict, names: tuple[str, ...]) -> list[str]:
    lines = [f"{'model':>14} {'adapter GB':>10} " + " ".join(f"{n:>11}" for n in names)
             + "  disagg/slora  attainment " + " vs ".join(names)]
    for m, e in models.items():
        s, cap = e["serviceable_rate"], e["capped"]
        ratio = f"{s['disagg'] / s['slora']:.2f}" if s["slora"] else "-"
        att = " vs ".join(f"{e['attainment'][n]['adapter_attainment']:.2f}" for n in names)
        lines.append(f"{m:>14} {e['adapter_bytes'] / 1e9:10.2f} "
                     + " ".join(f"{s[n]:10.2f}{'+' if n in cap else ' '}" for n in names) + f"  {ratio:>12}  {att}")
    return lines


def ladder_lines(a: dict, title: str) -> list[str]:
    return [f"{title} on {a['model']} at {a['rate']:.2f} req/s: P95 TTFT (s) / mean TPOT (s)",
            *(f"  {n:>15}: {x['p95_ttft']:.3f} / {x['mean_tpot']:.4f}" for n, x in a["rungs"].items())]


def planner_lines(r: dict) -> list[str]:
    lines = ["planner against the simulator: P95 TTFT (s) / share of requests over the SLO, planned cache vs 20% less"]
    for seed, c in r["separating"].items():
        p, runs = c["plan"], c["runs"]
        lines.append(f"  separating ({seed}): plan {p['cache_adapters']} adapters ({p['cache_bytes'] / 1e9:.1f} GB), "
                     f"miss {p['miss_delay_s']:.2f} s, IAR {p['iar']:.3f}: "
                     + " vs ".join(f"{x['p95_ttft']:.3f} / {x['late_share']:.3f} ({x['slots']} slots, "
                                   f"{'meets' if x['meets'] else 'fails'})" for x in runs.values()))
    o = r["layerwise_pcie"]
    lines.append(f"  layer-wise, PCIe (512 adapters, {o['rate']:g} req/s): "
                 f"plan {o['plan']['cache_adapters']} adapters: "
                 + " vs ".join(f"{o[k]['p95_ttft']:.3f} ({'meets' if o[k]['meets'] else 'fails'})"
                               for k in ("planned", "planned_minus_20pct")))
    return lines


def table(r: dict) -> str:
    b16 = r["bf16_adapters"]["models"]
    lines = [f"InfiniLoRA in the simulator ({r['hardware']}, 16 GPUs), commit {r['commit']}, "
             f"seed {r['seed']}, {r['seconds_per_sim']:g} s of arrivals a run (at least {r['min_requests_per_sim']} "
             "requests), "
             f"{r['sims']} sims, wall {r['wall_s']} s ({r['sim_s']} s of simulation over {r['jobs']} processes), "
             f"loadavg {r['machine']['loadavg']} -> "
             f"{r.get('loadavg_end')}", "",
             f"adapters at {r['lora_dtype_bytes']} bytes a weight (the paper's stated size): serviceable rate (req/s), "
             "adapters in SLO at 1.5 x slora's rate", *rate_rows(r["models"], MAIN + VLLM),
             "(+: the search's ceiling, still within the SLO there: a lower bound)",
             *(ratio_summary(r["models"], n) for n in MAIN[1:] + VLLM), attainment_summary(r["models"]), "",
             f"adapters at {r['bf16_adapters']['lora_dtype_bytes']} bytes a weight (bf16)", *rate_rows(b16, PAIR),
             ratio_summary(b16, "slora"), attainment_summary(b16), "",
             f"adapter copies at pageable speed (10 GB/s per GPU; adapters at {r['lora_dtype_bytes']} bytes a "
             "weight): serviceable rate disagg / slora",
             *(f"{m:>14}: {x['disagg']:.2f} / {x['slora']:.2f}"
               for m, x in r["pageable_loads"]["serviceable_rate"].items())]
    if r["pageable_loads"]["capped"]:
        lines.append(f"  at the search's ceiling (lower bounds): {', '.join(r['pageable_loads']['capped'])}")
    t, b = r["transport"], r["beyond"]
    lines += ["", *ladder_lines(r["ablation"], "ablation at 1.5 x slora's rate"),
              *ladder_lines(r["ablation_at_disagg_rate"], "ablation at disagg's serviceable rate"), "",
              f"transport at {t['rate']:.2f} req/s: P95 TTFT / mean TPOT",
              *(f"  {n:>12}: {t[n]['p95_ttft']:.3f} / {t[n]['mean_tpot']:.4f}" for n in ("push_ib", "pull_ib",
                                                                                          "push_nvlink")),
              "", "beyond the paper:",
              *(f"  server cache of 64 adapters, {n}: P95 TTFT {b['server_cache'][n]['p95_ttft']:.3f}, hit rate "
                f"{b['server_cache'][n]['adapter_hit_rate']:.3f}" for n in ("elora", "lru")),
              *(f"  multi-turn {n}: P95 TTFT with prefill {b['multi_turn'][n]['p95_ttft_with_prefill']:.3f}, "
                f"kv hit {b['multi_turn'][n]['kv_hit_rate']:.3f}" for n in ("elora_history_kv", "no_history_kv")),
              *(f"  1024 adapters {n}: attainment {b['adapters_1024'][n]['adapter_attainment']:.2f}" for n in PAIR),
              "", *planner_lines(r["planner"])]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
