"""TTFT and TPOT of the cache policies on the real engine, side by side in one run.

SmolLM2-135M (the demo model) with 50 rank-16 adapters (all seven projections),
Zipf-popular; multi-turn sessions (each turn resends the whole conversation so
far plus a new user message), sessions starting as a Poisson process, a think
time between turns. The device pool is sized so that not everything fits (10 of
the 50 adapters with no KV at all); the host tier holds everything. The same
seeded workload runs under each policy; arrivals follow wall time, so queueing
is real. A synthetic approximation of the paper's chatbot traces, which are not
available here.

    python benchmarks/elora_ttft.py                 # elora, vllm, slora
    python benchmarks/elora_ttft.py --policies elora elora-wos --sessions 12
"""

from __future__ import annotations

import argparse
import heapq
import json
import random
import statistics
import time
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from loraserve.config import CacheConfig, EngineConfig, SchedulerConfig
from loraserve.demo import build_demo
from loraserve.engine.llm_engine import LLMEngine
from loraserve.request import Request
from loraserve.sampling import SamplingParams

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


def workload(args, names: list[str]) -> list[dict]:
    """Sessions: (start time, adapter, system prompt, per-turn user messages)."""
    rnd = random.Random(args.seed)
    weights = [1 / (i + 1) ** args.zipf for i in range(len(names))]
    t, sessions = 0.0, []
    for s in range(args.sessions):
        t += rnd.expovariate(args.rate)
        sessions.append(dict(
            start=t, adapter=rnd.choices(names, weights)[0],
            system=[rnd.randrange(1000, 40000) for _ in range(args.system_tokens)],
            turns=[[rnd.randrange(1000, 40000) for _ in range(args.user_tokens)] for _ in range(args.turns)]))
    return sessions


def run(policy: str, args, model: Path, adapters: dict[str, Path], sessions: list[dict]) -> dict:
    engine = LLMEngine(EngineConfig(
        model=str(model), cache=CacheConfig(device_bytes=args.device_mib * 2**20, host_bytes=2 * 2**30,
                                            policy=policy),
        scheduler=SchedulerConfig(max_loras=8)))
    for name, path in adapters.items():
        engine.add_adapter(name, str(path))
    sp = SamplingParams(max_tokens=args.output_tokens, temperature=0.0, ignore_eos=True)
    engine.add_request(list(range(100, 140)), sp)  # warm-up (base model), not measured
    while engine.has_unfinished():
        engine.step()
    base = {k: engine.cache.counters[k] for k in engine.cache.counters}
    events = [(s["start"], i, 0, s["system"] + s["turns"][0]) for i, s in enumerate(sessions)]
    heapq.heapify(events)
    live: dict[str, tuple[int, int, Request]] = {}
    done: list[Request] = []
    invalid, start = [], time.monotonic()
    last_sample = 0.0
    while events or engine.has_unfinished():
        now = time.monotonic() - start
        while events and events[0][0] <= now:
            _, s, turn, prompt = heapq.heappop(events)
            req = engine.add_request(prompt, sp, adapter=sessions[s]["adapter"], request_id=f"s{s}-t{turn}")
            live[req.request_id] = (s, turn, req)
        if engine.has_unfinished():
            for out in engine.step():
                if out.finished:
                    s, turn, req = live.pop(out.request_id)
                    done.append(req)
                    if turn + 1 < args.turns:
                        prompt = req.prompt_token_ids + req.output_token_ids + sessions[s]["turns"][turn + 1]
                        heapq.heappush(events, (now + args.think, s, turn + 1, prompt))
        else:
            engine.idle_tick()
            time.sleep(min(0.005, max(0.0, events[0][0] - now)) if events else 0)
        if now - last_sample > 0.5:
            last_sample = now
            invalid.append(engine.cache.invalid_kv_fraction())
    engine.close()
    ttft = [r.first_token_time - r.arrival_time for r in done]
    tpot = [(r.finish_time - r.first_token_time) / (r.num_output_tokens - 1) for r in done]
    queue = [r.first_scheduled_time - r.arrival_time - r.lora_wait - r.kv_wait for r in done]
    c = {k: engine.cache.counters[k] - base.get(k, 0) for k in engine.cache.counters}
    admissions = c.get("adapter_hits", 0) + c.get("adapter_misses", 0)
    return {
        "policy": policy, "requests": len(done),
        "ttft_mean_ms": 1e3 * statistics.mean(ttft), "ttft_p95_ms": 1e3 * _pct(ttft, 95),
        "tpot_mean_ms": 1e3 * statistics.mean(tpot), "tpot_p95_ms": 1e3 * _pct(tpot, 95),
        "ttft_queue_ms": 1e3 * statistics.mean(queue),
        "ttft_lora_cold_ms": 1e3 * statistics.mean(r.lora_wait for r in done),
        "ttft_kv_cold_ms": 1e3 * statistics.mean(r.kv_wait for r in done),
        "ttft_compute_ms": 1e3 * statistics.mean(r.first_token_time - r.first_scheduled_time for r in done),
        "adapter_hit_rate": c.get("adapter_hits", 0) / admissions if admissions else 0.0,
        "kv_hit_rate": c.get("kv_hit_tokens", 0) / c["prompt_tokens"] if c.get("prompt_tokens") else 0.0,
        "swap_in_mib": c.get("swap_in_bytes", 0) / 2**20, "swap_out_mib": c.get("swap_out_bytes", 0) / 2**20,
        "invalid_kv_fraction_mean": statistics.mean(invalid) if invalid else 0.0,
        "preemptions": engine.scheduler.num_preemptions,
    }


def _pct(xs: list[float], p: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(p / 100 * (len(xs) - 1))))]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--policies", nargs="+", default=["elora", "vllm", "slora"])
    ap.add_argument("--adapters", type=int, default=50)
    ap.add_argument("--sessions", type=int, default=24)
    ap.add_argument("--turns", type=int, default=3)
    ap.add_argument("--rate", type=float, default=0.5, help="sessions started per second (Poisson)")
    ap.add_argument("--think", type=float, default=2.0, help="seconds between a reply and the next turn")
    ap.add_argument("--zipf", type=float, default=1.0)
    ap.add_argument("--system-tokens", type=int, default=64)
    ap.add_argument("--user-tokens", type=int, default=32)
    ap.add_argument("--output-tokens", type=int, default=16)
    ap.add_argument("--device-mib", type=int, default=192)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "elora_ttft.json"))
    args = ap.parse_args()
    torch.set_num_threads(max(1, torch.get_num_threads()))
    demo = build_demo(ROOT / ".cache" / "test-models" / "demo")
    adapters = make_adapters(demo, args.adapters)
    sessions = workload(args, list(adapters))
    results = [run(p, args, demo / "model", adapters, sessions) for p in args.policies]
    for r in results:
        print(f"{r['policy']:>10}: TTFT mean {r['ttft_mean_ms']:7.0f} ms  P95 {r['ttft_p95_ms']:7.0f} ms | "
              f"TPOT mean {r['tpot_mean_ms']:5.0f} ms | queue {r['ttft_queue_ms']:6.0f} lora-cold "
              f"{r['ttft_lora_cold_ms']:5.1f} kv-cold {r['ttft_kv_cold_ms']:5.1f} compute {r['ttft_compute_ms']:5.0f} ms"
              f" | hits: adapter {r['adapter_hit_rate']:.2f} kv {r['kv_hit_rate']:.2f} | invalid KV "
              f"{r['invalid_kv_fraction_mean']:.2f}")
    if "vllm" in args.policies and "elora" in args.policies:
        e, v = (next(r for r in results if r["policy"] == p) for p in ("elora", "vllm"))
        print(f"elora vs vllm: mean TTFT {e['ttft_mean_ms'] / v['ttft_mean_ms'] - 1:+.1%}, "
              f"P95 TTFT {e['ttft_p95_ms'] / v['ttft_p95_ms'] - 1:+.1%}, TPOT {e['tpot_mean_ms'] / v['tpot_mean_ms'] - 1:+.1%}")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"args": vars(args), "results": results}, indent=2) + "\n")


if __name__ == "__main__":
    main()
