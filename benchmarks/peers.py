"""Real servers side by side on this machine, through the OpenAI API, one workload file.

loraserve (each cache policy), the transformers + PEFT baseline server
(`benchmarks/baseline_server.py`, a labelled baseline, not loraserve) and, if
its virtualenv exists, vLLM's CPU build — all serving the SmolLM2 demo model
with the same rank-16 adapters — each started as a subprocess and driven by
`loraserve.bench` with the same multi-turn workload (Zipf-popular adapters,
Poisson session starts), one after another in one run.

    python benchmarks/peers.py
    python benchmarks/peers.py --systems elora vllm-policy baseline --sessions 12
    VLLM_PYTHON=VENV/bin/python python benchmarks/peers.py   # include vLLM from its virtualenv VENV (PEERS.md)
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx

from loraserve.bench.client import run_workload_sync
from loraserve.bench.metrics import SLO, summarize
from loraserve.demo import build_demo
from loraserve.workload import ArrivalConfig, Lengths, PopularityConfig, WorkloadConfig, generate

sys.path.insert(0, str(Path(__file__).resolve().parent))
from elora_ttft import make_adapters  # noqa: E402  (the same 50 rank-16 adapters)

ROOT = Path(__file__).resolve().parent.parent
VENV = ROOT / ".venv" / "bin"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def command(system: str, model: Path, adapters: dict[str, Path], port: int, device_mib: int) -> list[str]:
    loras = [f"{n}={p}" for n, p in adapters.items()]
    if system in ("elora", "vllm-policy", "slora"):
        policy = "vllm" if system == "vllm-policy" else system
        return [str(VENV / "loraserve"), "serve", "--model", str(model), "--served-model-name", "base",
                "--port", str(port), "--cache-policy", policy, "--device-cache", f"{device_mib}MiB",
                *(x for lo in loras for x in ("--lora", lo))]
    if system == "baseline":
        return [str(VENV / "python"), str(ROOT / "benchmarks" / "baseline_server.py"), "--model", str(model),
                "--served-name", "base", "--port", str(port), *(x for lo in loras for x in ("--adapter", lo))]
    if system == "vllm-cpu":
        return [os.environ["VLLM_PYTHON"], "-m", "vllm.entrypoints.openai.api_server", "--model", str(model),
                "--served-model-name", "base", "--port", str(port), "--enable-lora", "--max-lora-rank", "16",
                "--max-loras", str(len(adapters)), "--max-cpu-loras", str(len(adapters)), "--dtype", "float32",
                "--lora-modules", *loras]
    raise ValueError(f"unknown system {system!r}")


def serve(cmd: list[str], port: int, log: Path, timeout: float = 900.0) -> subprocess.Popen:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "VLLM_CPU_KVCACHE_SPACE": os.environ.get("VLLM_CPU_KVCACHE_SPACE", "2")}
    proc = subprocess.Popen(cmd, stdout=log.open("w"), stderr=subprocess.STDOUT, env=env)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{cmd[0]} exited with {proc.returncode}; see {log}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/v1/models", timeout=2).status_code == 200:
                return proc
        except httpx.HTTPError:
            pass
        time.sleep(1)
    proc.kill()
    raise RuntimeError(f"{cmd[0]} did not come up in {timeout:.0f} s; see {log}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    default = ["elora", "vllm-policy", "slora", "baseline"] + (["vllm-cpu"] if os.environ.get("VLLM_PYTHON") else [])
    ap.add_argument("--systems", nargs="+", default=default)
    ap.add_argument("--adapters", type=int, default=20)
    ap.add_argument("--sessions", type=int, default=12)
    ap.add_argument("--rate", type=float, default=0.25, help="sessions started per second")
    ap.add_argument("--device-mib", type=int, default=384, help="loraserve device tier (13 of the 20 adapters, no KV)")
    ap.add_argument("--slo-ttft", type=float, default=2.0)
    ap.add_argument("--slo-tpot", type=float, default=0.2)
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "peers.json"))
    args = ap.parse_args()
    demo = build_demo(ROOT / ".cache" / "test-models" / "demo")
    adapters = make_adapters(demo, args.adapters)
    wl = generate(WorkloadConfig(num_sessions=args.sessions, num_adapters=args.adapters, turns=2.0, think_s=2.0,
                                 arrival=ArrivalConfig(rate=args.rate), popularity=PopularityConfig("zipf", 1.0),
                                 first_input=Lengths(96, "uniform"), input=Lengths(32, "uniform"),
                                 output=Lengths(24, "uniform"), seed=0))
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    wl.save(out.with_suffix(".workload.jsonl"))
    slo = SLO(args.slo_ttft, args.slo_tpot)
    results = {}
    for system in args.systems:
        port = free_port()
        log = out.parent / f"peers-{system}.log"
        try:
            started = time.monotonic()
            proc = serve(command(system, demo / "model", adapters, port, args.device_mib), port, log)
            startup = time.monotonic() - started
        except (RuntimeError, KeyError, FileNotFoundError) as e:
            print(f"{system}: could not start: {e}", flush=True)
            results[system] = {"error": str(e)}
            continue
        try:
            res = run_workload_sync(wl, f"http://127.0.0.1:{port}/v1", "base", progress=False)
        finally:
            proc.terminate()
            proc.wait(timeout=60)
        s = summarize(res.records, slo)
        results[system] = {"summary": s, "startup_s": startup}
        print(f"{system:>12}: TTFT mean {s['ttft_s']['mean'] * 1e3:7.0f} ms P95 {s['ttft_s']['p95'] * 1e3:7.0f} ms | "
              f"TPOT mean {s['tpot_s']['mean'] * 1e3:5.0f} ms | {s['output_throughput_tok_s']:5.1f} tok/s | "
              f"SLO attainment {s['slo_attainment']:.2f} | failed {s['failed']} | startup {startup:.0f} s", flush=True)
    ok = {k: v["summary"] for k, v in results.items() if "summary" in v}
    if "elora" in ok:
        e = ok["elora"]
        for other, s in ok.items():
            if other != "elora":
                print(f"elora vs {other}: mean TTFT ×{e['ttft_s']['mean'] / s['ttft_s']['mean']:.2f}, "
                      f"P95 TTFT ×{e['ttft_s']['p95'] / s['ttft_s']['p95']:.2f}, "
                      f"TPOT ×{e['tpot_s']['mean'] / s['tpot_s']['mean']:.2f}, "
                      f"throughput ×{e['output_throughput_tok_s'] / s['output_throughput_tok_s']:.2f}")
    out.write_text(json.dumps({"args": vars(args), "results": results}, indent=1) + "\n")


if __name__ == "__main__":
    main()
