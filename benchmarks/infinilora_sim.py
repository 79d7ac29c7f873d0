"""InfiniLoRA at cluster scale, in the simulator (issue 15; papers.md 2.7, 2.8, 3.4).

16 GPUs (4 nodes × 4 Hopper 96 GB: the `h20` profile), five MoE models with
adapters on attention and every expert, 512 adapters (Zipf 1.2), Poisson
arrivals, BurstGPT-like lengths (`loraserve/workload/burstgpt.py`), SLO P95
TTFT ≤ 0.25 s (excluding prefill, the paper's definition; with prefill also
recorded) and mean TPOT ≤ 0.1 s. Deployments are `loraserve/sim/deployments.py`'s.

1. serviceable rate (doubling or halving from 4 req/s up to 512, then two bisections) of `disagg`
   (8 GPUs of LoRA server, EP4-PP2, instances on the other 8) against coupled
   `slora`, `slora-sjf`, `slora-less` on all 16, for the five models;
2. per-adapter SLO attainment at a fixed rate (1.5 × S-LoRA's serviceable rate);
   and (sensitivity) the serviceable rates of disagg and slora with adapter copies at
   pageable-memory speed (10 GB/s per GPU) instead of pinned DMA (50 GB/s);
3. the ablation ladder on Mixtral at 1.5 × S-LoRA's serviceable rate;
4. push vs pull, and the server over NVLink vs InfiniBand (Mixtral, same rate);
5. beyond the paper: the server's cache under ELORA's cost model vs LRU
   (a cache of 64 adapters), and multi-turn sessions with instances keeping
   ELORA history KV vs dropping it (S-LoRA), in the disaggregated deployment;
   and 1,024 adapters;
6. the planner checked against the simulator (`loraserve/plan/simcheck.py`'s setting, and the old
   layer-wise one for contrast);
7. S-LoRA as vLLM integrates it (the paper's named baseline): serviceable rates of `slora-sync`
   (adapter loads inside the step) and `slora-vllm` (also vLLM's default CPU LoRA cache of
   max_loras adapters), beside disagg's.

Each simulation replays N requests (default 120) and judges the SLO on those
after the first 25% (caches start cold), after 20 idle seconds in which the LoRA server's
ELORA swapper may prefetch (S-LoRA does nothing when idle). Single process.

    python benchmarks/infinilora_sim.py            # the whole reproduction
    python benchmarks/infinilora_sim.py --quick    # Mixtral only, fewer requests
    python benchmarks/infinilora_sim.py --vllm-only   # section 7 alone, into the recorded results
"""

from __future__ import annotations

import argparse
import json
import sys
import time
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
from loraserve.sim.models import INFINILORA_MODELS, model_spec  # noqa: E402
from loraserve.sim.run import adapter_sizes  # noqa: E402
from loraserve.workload import generate  # noqa: E402
from loraserve.workload.burstgpt import burstgpt_config  # noqa: E402
from remote_roundtrip import git_commit, machine, write_results  # noqa: E402  (a sibling script)

HW = PROFILES["h20"]
SLO_ = SLO(0.25, 0.1)
MAIN = ("disagg", "slora", "slora-sjf", "slora-less")
WARMUP = 0.25
LEAD_IN = 20.0
"""Idle seconds before the traffic: the LoRA server's ELORA swapper prefetches popular adapters
(as a server up before the measurement would have); coupled S-LoRA has no idle work."""


PAGEABLE_BW = 10e9
"""Sensitivity: host-to-device adapter copies at 10 GB/s per GPU, what pageable-memory copies
tensor by tensor (as framework LoRA loaders do) reach on a PCIe 5 host, instead of the profile's
50 GB/s of pinned DMA. Applied to every deployment alike (the LoRA server still loads over all
its GPUs' links in parallel)."""


class Bench:
    def __init__(self, requests: int, hw=HW, seed: int = 1) -> None:
        self.requests = requests
        self.hw = hw
        self.seed = seed
        self.sims = 0
        self.sim_s = 0.0

    def run(self, model: str, name: str, rate: float, adapters: int = 512, turns: float = 1.0, **kw) -> dict:
        d = INFINILORA_MODELS[model]
        spec = model_spec(model)
        cfg_wl = burstgpt_config(self.requests, adapters, rate, turns=turns, think_s=5.0, seed=self.seed)
        wl = generate(cfg_wl)
        sizes = adapter_sizes(wl.adapters, spec, d.rank)
        instance_cache = kw.pop("instance_cache", None)
        cfg = deployment(name, spec, self.hw, d.rank, d.gpus, next(iter(sizes.values())), len(sizes), **kw)
        if instance_cache:  # instances keep (elora) or drop (slora) history KV; 64 GiB of host memory each
            cfg = replace(cfg, sim=replace(cfg.sim, cache=CacheConfig(policy=instance_cache, host_bytes=64 << 30)))
        if turns > 1:  # a session's later turns go where its history is (the router's session affinity)
            cfg = replace(cfg, router="affinity")
        res = simulate_cluster(wl, spec, self.hw, cfg, sizes, SLO_, WARMUP, LEAD_IN)
        self.sims += 1
        self.sim_s += res.wall_s
        s, f = res.summary, res.summary_with_prefill
        return {"rate": rate, "meets": s["meets_slo"], "p95_ttft": s["ttft_s"]["p95"],
                "p95_ttft_with_prefill": f["ttft_s"]["p95"], "mean_tpot": s["tpot_s"]["mean"],
                "adapter_attainment": s["adapter_slo_attainment"], "slo_attainment": s["slo_attainment"],
                "throughput_tok_s": s["output_throughput_tok_s"], "instances": res.stats["instances"],
                "adapter_hit_rate": (res.stats.get("server") or {}).get("adapter_hit_rate",
                                                                         res.stats["adapter_hit_rate"]),
                "kv_hit_rate": res.stats["kv_hit_rate"], "wall_s": round(res.wall_s, 2)}

    def serviceable(self, model: str, name: str, start: float = 4.0, steps: int = 8, iters: int = 2,
                    **kw) -> tuple[float, list[dict]]:
        """Bracket the highest rate meeting the SLO by doubling (or halving) from
        `start`, then bisect `iters` times; 0 if even start / 2**steps misses it.
        Doubling goes up to start * 2**(steps - 1) (512 req/s): a rate that still
        meets the SLO there is a ceiling of the search, not a measurement, and
        its history ends on a pass (`table` marks it)."""
        history = []

        def ok(rate: float) -> bool:
            history.append(self.run(model, name, rate, **kw))
            return history[-1]["meets"]

        return bracket_rate(ok, start, steps, iters), history


def capped(history: list[dict]) -> bool:
    """A search that never missed the SLO: its rate is the search's ceiling, a lower bound."""
    return bool(history) and all(h["meets"] for h in history)


def ablation_at(bench: Bench, model: str, rate: float) -> dict:
    """The ladder again at the rate the full system sustains (where the paper's ablation sits:
    the full system within the SLO)."""
    rate = rate or 1.0
    return {"model": model, "rate": rate, "rungs": {name: bench.run(model, name, rate) for name in
                                                     ("slora", "disagg-naive", "disagg+overlap", "disagg+loading",
                                                      "disagg")}}


VLLM = ("slora-sync", "slora-vllm")
"""S-LoRA as vLLM integrates it (the paper's named baseline): loads inside the step, with every
adapter in host memory (`slora-sync`) or with vLLM's default CPU cache of max_loras adapters
(`slora-vllm`, misses beyond it read from disk). See `loraserve/sim/deployments.py`."""


def vllm_baselines(bench: Bench, result: dict) -> dict:
    """Serviceable rates of the vLLM-integrated readings of S-LoRA, and per-adapter attainment at
    each model's fixed rate, beside the recorded `disagg` and `slora`."""
    out: dict = {"deployments": list(VLLM), "models": {}}
    for model, entry in result["models"].items():
        rates, searches = {}, {}
        for name in VLLM:
            rates[name], searches[name] = bench.serviceable(model, name)
            print(f"{model:>14} {name:>12}: {rates[name]:6.2f} req/s", flush=True)
        out["models"][model] = {"serviceable_rate": rates, "searches": searches,
                                "capped": [n for n in VLLM if capped(searches[n])],
                                "attainment": {n: bench.run(model, n, entry["fixed_rate"]) for n in VLLM}}
    return out


def vllm_lines(r: dict) -> list[str]:
    v = r.get("vllm_baselines")
    if not v:
        return []
    lines = ["", "S-LoRA as vLLM integrates it (loads inside the step): serviceable rate (req/s), disagg / it, "
                 "adapters in SLO at 1.5 x slora's rate",
             f"{'model':>14} {'disagg':>8} " + " ".join(f"{n:>11}" for n in VLLM)
             + "  " + " ".join(f"{'disagg/' + n:>18}" for n in VLLM) + "  attainment disagg vs " + " vs ".join(VLLM)]
    ratios: dict = {n: [] for n in VLLM}
    for m, e in v["models"].items():
        d, s = r["models"][m]["serviceable_rate"]["disagg"], e["serviceable_rate"]
        cells = []
        for n in VLLM:
            if s[n]:
                ratios[n].append(d / s[n])
            cells.append(f"{d / s[n]:18.2f}" if s[n] else f"{'serves none':>18}")
        att = [r["models"][m]["attainment"]["disagg"]["adapter_attainment"],
               *(e["attainment"][n]["adapter_attainment"] for n in VLLM)]
        lines.append(f"{m:>14} {d:8.2f} " + " ".join(f"{s[n]:10.2f}{'+' if n in e['capped'] else ' '}" for n in VLLM)
                     + "  " + " ".join(cells) + "  " + " vs ".join(f"{a:.2f}" for a in att))
    for n in VLLM:
        if ratios[n]:
            lines.append(f"mean disagg/{n} over models where it serves some rate: {sum(ratios[n]) / len(ratios[n]):.2f}"
                         f" ({len(ratios[n])} of {len(v['models'])})")
    return lines


def planner_check(bench: Bench, model: str, rate: float) -> dict:
    """The planner checked against the simulator: the planned cache meets the P95 TTFT SLO at the
    planned rate and a cache 20% smaller does not.

    `separating`: `loraserve.plan.simcheck`'s setting (Mixtral, 16 adapters Zipf 1.2, 2 req/s,
    whole-adapter loads from one NVMe SSD per server node, 0.32 s a miss, the plan's bytes as
    LRU compute slots), on seeds 1-3. `layerwise_pcie` (kept for contrast, does not separate):
    the paper's workload at disagg's serviceable rate with layer-wise loads from host memory over
    8 PCIe links (a ~5 ms miss) and the deployment's 512 slots, which `server_cache_bytes` does
    not bound."""
    from loraserve.plan import PlanInput, provision
    from loraserve.plan.simcheck import SimCheck, check
    from loraserve.workload.burstgpt import BURSTGPT_INPUT, BURSTGPT_OUTPUT

    out: dict = {"separating": {f"seed{s}": check(SimCheck(seed=s)) for s in (1, 2, 3)}}
    d = INFINILORA_MODELS[model]
    p = provision(PlanInput(model, adapters=512, zipf=1.2, rate=rate, slo_ttft=SLO_.ttft, slo_tpot=SLO_.tpot,
                            hardware=HW.name, rank=d.rank, mean_input=BURSTGPT_INPUT.mean,
                            mean_output=BURSTGPT_OUTPUT.mean))
    old = out["layerwise_pcie"] = {"rate": rate, "plan": {k: getattr(p, k) for k in ("cache_bytes", "cache_adapters",
                                                                                      "server_gpus", "iar")}}
    for label, scale in (("planned", 1.0), ("planned_minus_20pct", 0.8)):
        old[label] = bench.run(model, "disagg", rate, server_cache_bytes=int(p.cache_bytes * scale))
    return out


def planner_lines(r: dict) -> list[str]:
    lines = ["planner against the simulator: P95 TTFT (s) / share of requests over the SLO, planned cache vs 20% less"]
    for seed, c in r.get("separating", {}).items():
        p, runs = c["plan"], c["runs"]
        lines.append(f"  separating ({seed}): plan {p['cache_adapters']} adapters ({p['cache_bytes'] / 1e9:.1f} GB), "
                     f"miss {p['miss_delay_s']:.2f} s, IAR {p['iar']:.3f}: "
                     + " vs ".join(f"{x['p95_ttft']:.3f} / {x['late_share']:.3f} ({x['slots']} slots, "
                                   f"{'meets' if x['meets'] else 'fails'})" for x in runs.values()))
    if "layerwise_pcie" in r:
        o = r["layerwise_pcie"]
        lines.append(f"  layer-wise, PCIe (512 adapters, {o['rate']:g} req/s): "
                     f"plan {o['plan']['cache_adapters']} adapters: "
                     + " vs ".join(f"{o[k]['p95_ttft']:.3f} ({'meets' if o[k]['meets'] else 'fails'})"
                                   for k in ("planned", "planned_minus_20pct")))
    return lines


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--requests", type=int, default=120, help="requests per simulation")
    ap.add_argument("--models", nargs="+", default=list(INFINILORA_MODELS))
    ap.add_argument("--quick", action="store_true", help="Mixtral only, 100 requests")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "infinilora_sim.json"))
    ap.add_argument("--planner-only", action="store_true",
                    help="rerun only the planner check into an existing --out")
    ap.add_argument("--ablation-only", action="store_true",
                    help="rerun only the ladder at disagg's serviceable rate into an existing --out")
    ap.add_argument("--vllm-only", action="store_true",
                    help="run only the vLLM-integrated S-LoRA baselines into an existing --out")
    args = ap.parse_args()
    if args.vllm_only:
        out = Path(args.out)
        result = json.loads(out.read_text())
        bench = Bench(result["requests_per_sim"])
        result["vllm_baselines"] = vllm_baselines(bench, result)
        result["vllm_baselines"]["commit"] = git_commit()
        write_results(result, out, table)
        return
    if args.ablation_only:
        out = Path(args.out)
        result = json.loads(out.read_text())
        mix = "mixtral-8x7b" if "mixtral-8x7b" in result["models"] else next(iter(result["models"]))
        result["ablation_at_disagg_rate"] = ablation_at(Bench(result["requests_per_sim"]), mix,
                                                        result["models"][mix]["serviceable_rate"]["disagg"])
        result["ablation_at_disagg_rate"]["commit"] = git_commit()
        write_results(result, out, table)
        return
    if args.planner_only:
        out = Path(args.out)
        result = json.loads(out.read_text())
        mix = "mixtral-8x7b" if "mixtral-8x7b" in result["models"] else next(iter(result["models"]))
        bench = Bench(result["requests_per_sim"])
        result["planner"] = planner_check(bench, mix, result["models"][mix]["serviceable_rate"]["disagg"]
                                          or result["ablation"]["rate"])
        result["planner"]["commit"] = git_commit()
        write_results(result, out, table)
        return
    if args.quick:
        args.models, args.requests = ["mixtral-8x7b"], 80
    start = time.perf_counter()
    bench = Bench(args.requests)
    result: dict = {"machine": machine(), "commit": git_commit(), "hardware": HW.name,
                    "slo": {"p95_ttft_s": SLO_.ttft, "mean_tpot_s": SLO_.tpot, "ttft": "excluding prefill"},
                    "requests_per_sim": args.requests, "warmup_share": WARMUP, "lead_in_s": LEAD_IN, "models": {}}
    for model in args.models:
        entry: dict = {"serviceable_rate": {}, "searches": {}}
        for name in MAIN:
            rate, hist = bench.serviceable(model, name)
            entry["serviceable_rate"][name] = rate
            entry["searches"][name] = hist
            if capped(hist):
                entry.setdefault("capped", []).append(name)
            print(f"{model:>14} {name:>12}: {rate:6.2f} req/s  ({time.perf_counter() - start:.0f} s)", flush=True)
        fixed = 1.5 * max(entry["serviceable_rate"]["slora"], 0.5)
        entry["fixed_rate"] = fixed
        entry["attainment"] = {name: bench.run(model, name, fixed) for name in MAIN}
        result["models"][model] = entry
    slow = Bench(args.requests, replace(HW, name=f"{HW.name}-pageable", pcie_bw=PAGEABLE_BW))
    result["pageable_loads"] = {"pcie_bw": PAGEABLE_BW, "serviceable_rate": {}}
    for model in args.models:
        result["pageable_loads"]["serviceable_rate"][model] = rates = {}
        for name in ("disagg", "slora"):
            rates[name], hist = slow.serviceable(model, name)
            if capped(hist):
                result["pageable_loads"].setdefault("capped", []).append(f"{model}/{name}")
        print(f"{model:>14} pageable loads: {rates}  ({time.perf_counter() - start:.0f} s)", flush=True)
    bench.sims, bench.sim_s = bench.sims + slow.sims, bench.sim_s + slow.sim_s
    mix = "mixtral-8x7b" if "mixtral-8x7b" in args.models else args.models[0]
    rate = 1.5 * max(result["models"][mix]["serviceable_rate"]["slora"], 0.5)
    ladder = {name: bench.run(mix, name, rate) for name in ("slora", "disagg-naive", "disagg+overlap",
                                                            "disagg+loading", "disagg")}
    result["ablation"] = {"model": mix, "rate": rate, "rungs": ladder}
    result["ablation_at_disagg_rate"] = ablation_at(bench, mix, result["models"][mix]["serviceable_rate"]["disagg"])
    result["transport"] = {"model": mix, "rate": rate, "push_ib": ladder["disagg"],
                           "pull_ib": bench.run(mix, "disagg-pull", rate),
                           "push_nvlink": bench.run(mix, "disagg-nvlink", rate)}
    small = 64 * adapter_sizes(["x"], model_spec(mix), INFINILORA_MODELS[mix].rank)["x"]
    result["beyond"] = {
        "server_cache": {"cache_bytes": small, "rate": rate,
                         "elora": bench.run(mix, "disagg", rate, server_cache_bytes=small),
                         "lru": bench.run(mix, "disagg-lru", rate, server_cache_bytes=small)},
        "multi_turn": {"rate": rate / 2, "turns": 3,
                       "elora_history_kv": bench.run(mix, "disagg", rate / 2, turns=3.0, instance_cache="elora"),
                       "no_history_kv": bench.run(mix, "disagg", rate / 2, turns=3.0, instance_cache="slora")},
        "adapters_1024": {"rate": result["models"][mix]["fixed_rate"],
                          **{n: bench.run(mix, n, result["models"][mix]["fixed_rate"], adapters=1024)
                             for n in ("disagg", "slora")}}}
    result["planner"] = planner_check(bench, mix, result["models"][mix]["serviceable_rate"]["disagg"] or rate)
    result["vllm_baselines"] = vllm_baselines(bench, result)
    result["sims"], result["sim_s"] = bench.sims, round(bench.sim_s, 1)
    result["wall_s"] = round(time.perf_counter() - start, 1)
    result["cpu_s"] = round(time.process_time(), 1)  # this process's CPU time: the machine is shared
    out = Path(args.out)
    write_results(result, out, table)
    folder = out.with_suffix("")
    models = result["models"]
    plots.grouped_bars({m: e["serviceable_rate"] for m, e in models.items()}, folder / "serviceable_rate.png",
                       "serviceable rate (req/s)", "Serviceable rate, P95 TTFT ≤ 0.25 s and mean TPOT ≤ 0.1 s")
    plots.grouped_bars({m: {n: r["adapter_attainment"] for n, r in e["attainment"].items()}
                        for m, e in models.items()}, folder / "adapter_attainment.png",
                       "share of adapters within SLO", "Per-adapter SLO attainment at 1.5 × S-LoRA's rate")
    plots.grouped_bars({n: {"P95 TTFT (s)": r["p95_ttft"]} for n, r in ladder.items()}, folder / "ablation.png",
                       "P95 TTFT (s), log scale", f"Ablation on {mix} at {rate:.2f} req/s", log=True)


def table(r: dict) -> str:
    lines = [f"InfiniLoRA in the simulator ({r['hardware']}, 16 GPUs), commit {r['commit']}, "
             f"{r['requests_per_sim']} requests/sim, {r['sims']} sims, wall {r['wall_s']} s (CPU {r.get('cpu_s')} s), "
             f"loadavg {r['machine']['loadavg']} -> {r.get('loadavg_end')}", "",
             f"{'model':>14} " + " ".join(f"{n:>11}" for n in MAIN) + "  disagg/slora  attainment disagg vs slora"]
    ratios = []
    for m, e in r["models"].items():
        s = e["serviceable_rate"]
        ratio = s["disagg"] / s["slora"] if s["slora"] else None
        if ratio is not None:
            ratios.append(ratio)
        att = e["attainment"]
        cap = e.get("capped", [])
        lines.append(f"{m:>14} " + " ".join(f"{s[n]:10.2f}{'+' if n in cap else ' '}" for n in MAIN)
                     + f"  {ratio if ratio is None else round(ratio, 2)!s:>12}"
                     + f"  {att['disagg']['adapter_attainment']:.2f} vs {att['slora']['adapter_attainment']:.2f}")
    lines.append("(+: the search's ceiling, still within the SLO there: a lower bound)")
    if ratios:
        lines.append(f"mean disagg/slora over models with a nonzero S-LoRA rate: {sum(ratios) / len(ratios):.2f}")
    p = r["pageable_loads"]["serviceable_rate"]
    lines += ["", "adapter copies at pageable speed (10 GB/s per GPU): serviceable rate disagg / slora"]
    lines += [f"{m:>14}: {x['disagg']:.2f} / {x['slora']:.2f}" for m, x in p.items()]
    if r["pageable_loads"].get("capped"):
        lines += [f"  at the search's ceiling (lower bounds): {', '.join(r['pageable_loads']['capped'])}"]
    a = r["ablation"]
    lines += ["", f"ablation on {a['model']} at {a['rate']:.2f} req/s: P95 TTFT (s) / mean TPOT (s)"]
    lines += [f"  {n:>15}: {x['p95_ttft']:.3f} / {x['mean_tpot']:.4f}" for n, x in a["rungs"].items()]
    if "ablation_at_disagg_rate" in r:
        a = r["ablation_at_disagg_rate"]
        lines += [f"ablation at disagg's serviceable rate ({a['rate']:.2f} req/s): P95 TTFT (s) / mean TPOT (s)"]
        lines += [f"  {n:>15}: {x['p95_ttft']:.3f} / {x['mean_tpot']:.4f}" for n, x in a["rungs"].items()]
    t = r["transport"]
    lines += ["", "transport: P95 TTFT / mean TPOT"]
    lines += [f"  {n:>12}: {t[n]['p95_ttft']:.3f} / {t[n]['mean_tpot']:.4f}" for n in ("push_ib", "pull_ib",
                                                                                         "push_nvlink")]
    b = r["beyond"]
    lines += ["", "beyond the paper:",
              *(f"  server cache {n}: P95 TTFT {b['server_cache'][n]['p95_ttft']:.3f}, hit rate "
                f"{b['server_cache'][n]['adapter_hit_rate']:.3f}" for n in ("elora", "lru")),
              *(f"  multi-turn {n}: P95 TTFT with prefill {b['multi_turn'][n]['p95_ttft_with_prefill']:.3f}, "
                f"kv hit {b['multi_turn'][n]['kv_hit_rate']}" for n in ("elora_history_kv", "no_history_kv")),
              *(f"  1024 adapters {n}: attainment {b['adapters_1024'][n]['adapter_attainment']:.2f}"
                for n in ("disagg", "slora")), "", *planner_lines(r["planner"]), *vllm_lines(r)]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
