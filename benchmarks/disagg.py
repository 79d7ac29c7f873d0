"""Coupled against disaggregated LoRA on this CPU: one instance, the ablations, two instances.

Three parts, each side by side in one run:

(a) one instance, batch 8: TPOT of the disaggregated engine (`serve
    --lora-server`, overlap on, push) against the coupled engine (adapters in
    the instance) on the same requests.
(b) the ablations on the same workload: push or pull, each with overlap on
    and off ("naive": the round trip after the base matmul); and layer-wise
    slot filling on or off, where it shows: the TTFT of a request whose
    adapter the server has just loaded (cold) against the same adapter's next
    request (warm), on two servers side by side (`--no-layerwise` on one).
(c) two instances sharing one LoRA server against two coupled instances:
    real `loraserve serve` processes driven over HTTP by `loraserve.bench`
    (one workload per instance, both at once), then each process's memory
    from its /metrics (instances: `loraserve_cache_bytes{kind="adapters"}`;
    the server: `loraserve_lora_server_cache_bytes` and its stats).

In (a) and (b) the engines run in this process (`LLMEngine`, the one `serve`
runs) and the LoRA server in its own (`loraserve lora-server`), so the
engine thread and the server never share an interpreter; every system sees
the same prompts in a repeat, systems alternate inside each repeat, and each
repeat has fresh prompts (no history-KV hits carry over). Processes bind
127.0.0.1 on free ports and are all stopped at the end.

    python benchmarks/disagg.py                          # all parts, about 12 minutes
    python benchmarks/disagg.py --parts ab --models tiny-mixtral --repeats 3

Results: benchmarks/results/disagg.json and .txt.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import os
import statistics
import subprocess
import sys
import time
import zlib
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from remote_roundtrip import free_port, git_commit, machine, start, stop, write_results  # noqa: E402

from loraserve.config import CacheConfig, EngineConfig  # noqa: E402
from loraserve.engine.llm_engine import LLMEngine  # noqa: E402
from loraserve.remote.config import RemoteLoraConfig  # noqa: E402
from loraserve.sampling import SamplingParams  # noqa: E402

PY = sys.executable
MODELS = ROOT / ".cache" / "test-models"
CACHE = ROOT / ".cache" / "bench" / "disagg"
BATCH, PROMPT_LEN = 8, 64
OUTPUT_LEN = {"smollm2": 32}
"""Output tokens per request in (a) and (b) (64 unless listed)."""
CACHE_CONFIG = CacheConfig(device_bytes=256 * 2**20, host_bytes=256 * 2**20)
"""Each in-process engine's tiers: room for the batch's KV and the coupled engine's adapters, and
small enough that seven SmolLM2 engines fit beside other work on this machine."""
COLD_PROMPT_LEN = 16
"""The layer-wise test's prompt: short, so that the prefill does not hide the slot fill."""


# -- models and adapters ---------------------------------------------------------

def model(name: str) -> tuple[Path, dict[str, Path], Path]:
    """(model dir, its own adapters by name, the rank-16 template for fresh adapters)."""
    from loraserve.demo import build_demo, build_tiny

    if name == "smollm2":
        root = build_demo(MODELS / "demo")
        template = root / "adapters" / "chat"  # rank 16 on all seven projections
    else:
        family = name.removeprefix("tiny-")
        root = build_tiny(MODELS / name, family)
        template = root / "adapters" / "r16"  # rank 16 on attention and every expert
    adapters = {p.name: p for p in sorted((root / "adapters").iterdir()) if (p / "adapter_config.json").is_file()}
    return root / "model", adapters, template


def big_template(model_name: str, model_dir: Path, template: Path) -> Path:
    """The cold adapter of the layer-wise test: as large as the server takes (rank 64,
    every projection) on SmolLM2, so that filling its slot takes measurable time;
    the tiny model's rank-16 template otherwise."""
    if model_name != "smollm2":
        return template
    from loraserve.demo import make_adapter

    return make_adapter(model_dir, CACHE / model_name / "template-r64", 64, 64,
                        ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"], False, seed=64)


def fresh_adapters(model_name: str, template: Path, n: int, prefix: str = "lora") -> dict[str, Path]:
    """n adapters with the template's config and fresh random weights (distinct
    contents, so the server cannot share them by hash)."""
    from safetensors.torch import load_file, save_file

    tensors = load_file(template / "adapter_model.safetensors")
    out = {}
    for i in range(n):
        d = CACHE / model_name / f"{prefix}-{i}"
        if not (d / "adapter_model.safetensors").is_file():
            d.mkdir(parents=True, exist_ok=True)
            g = torch.Generator().manual_seed(zlib.crc32(f"{prefix}-{i}".encode()))
            save_file({k: torch.randn(v.shape, generator=g) * v.std() for k, v in tensors.items()},
                      d / "adapter_model.safetensors")
            (d / "adapter_config.json").write_text((template / "adapter_config.json").read_text())
        out[f"{prefix}-{i}"] = d
    return out


def lora_server(model_dir: Path, adapters: dict[str, Path], threads: int, *extra: str,
                metrics_port: int | None = None) -> tuple[subprocess.Popen, str]:
    cmd = [PY, "-m", "loraserve.cli", "lora-server", "--model", str(model_dir), "--listen", "tcp://127.0.0.1:0",
           *(x for n, p in adapters.items() for x in ("--lora", f"{n}={p}")), *extra]
    if metrics_port is not None:
        cmd += ["--metrics-port", str(metrics_port)]
    return start(cmd, "listening on", env={"OMP_NUM_THREADS": str(threads)})


# -- (a) and (b): one engine in this process -----------------------------------------

def prompts(seed: int, n: int = BATCH, length: int = PROMPT_LEN) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(100, 20_000, (n, length), generator=g).tolist()


def run_batch(engine: LLMEngine, batch: list[list[int]], adapters: list[str | None], output_len: int) -> dict:
    """Every request at once; TTFT, TPOT (per request, then the mean), tokens/s and the remote wait."""
    sp = SamplingParams(max_tokens=output_len, temperature=0.0, ignore_eos=True)
    wait0 = getattr(engine.lora, "wait_s", 0.0)
    t0 = time.perf_counter()
    reqs = [engine.add_request(p, sp, adapter=a) for p, a in zip(batch, adapters)]
    times: dict[str, list[float]] = {r.request_id: [] for r in reqs}
    steps = 0
    while engine.has_unfinished():
        outs = engine.step()
        steps += 1
        now = time.perf_counter()
        for o in outs:
            if o.error:
                raise RuntimeError(f"request {o.request_id} failed: {o.error}")
            times[o.request_id].extend([now] * len(o.new_token_ids))
    wall = time.perf_counter() - t0
    ttft = [v[0] - t0 for v in times.values()]
    tpot = [(v[-1] - v[0]) / (len(v) - 1) for v in times.values() if len(v) > 1]
    assert all(len(v) == output_len for v in times.values())
    return {"ttft_ms": statistics.fmean(ttft) * 1e3, "tpot_ms": statistics.fmean(tpot) * 1e3 if tpot else None,
            "tok_s": len(batch) * output_len / wall, "steps": steps,
            "remote_wait_ms_per_step": (getattr(engine.lora, "wait_s", 0.0) - wait0) * 1e3 / steps}


def engines_for(model_dir: Path, adapters: dict[str, Path], endpoint: str) -> dict[str, LLMEngine]:
    out = {}
    coupled = LLMEngine(EngineConfig(model=str(model_dir), cache=CACHE_CONFIG))
    for n, p in adapters.items():
        coupled.add_adapter(n, str(p))
    out["coupled"] = coupled
    for mode in ("push", "pull"):
        for overlap in (True, False):
            out[f"{mode}, {'overlap' if overlap else 'naive'}"] = LLMEngine(EngineConfig(
                model=str(model_dir), cache=CACHE_CONFIG,
                lora_server=RemoteLoraConfig(endpoint, mode=mode, overlap=overlap)))
    return out


def part_ab(model_name: str, repeats: int, server_threads: int) -> dict:
    model_dir, adapters, template = model(model_name)
    names = list(adapters)
    assign = [names[i % len(names)] for i in range(BATCH)]
    output_len = OUTPUT_LEN.get(model_name, 64)
    result: dict = {"model": model_name, "adapters": names, "batch": BATCH, "prompt_len": PROMPT_LEN,
                    "output_len": output_len, "server_threads": server_threads, "engine_threads": torch.get_num_threads()}
    proc = None
    engines: dict[str, LLMEngine] = {}
    try:
        proc, endpoint = lora_server(model_dir, adapters, server_threads)
        engines = engines_for(model_dir, adapters, endpoint)
        for e in engines.values():  # warm-up: every adapter's slot filled, kernels touched
            run_batch(e, prompts(999, BATCH, 16), assign, 4)
        runs: dict[str, list[dict]] = {k: [] for k in engines}
        for rep in range(repeats):
            batch = prompts(rep)
            order = list(engines) if rep % 2 == 0 else list(reversed(engines))
            for k in order:
                runs[k].append(run_batch(engines[k], batch, assign, output_len))
                r = runs[k][-1]
                print(f"[{model_name}] {k:>15}: TTFT {r['ttft_ms']:7.1f} ms, TPOT {r['tpot_ms']:6.1f} ms, "
                      f"{r['tok_s']:6.1f} tok/s, remote wait {r['remote_wait_ms_per_step']:5.1f} ms/step", flush=True)
        result["runs"] = runs
        result["median"] = {k: {m: statistics.median(r[m] for r in v) for m in v[0]} for k, v in runs.items()}
        c = result["median"]["coupled"]["tpot_ms"]
        result["tpot_over_coupled"] = {k: v["tpot_ms"] / c for k, v in result["median"].items()}
        result["tpot_over_coupled_per_repeat"] = {
            k: [r["tpot_ms"] / cc["tpot_ms"] for r, cc in zip(v, runs["coupled"])] for k, v in runs.items()}
    finally:
        for e in engines.values():
            e.close()
        engines.clear()  # their weights go before the layer-wise test loads two more
        gc.collect()
        stop(proc)
    result["layerwise"] = layerwise(model_name, model_dir, big_template(model_name, model_dir, template), repeats,
                                    server_threads)
    return result


def layerwise(model_name: str, model_dir: Path, template: Path, repeats: int, server_threads: int) -> dict:
    """Cold-adapter TTFT with layer-wise filling on and off: two servers, one engine each,
    both serving the same never-used adapters (loaded at the server's start: on its
    cache tiers, in no slot). Each trial times one adapter's first request (cold) and
    its second (warm) on each server, the two servers in alternating order."""
    trials = max(4, 2 * repeats)
    cold = fresh_adapters(model_name, template, trials, prefix=f"cold-{template.name}")
    warmup = fresh_adapters(model_name, template, 1, prefix=f"warmup-{template.name}")
    rank = json.loads((template / "adapter_config.json").read_text())["r"]
    procs: dict[str, subprocess.Popen] = {}
    engines: dict[str, LLMEngine] = {}
    out: dict = {"trials": trials, "batch": 1, "prompt_len": COLD_PROMPT_LEN, "rank": rank,
                 "adapter_bytes": sum(f.stat().st_size for f in template.glob("*.safetensors")),
                 "runs": {"layerwise": [], "whole": []}}
    try:
        for k, flag in (("layerwise", "--layerwise"), ("whole", "--no-layerwise")):
            # 8 slots: a server's slots are allocated at the largest rank loaded (rank 64 on SmolLM2:
            # 116 MiB a slot, 3.5 GiB for the default 32), and two servers run side by side here
            procs[k], endpoint = lora_server(model_dir, {**warmup, **cold}, server_threads, flag, "--max-loras", "8")
            engines[k] = LLMEngine(EngineConfig(model=str(model_dir), cache=CACHE_CONFIG,
                                                lora_server=RemoteLoraConfig(endpoint)))
            run_batch(engines[k], prompts(998, 1, COLD_PROMPT_LEN), list(warmup), 2)
        for i, name in enumerate(cold):
            order = ["layerwise", "whole"] if i % 2 == 0 else ["whole", "layerwise"]
            for k in order:
                e = engines[k]
                c = run_batch(e, prompts(500 + i, 1, COLD_PROMPT_LEN), [name], 2)["ttft_ms"]
                w = run_batch(e, prompts(600 + i, 1, COLD_PROMPT_LEN), [name], 2)["ttft_ms"]
                out["runs"][k].append({"cold_ttft_ms": c, "warm_ttft_ms": w})
                print(f"[{model_name}] {k:>9}: cold TTFT {c:6.1f} ms, warm {w:6.1f} ms", flush=True)
        for k, v in out["runs"].items():
            out[k] = {"cold_ttft_ms": statistics.median(r["cold_ttft_ms"] for r in v),
                      "warm_ttft_ms": statistics.median(r["warm_ttft_ms"] for r in v),
                      "cold_minus_warm_ms": statistics.median(r["cold_ttft_ms"] - r["warm_ttft_ms"] for r in v)}
    finally:
        for e in engines.values():
            e.close()
        for p in procs.values():
            stop(p)
    return out


# -- (c): two instances, real processes over HTTP -----------------------------------------

def serve(model_dir: Path, port: int, threads: int, *extra: str, timeout: float = 300) -> subprocess.Popen:
    import httpx

    cmd = [PY, "-m", "loraserve.cli", "serve", "--model", str(model_dir), "--served-model-name", "base",
           "--port", str(port), "--public-metrics", *extra]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT,
                            env={**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": str(threads)})
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"serve on port {port} exited with {proc.returncode}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/v1/models", timeout=2).status_code == 200:
                return proc
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    stop(proc)
    raise RuntimeError(f"serve on port {port} did not come up in {timeout:.0f} s")


def scrape(port: int) -> dict[str, float]:
    import httpx

    from loraserve.bench.scrape import parse_prometheus

    return parse_prometheus(httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=10).text)


def instance_memory(m: dict[str, float]) -> dict:
    return {"adapter_bytes_device": m.get('loraserve_cache_bytes{kind="adapters",tier="device"}', 0.0),
            "adapter_bytes_host": m.get('loraserve_cache_bytes{kind="adapters",tier="host"}', 0.0),
            "adapters_on_device": m.get("loraserve_adapters_on_device", 0.0),
            "lora_slots_used": m.get("loraserve_lora_slots_used", 0.0),
            "bank_bytes": m.get("loraserve_lora_bank_bytes", 0.0),
            "remote_lora_wait_s": m.get("loraserve_remote_lora_wait_seconds_total", 0.0),
            "remote_lora_steps": m.get("loraserve_remote_lora_steps_total", 0.0),
            "kv_bytes_device": m.get('loraserve_cache_bytes{kind="running_kv",tier="device"}', 0.0)
            + m.get('loraserve_cache_bytes{kind="history_kv",tier="device"}', 0.0)}


def workloads(names: list[str], sessions: int, rate: float, output_len: int):
    from loraserve.workload import ArrivalConfig, Lengths, PopularityConfig, WorkloadConfig, generate

    return [generate(WorkloadConfig(num_sessions=sessions, num_adapters=len(names), turns=1.0,
                                    arrival=ArrivalConfig(rate=rate), popularity=PopularityConfig("uniform"),
                                    first_input=Lengths(PROMPT_LEN, "uniform"), output=Lengths(output_len),
                                    seed=seed)).renamed(names) for seed in (1, 2)]


def drive(wls, ports: list[int]) -> list:
    from loraserve.bench.client import run_workload

    async def both():
        return await asyncio.gather(*(run_workload(wl, f"http://127.0.0.1:{p}/v1", "base", progress=False)
                                      for wl, p in zip(wls, ports)))

    return asyncio.run(both())


def part_c(model_name: str, num_adapters: int, sessions: int, rate: float, output_len: int, threads: int,
           order: list[str]) -> dict:
    from loraserve.bench.metrics import summarize
    from loraserve.remote.client import LoraServerClient

    model_dir, _, template = model(model_name)
    adapters = fresh_adapters(model_name, template, num_adapters)
    wls = workloads(list(adapters), sessions, rate, output_len)
    loras = [x for n, p in adapters.items() for x in ("--lora", f"{n}={p}")]
    result: dict = {"model": model_name, "adapters": num_adapters, "sessions_per_instance": sessions,
                    "rate_per_instance": rate, "prompt_len_mean": PROMPT_LEN, "output_len": output_len,
                    "threads_per_process": threads, "deployments": {}}
    for deployment in order:
        procs: list[subprocess.Popen] = []
        try:
            ports = [free_port(), free_port()]
            server_port = None
            if deployment == "disaggregated":
                server_port = free_port()
                # as many slots as the coupled pair has together (serve's default --max-loras 8, twice)
                proc, endpoint = lora_server(model_dir, adapters, threads, "--max-loras", "16",
                                             metrics_port=server_port)
                procs.append(proc)
                for p in ports:
                    procs.append(serve(model_dir, p, threads, "--lora-server", endpoint))
            else:
                for p in ports:
                    procs.append(serve(model_dir, p, threads, *loras))
            t0 = time.monotonic()
            res = drive(wls, ports)
            elapsed = time.monotonic() - t0
            records = [r for x in res for r in x.records]
            s = summarize(records)
            d = {"summary": s, "wall_s": elapsed, "per_instance": [summarize(x.records) for x in res],
                 "output_tok_s": sum(r.output_len for r in records if r.ok) / max(x.duration for x in res),
                 "instances": [instance_memory(scrape(p)) for p in ports]}
            if server_port is not None:
                m = scrape(server_port)
                client = LoraServerClient(RemoteLoraConfig(endpoint))
                try:
                    client.connect()
                    stats = client.stats()
                finally:
                    client.close()
                d["server"] = {"cache_bytes_device": m.get('loraserve_lora_server_cache_bytes{tier="device"}', 0.0),
                               "cache_bytes_host": m.get('loraserve_lora_server_cache_bytes{tier="host"}', 0.0),
                               "adapters_device": m.get('loraserve_lora_server_adapters{tier="device"}', 0.0),
                               "adapters_host": m.get('loraserve_lora_server_adapters{tier="host"}', 0.0),
                               "adapters_in_slots": m.get('loraserve_lora_server_adapters{tier="slot"}', 0.0),
                               "bank_bytes": stats.get("bank_bytes"),
                               "max_batch_instances": stats.get("max_batch_instances"),
                               "slot_hits": stats.get("slot_hits"), "slot_misses": stats.get("slot_misses")}
            result["deployments"][deployment] = d
            print(f"[c {model_name}] {deployment:>13}: TTFT mean {s['ttft_s']['mean'] * 1e3:7.0f} ms, "
                  f"TPOT mean {s['tpot_s']['mean'] * 1e3:6.1f} ms, {d['output_tok_s']:6.1f} tok/s, "
                  f"failed {s['failed']}, adapter bytes per instance "
                  f"{[i['adapter_bytes_device'] + i['adapter_bytes_host'] for i in d['instances']]}", flush=True)
        finally:
            for p in reversed(procs):
                stop(p)
    return result


def memory_summary(c: dict) -> dict:
    """Adapter memory of each deployment, and how many adapters each keeps for the same bytes."""
    coupled, disagg = c["deployments"].get("coupled"), c["deployments"].get("disaggregated")
    if not coupled or not disagg:
        return {}
    n = c["adapters"]
    inst_c = [i["adapter_bytes_device"] + i["adapter_bytes_host"] for i in coupled["instances"]]
    inst_d = [i["adapter_bytes_device"] + i["adapter_bytes_host"] for i in disagg["instances"]]
    srv = disagg["server"]["cache_bytes_device"] + disagg["server"]["cache_bytes_host"]
    per_adapter = srv / n if n else 0
    out = {"coupled_instance_adapter_bytes": inst_c, "disagg_instance_adapter_bytes": inst_d,
           "server_adapter_bytes": srv, "bytes_per_adapter": per_adapter,
           "coupled_total_adapter_bytes": sum(inst_c), "disagg_total_adapter_bytes": sum(inst_d) + srv,
           "copies_per_adapter": {"coupled": sum(inst_c) / srv if srv else None,
                                  "disaggregated": (sum(inst_d) + srv) / srv if srv else None},
           "coupled_instance_bank_bytes": [i["bank_bytes"] for i in coupled["instances"]],
           "disagg_instance_bank_bytes": [i["bank_bytes"] for i in disagg["instances"]],
           "server_bank_bytes": disagg["server"]["bank_bytes"]}
    out["coupled_total_with_banks"] = sum(inst_c) + sum(out["coupled_instance_bank_bytes"])
    out["disagg_total_with_banks"] = (sum(inst_d) + srv + sum(out["disagg_instance_bank_bytes"])
                                      + (out["server_bank_bytes"] or 0))
    # the same adapter memory as the coupled pair holds, spent once on the server
    out["adapters_for_coupled_memory"] = {"coupled": n,
                                          "disaggregated": int(sum(inst_c) // per_adapter) if per_adapter else None}
    return out


# -- output ------------------------------------------------------------------------------

def table(result: dict) -> str:
    m = result["machine"]
    lines = [f"disagg: {result['date']}, commit {result['commit']}, {result['runtime_s']:.0f} s",
             f"machine: {m['model_name']} (family {m['family']} model {m['model']}), {m['cpus']} cpus, {m['class']}; "
             f"load average at start {m['loadavg'][0]:.2f}, at end {result['loadavg_end'][0]:.2f}", ""]
    for ab in result.get("ab", []):
        lines += [f"(a)+(b) {ab['model']}: batch {ab['batch']} over adapters {', '.join(ab['adapters'])}, "
                  f"{ab['prompt_len']}-token prompts, {ab['output_len']} output tokens; engine in this process "
                  f"({ab['engine_threads']} threads), LoRA server in its own ({ab['server_threads']} thread(s)); "
                  f"medians of {len(ab['runs']['coupled'])} repeats", "",
                  "| system | TTFT ms | TPOT ms | TPOT / coupled | per-repeat TPOT / coupled | tok/s "
                  "| remote wait ms/step |", "|---|---|---|---|---|---|---|"]
        for k, v in ab["median"].items():
            per = ", ".join(f"{x:.2f}" for x in ab["tpot_over_coupled_per_repeat"][k])
            lines.append(f"| {k} | {v['ttft_ms']:.1f} | {v['tpot_ms']:.1f} | {ab['tpot_over_coupled'][k]:.2f} | {per} "
                         f"| {v['tok_s']:.1f} | {v['remote_wait_ms_per_step']:.1f} |")
        lw = ab["layerwise"]
        lines += ["", f"layer-wise filling: {lw['trials']} never-used rank-{lw['rank']} adapters "
                      f"({lw['adapter_bytes'] / 2**20:.1f} MiB each on disk), one {lw['prompt_len']}-token request each, "
                      "its first (cold) and second (warm) time (medians, ms)", "", "| server | cold TTFT | warm TTFT | cold - warm |",
                  "|---|---|---|---|"]
        for k in ("layerwise", "whole"):
            v = lw[k]
            lines.append(f"| {'--layerwise' if k == 'layerwise' else '--no-layerwise'} | {v['cold_ttft_ms']:.1f} "
                         f"| {v['warm_ttft_ms']:.1f} | {v['cold_minus_warm_ms']:.1f} |")
        lines.append("")
    c = result.get("c")
    if c:
        lines += [f"(c) {c['model']}: two instances, {c['adapters']} rank-16 adapters, per instance "
                  f"{c['sessions_per_instance']} requests (uniform over the adapters, Poisson at "
                  f"{c['rate_per_instance']}/s, ~{c['prompt_len_mean']}-token prompts, {c['output_len']} output "
                  f"tokens), both instances at once over HTTP; {c['threads_per_process']} torch thread(s) per process",
                  "", "| deployment | TTFT mean ms | TTFT p95 ms | TPOT mean ms | output tok/s | failed "
                  "| adapter bytes per instance (MiB) | LoRA server adapter bytes (MiB) |",
                  "|---|---|---|---|---|---|---|---|"]
        for k, d in c["deployments"].items():
            s = d["summary"]
            inst = " / ".join(f"{(i['adapter_bytes_device'] + i['adapter_bytes_host']) / 2**20:.1f}"
                              for i in d["instances"])
            srv = (f"{(d['server']['cache_bytes_device'] + d['server']['cache_bytes_host']) / 2**20:.1f}"
                   if "server" in d else "-")
            lines.append(f"| {k} | {s['ttft_s']['mean'] * 1e3:.0f} | {s['ttft_s']['p95'] * 1e3:.0f} "
                         f"| {s['tpot_s']['mean'] * 1e3:.1f} | {d['output_tok_s']:.1f} | {s['failed']} | {inst} | {srv} |")
        mem = c.get("memory")
        if mem:
            lines += ["", f"memory: {mem['bytes_per_adapter'] / 2**20:.2f} MiB per adapter; copies of each adapter "
                          f"held: coupled {mem['copies_per_adapter']['coupled']:.1f}, disaggregated "
                          f"{mem['copies_per_adapter']['disaggregated']:.1f}; for the coupled pair's adapter bytes "
                          f"({mem['coupled_total_adapter_bytes'] / 2**20:.1f} MiB) the server keeps "
                          f"{mem['adapters_for_coupled_memory']['disaggregated']} adapters resident against "
                          f"{mem['adapters_for_coupled_memory']['coupled']}; compute slots (LoRA banks): "
                          f"{' / '.join(f'{b / 2**20:.1f}' for b in mem['coupled_instance_bank_bytes'])} MiB in the "
                          f"coupled instances, {' / '.join(f'{b / 2**20:.1f}' for b in mem['disagg_instance_bank_bytes'])}"
                          f" MiB in the disaggregated ones, {mem['server_bank_bytes'] / 2**20:.1f} MiB on the server "
                          "(--max-loras 16: the pair's 2 x 8 slots)"]
            lines.append(f"all adapter memory, tiers and slots: coupled pair {mem['coupled_total_with_banks'] / 2**20:.1f}"
                         f" MiB, disaggregated (instances + server) {mem['disagg_total_with_banks'] / 2**20:.1f} MiB")
            waits = [i["remote_lora_wait_s"] / i["remote_lora_steps"] * 1e3
                     for i in c["deployments"]["disaggregated"]["instances"] if i["remote_lora_steps"]]
            if waits:
                lines.append("disaggregated instances' wait for deltas: " + " / ".join(f"{w:.1f}" for w in waits)
                             + " ms per step (loraserve_remote_lora_wait_seconds_total / loraserve_remote_lora_steps_total)")
            srv = c["deployments"]["disaggregated"]["server"]
            lines.append(f"server: {srv['adapters_device']:.0f} adapters on its device tier, "
                         f"{srv['adapters_in_slots']:.0f} in slots; most instances one batched kernel served: "
                         f"{srv['max_batch_instances']}")
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--parts", nargs="+", default=["ab", "c"], choices=["ab", "c"],
                    help="ab: (a) and (b), which share one workload; c: two instances over HTTP")
    ap.add_argument("--models", nargs="+", default=["tiny-mixtral", "smollm2"], help="models of (a) and (b)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--server-threads", type=int, default=1, help="torch threads of the LoRA server in (a), (b)")
    ap.add_argument("--c-model", default="smollm2")
    ap.add_argument("--c-adapters", type=int, default=8)
    ap.add_argument("--c-sessions", type=int, default=12, help="requests per instance in (c)")
    ap.add_argument("--c-rate", type=float, default=0.5, help="requests/s per instance in (c)")
    ap.add_argument("--c-output", type=int, default=32)
    ap.add_argument("--c-threads", type=int, default=1, help="torch threads of every process in (c)")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "disagg.json"))
    args = ap.parse_args()
    t0 = time.monotonic()
    result: dict = {"date": time.strftime("%Y-%m-%d %H:%M"), "commit": git_commit(), "machine": machine(),
                    "args": {**vars(args), "out": os.path.relpath(args.out, ROOT)}}
    print(json.dumps(result["machine"]), flush=True)
    if "ab" in args.parts:
        result["ab"] = [part_ab(m, args.repeats, args.server_threads) for m in args.models]
    if "c" in args.parts:
        c = part_c(args.c_model, args.c_adapters, args.c_sessions, args.c_rate, args.c_output, args.c_threads,
                   ["coupled", "disaggregated"])
        c["memory"] = memory_summary(c)
        result["c"] = c
    result["runtime_s"] = time.monotonic() - t0
    write_results(result, Path(args.out), table)


if __name__ == "__main__":
    main()
