"""TTFT and TPOT of the cache policies on the real engine, side by side in one run.

SmolLM2-135M (the demo model) with 50 rank-16 adapters (all seven projections),
Zipf-popular; multi-turn sessions (each turn resends the whole conversation so
far plus a new user message) starting as a Poisson process, an exponential
think time between turns. The device pool is sized so that not everything
fits; the host tier holds everything. The same seeded workload
(`loraserve.workload`) runs under each policy, replayed on the wall clock by
the loop the simulator uses (`loraserve.sim.replay`), so queueing is real. A
synthetic approximation of the paper's chatbot traces, which are not
available here.

    python benchmarks/elora_ttft.py                        # elora, vllm, slora at 0.25 and 0.5/s
    python benchmarks/elora_ttft.py --rates 0.2 --policies elora elora-wos
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from loraserve.bench.metrics import summarize
from loraserve.config import CacheConfig, EngineConfig, SchedulerConfig
from loraserve.demo import build_demo
from loraserve.engine.llm_engine import LLMEngine
from loraserve.sampling import SamplingParams
from loraserve.sim.replay import replay
from loraserve.sim.run import to_records
from loraserve.workload import ArrivalConfig, Lengths, PopularityConfig, WorkloadConfig, generate

ROOT = Path(__file__).resolve().parent.parent
CACHE = ROOT / ".cache" / "bench"


def make_adapters(demo: Path, n: int) -> dict[str, Path]:
    """n rank-16 adapters: the demo's 'chat' adapter's config with fresh random weights."""
    src = demo / "adapters" / "chat"
    tensors = load_file(src / "adapter_model.safetensors")
    out = {}
    for i in range(n):
        d = CACHE / "adapters" / f"lora-{i}"
        if not (d / "adapter_model.safetensors").is_file():
            d.mkdir(parents=True, exist_ok=True)
            g = torch.Generator().manual_seed(i)
            save_file({k: torch.randn(v.shape, generator=g) * v.std() for k, v in tensors.items()},
                      d / "adapter_model.safetensors")
            (d / "adapter_config.json").write_text((src / "adapter_config.json").read_text())
        out[f"lora-{i}"] = d
    return out


BATCH_BUCKETS = ((1, 1), (2, 2), (3, 4), (5, 8), (9, 64))


def record_steps(engine: LLMEngine) -> list[tuple[int, int, float]]:
    """Per executed step: (decoding requests, prefilling requests, executor seconds).
    A request computing one new token counts as decoding (also a prefill whose
    cached prefix left it just its last token: it costs the step what a decode does).

    TPOT is a sum of the steps a request decodes in, so this splits it into what
    a policy decides (how many requests decode together, how often a prefill
    rides along) and what a step of a given make-up costs (the same engine code
    under every policy)."""
    steps: list[tuple[int, int, float]] = []
    execute = engine.executor.execute

    def timed(plan):
        result = execute(plan)
        if plan.seqs:
            decodes = sum(q.num_new_tokens == 1 for q in plan.seqs)
            steps.append((decodes, len(plan.seqs) - decodes, result.elapsed))
        return result

    engine.executor.execute = timed
    return steps


def step_profile(steps: list[tuple[int, int, float]]) -> dict:
    with_decodes = [(d, p, t) for d, p, t in steps if d]
    decode_tokens = sum(d for d, _, _ in with_decodes)
    by_batch = {}
    for lo, hi in BATCH_BUCKETS:
        ts = [t for d, p, t in with_decodes if not p and lo <= d <= hi]
        if ts:
            by_batch[f"{lo}-{hi}" if hi > lo else str(lo)] = {"steps": len(ts), "mean_ms": 1e3 * statistics.mean(ts)}
    return {
        # each decoding request's view: the batch it decoded in, and whether a prefill shared its step
        "decode_batch_mean": sum(d * d for d, _, _ in with_decodes) / decode_tokens if decode_tokens else 0.0,
        "decode_tokens_with_prefill_share":
            sum(d for d, p, _ in with_decodes if p) / decode_tokens if decode_tokens else 0.0,
        "decode_step_ms_by_batch": by_batch,
    }


def run(policy: str, args, model: Path, adapters: dict[str, Path], workload) -> dict:
    engine = LLMEngine(EngineConfig(
        model=str(model), cache=CacheConfig(device_bytes=args.device_mib * 2**20, host_bytes=2 * 2**30,
                                            policy=policy),
        scheduler=SchedulerConfig(max_loras=args.max_loras, max_num_batched_tokens=args.max_batched_tokens)))
    try:
        for name, path in adapters.items():
            engine.add_adapter(name, str(path))
        engine.add_request(list(range(100, 140)), SamplingParams(max_tokens=8, ignore_eos=True))  # warm-up
        while engine.has_unfinished():
            engine.step()
        base = dict(engine.cache.counters)
        steps = record_steps(engine)
        invalid: list[float] = []
        done = replay(engine, workload, monitor=lambda t: invalid.append(engine.cache.invalid_kv_fraction()),
                      every=0.5)
    finally:
        engine.close()
    s = summarize(to_records(done))
    c = {k: v - base.get(k, 0) for k, v in engine.cache.counters.items()}
    admissions = c.get("adapter_hits", 0) + c.get("adapter_misses", 0)
    ms = lambda xs: 1e3 * statistics.mean(xs)  # noqa: E731
    return {
        "policy": policy, "rate": workload.rate, "requests": s["completed"],
        "ttft_mean_ms": 1e3 * s["ttft_s"]["mean"], "ttft_p95_ms": 1e3 * s["ttft_s"]["p95"],
        "tpot_mean_ms": 1e3 * s["tpot_s"]["mean"], "tpot_p95_ms": 1e3 * s["tpot_s"]["p95"],
        "output_tok_s": s["output_throughput_tok_s"],
        "ttft_queue_ms": ms([r.first_scheduled_time - r.arrival_time - r.lora_wait - r.kv_wait for r in done]),
        "ttft_lora_cold_ms": ms([r.lora_wait for r in done]),
        "ttft_kv_cold_ms": ms([r.kv_wait for r in done]),
        "ttft_compute_ms": ms([r.first_token_time - r.first_scheduled_time for r in done]),
        "adapter_hit_rate": c.get("adapter_hits", 0) / admissions if admissions else 0.0,
        "kv_hit_rate": c.get("kv_hit_tokens", 0) / c["prompt_tokens"] if c.get("prompt_tokens") else 0.0,
        "swap_in_mib": c.get("swap_in_bytes", 0) / 2**20, "swap_out_mib": c.get("swap_out_bytes", 0) / 2**20,
        "invalid_kv_fraction_mean": statistics.mean(invalid) if invalid else 0.0,
        "preemptions": engine.scheduler.num_preemptions,
        **step_profile(steps),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--policies", nargs="+", default=["elora", "vllm", "slora"])
    ap.add_argument("--adapters", type=int, default=50)
    ap.add_argument("--sessions", type=int, default=24)
    ap.add_argument("--turns", type=float, default=3.0, help="mean turns per session (geometric)")
    ap.add_argument("--rates", type=float, nargs="+", default=[0.25, 0.5],
                    help="sessions started per second (Poisson); each rate runs every policy")
    ap.add_argument("--think", type=float, default=2.0, help="mean seconds between a reply and the next turn")
    ap.add_argument("--zipf", type=float, default=1.0)
    ap.add_argument("--first-tokens", type=int, default=96, help="first prompt (system + user message)")
    ap.add_argument("--user-tokens", type=int, default=32, help="each later user message")
    ap.add_argument("--output-tokens", type=int, default=16)
    ap.add_argument("--device-mib", type=int, default=192)
    ap.add_argument("--max-loras", type=int, default=8)
    ap.add_argument("--max-batched-tokens", type=int, default=2048)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "elora_ttft.json"))
    args = ap.parse_args()
    demo = build_demo(ROOT / ".cache" / "test-models" / "demo")
    adapters = make_adapters(demo, args.adapters)
    workload = generate(WorkloadConfig(
        num_sessions=args.sessions, num_adapters=args.adapters, arrival=ArrivalConfig(rate=args.rates[0]),
        popularity=PopularityConfig(kind="zipf", s=args.zipf), turns=args.turns, think_s=args.think,
        first_input=Lengths(args.first_tokens), input=Lengths(args.user_tokens), output=Lengths(args.output_tokens),
        seed=args.seed))
    results = []
    for rate in args.rates:
        for p in args.policies:
            results.append(r := run(p, args, demo / "model", adapters, workload.at_rate(rate)))
            print(f"{rate:4.2f}/s {p:>10}: TTFT mean {r['ttft_mean_ms']:7.0f} ms  P95 {r['ttft_p95_ms']:7.0f} ms | "
                  f"TPOT mean {r['tpot_mean_ms']:5.0f} ms | {r['output_tok_s']:5.1f} tok/s | queue "
                  f"{r['ttft_queue_ms']:6.0f} lora-cold {r['ttft_lora_cold_ms']:5.1f} kv-cold "
                  f"{r['ttft_kv_cold_ms']:5.1f} compute {r['ttft_compute_ms']:5.0f} ms | hits: adapter "
                  f"{r['adapter_hit_rate']:.2f} kv {r['kv_hit_rate']:.2f} | invalid KV "
                  f"{r['invalid_kv_fraction_mean']:.2f} | decode batch {r['decode_batch_mean']:.1f}, "
                  f"{r['decode_tokens_with_prefill_share']:.0%} beside a prefill | pure-decode step ms by batch "
                  + ", ".join(f"{k}: {v['mean_ms']:.0f}" for k, v in r["decode_step_ms_by_batch"].items()),
                  flush=True)
        by = {r["policy"]: r for r in results if r["rate"] == rate}
        if "vllm" in by and "elora" in by:
            e, v = by["elora"], by["vllm"]
            print(f"{rate:4.2f}/s elora vs vllm: mean TTFT {e['ttft_mean_ms'] / v['ttft_mean_ms'] - 1:+.1%}, "
                  f"P95 TTFT {e['ttft_p95_ms'] / v['ttft_p95_ms'] - 1:+.1%}, "
                  f"TPOT {e['tpot_mean_ms'] / v['tpot_mean_ms'] - 1:+.1%}", flush=True)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"args": vars(args), "results": results}, indent=2) + "\n")


if __name__ == "__main__":
    main()
