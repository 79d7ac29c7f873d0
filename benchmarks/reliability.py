"""The server under overload, a long soak, and kill -9 (issue 17), on the demo model.

Traffic goes only to a server this script starts on 127.0.0.1; every request
has a timeout and every part is bounded in count and time.

- burst: 2,000 requests at once against `--max-waiting 64`. Every answer must
  be a 200 or a 429 with Retry-After, none a 5xx, none past its timeout; then
  /health is ok and no KV block is held.
- kill: greedy streams under load, the server killed with SIGKILL, restarted
  with the same flags. Every reply that completed equals the reply the same
  prompt got before (no wrong answers); clients see connection errors; the
  restarted server lists the same startup adapters and answers the same.
- soak: the serviceable rate is measured first (completed requests per second
  with 16 clients streaming back to back, the same mix), then Poisson
  arrivals at 80% of it for `--soak-minutes`, over mixed adapters, with 10% of
  clients disconnecting mid-stream and an adapter loaded and the previous one
  unloaded every minute. Resident memory after the first 5 minutes must grow
  less than 5%; no accepted request may be lost (each finishes, ends with an
  error event, or was dropped by its client on purpose); TTFT percentiles and
  mean TPOT of the last 5 minutes within 20% of the first 5's.

    python benchmarks/reliability.py                          # all three, a 30-minute soak
    python benchmarks/reliability.py --parts burst kill
    python benchmarks/reliability.py --parts soak --soak-minutes 6
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import signal
import sys
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))

from disagg import fresh_adapters, model, scrape, serve  # noqa: E402
from remote_roundtrip import free_port, git_commit, machine, stop, write_results  # noqa: E402

from loraserve.bench.metrics import mean, percentile  # noqa: E402

PROMPTS = ["The history of the printing press", "Write a SQL query that counts users by country",
           "A short poem about the sea", "Explain how a bicycle stays upright", "List three uses of copper"]


def rss_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no VmRSS")


def start(model_dir: Path, port: int, adapters: dict[str, Path], lora_dir: Path, *extra: str):
    flags = [x for n, p in adapters.items() for x in ("--lora", f"{n}={p}")]
    return serve(model_dir, port, 2, *flags, "--lora-dir", str(lora_dir), *extra)


def state(port: int) -> dict:
    m = scrape(port)
    return {k: m.get(f"loraserve_{k}", 0.0) for k in ("running_kv_blocks", "num_requests_running",
                                                       "num_requests_waiting", "requests_in_flight")}


async def stream_once(http: httpx.AsyncClient, body: dict, drop_after: int | None = None) -> dict:
    """One streamed completion: its outcome (done / error_event / dropped /
    refused / lost), its status, and its timings relative to the send."""
    t0 = time.perf_counter()
    out: dict = {"t": t0, "model": body["model"], "ttft": None, "e2e": None, "tokens": 0, "text": ""}
    try:
        async with http.stream("POST", "/v1/completions", json={**body, "stream": True}) as resp:
            out["status"] = resp.status_code
            if resp.status_code != 200:
                await resp.aread()
                out["outcome"] = "refused"
                out["retry_after"] = resp.headers.get("retry-after")
                return out
            async for line in resp.aiter_lines():
                if not line.startswith("data:"):
                    continue
                data = line[5:].strip()
                if data == "[DONE]":
                    out.setdefault("outcome", "done")
                    break
                chunk = json.loads(data)
                if "error" in chunk:
                    out["outcome"], out["error"] = "error_event", chunk["error"].get("message", "")[:200]
                    continue
                for c in chunk.get("choices") or []:
                    if c.get("text"):
                        out["ttft"] = out["ttft"] or time.perf_counter() - t0
                        out["tokens"] += 1
                        out["text"] += c["text"]
                if drop_after is not None and out["tokens"] >= drop_after:
                    out["outcome"] = "dropped"
                    return out
            else:
                out["outcome"] = "lost"  # the body ended without [DONE]
    except (httpx.HTTPError, OSError) as e:
        out.setdefault("status", None)
        out["outcome"], out["error"] = "lost", f"{type(e).__name__}: {e}"[:200]
    out["e2e"] = time.perf_counter() - t0
    return out


# -- burst -----------------------------------------------------------------------

async def _burst(url: str, n: int, timeout: float) -> list[dict]:
    limits = httpx.Limits(max_connections=None, max_keepalive_connections=0)
    async with httpx.AsyncClient(base_url=url, limits=limits, timeout=httpx.Timeout(timeout, connect=60)) as http:
        async def one(i: int) -> dict:
            body = {"model": ["base", "chat", "sql", "poet"][i % 4], "prompt": PROMPTS[i % len(PROMPTS)],
                    "max_tokens": 8, "temperature": 0}
            t0 = time.perf_counter()
            try:
                r = await http.post("/v1/completions", json=body)
            except httpx.TimeoutException:
                return {"status": "timeout", "s": time.perf_counter() - t0}
            except httpx.HTTPError as e:
                return {"status": f"{type(e).__name__}", "s": time.perf_counter() - t0}
            ok = r.status_code == 200 and r.json()["choices"][0]["finish_reason"] in ("length", "stop")
            return {"status": r.status_code, "retry_after": r.headers.get("retry-after"), "ok": ok,
                    "s": time.perf_counter() - t0}
        return await asyncio.gather(*(one(i) for i in range(n)))


def burst(model_dir, adapters, lora_dir, n: int, timeout: float) -> dict:
    port = free_port()
    proc = start(model_dir, port, adapters, lora_dir, "--max-waiting", "64")
    try:
        t0 = time.perf_counter()
        answers = asyncio.run(_burst(f"http://127.0.0.1:{port}", n, timeout))
        took = time.perf_counter() - t0
        time.sleep(1.0)
        health = httpx.get(f"http://127.0.0.1:{port}/health", timeout=10).json()
        after = state(port)
    finally:
        stop(proc)
    statuses: dict[str, int] = {}
    for a in answers:
        statuses[str(a["status"])] = statuses.get(str(a["status"]), 0) + 1
    ok = [a for a in answers if a["status"] == 200]
    refused = [a for a in answers if a["status"] == 429]
    return {"requests": n, "max_waiting": 64, "seconds": round(took, 1), "statuses": statuses,
            "ok_complete": sum(a["ok"] for a in ok), "refused_with_retry_after": sum(bool(a["retry_after"])
                                                                                   for a in refused),
            "server_errors": sum(1 for a in answers if isinstance(a["status"], int) and a["status"] >= 500),
            "hung": statuses.get("timeout", 0), "slowest_answer_s": round(max(a["s"] for a in answers), 2),
            "health_after": health, "after": after,
            "pass": (set(statuses) <= {"200", "429"} and len(refused) == sum(bool(a["retry_after"]) for a in refused)
                     and all(a["ok"] for a in ok) and health == {"status": "ok"}
                     and after["running_kv_blocks"] == 0 and after["requests_in_flight"] == 0)}


# -- kill -9 and restart -----------------------------------------------------------

KILL_CASES = [(m, p) for m in ("base", "chat", "sql", "poet") for p in PROMPTS[:3]]


def greedy(model_name: str, prompt: str) -> dict:
    return {"model": model_name, "prompt": prompt, "max_tokens": 24, "temperature": 0, "ignore_eos": True}


async def _answers(url: str) -> dict[str, str]:
    async with httpx.AsyncClient(base_url=url, timeout=120) as http:
        out = {}
        for m, p in KILL_CASES:  # one at a time: the reference is a batch of one
            r = await stream_once(http, greedy(m, p))
            assert r["outcome"] == "done", r
            out[f"{m}|{p}"] = r["text"]
        return out


async def _under_load(url: str, expected: dict[str, str], proc, kill_after: float, clients: int) -> list[dict]:
    stop_at = [float("inf")]
    results: list[dict] = []

    async def client(i: int, http: httpx.AsyncClient) -> None:
        rng = random.Random(i)
        while time.perf_counter() < stop_at[0]:
            m, p = rng.choice(KILL_CASES)
            r = await stream_once(http, greedy(m, p))
            r["expected"] = expected[f"{m}|{p}"]
            results.append(r)
            if r["outcome"] == "lost":
                await asyncio.sleep(0.2)  # the server is gone: keep knocking, politely

    async def killer() -> None:
        await asyncio.sleep(kill_after)
        proc.send_signal(signal.SIGKILL)
        stop_at[0] = time.perf_counter() + 3.0

    async with httpx.AsyncClient(base_url=url, timeout=httpx.Timeout(60, connect=5)) as http:
        await asyncio.gather(killer(), *(client(i, http) for i in range(clients)))
    return results


def kill(model_dir, adapters, lora_dir, runtime: dict[str, Path], clients: int, kill_after: float) -> dict:
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    extra = ("--dtype", "float32")  # greedy replies compared across batch shapes: the exact dtype
    proc = start(model_dir, port, adapters, lora_dir, *extra)
    try:
        expected = asyncio.run(_answers(url))
        name, path = next(iter(runtime.items()))
        loaded = httpx.post(url + "/v1/load_lora_adapter", json={"lora_name": name, "lora_path": str(path)},
                            timeout=120).status_code
        models_before = sorted(m["id"] for m in httpx.get(url + "/v1/models", timeout=10).json()["data"])
        results = asyncio.run(_under_load(url, expected, proc, kill_after, clients))
        proc.wait(timeout=30)
        t0 = time.perf_counter()
        proc = start(model_dir, port, adapters, lora_dir, *extra)
        restart_s = time.perf_counter() - t0
        models_after = sorted(m["id"] for m in httpx.get(url + "/v1/models", timeout=10).json()["data"])
        same_answers = asyncio.run(_answers(url)) == expected
    finally:
        stop(proc)
    done = [r for r in results if r["outcome"] == "done"]
    wrong = [r for r in done if r["text"] != r["expected"]]
    outcomes: dict[str, int] = {}
    for r in results:
        outcomes[r["outcome"]] = outcomes.get(r["outcome"], 0) + 1
    startup = sorted(["base", *adapters])
    return {"clients": clients, "kill_after_s": kill_after, "dtype": "float32", "outcomes": outcomes,
            "completed": len(done), "wrong_answers": len(wrong), "wrong_examples": [
                {k: r[k] for k in ("model", "text", "expected")} for r in wrong[:3]],
            "client_errors_seen": sorted({r.get("error", "").split(":")[0] for r in results if r.get("error")}),
            "runtime_loaded_before_kill": {name: loaded}, "models_before": models_before,
            "models_after_restart": models_after, "restart_to_healthy_s": round(restart_s, 1),
            "same_answers_after_restart": same_answers,
            "pass": not wrong and outcomes.get("lost", 0) > 0 and models_after == startup and same_answers}


# -- soak ------------------------------------------------------------------------

def mixed(rng: random.Random, models: list[str]) -> dict:
    """The soak's mix: Zipf-ish over the models being served, 1-6 sentences in, 16-64 tokens out."""
    weights = [1 / (i + 1) for i in range(len(models))]
    prompt = " ".join(rng.choice(PROMPTS) for _ in range(rng.randint(1, 6)))
    return {"model": rng.choices(models, weights)[0], "prompt": prompt, "max_tokens": rng.randint(16, 64),
            "temperature": 0.7, "seed": rng.randrange(2**31), "ignore_eos": True}


async def _saturated(url: str, models: list[str], seconds: float, clients: int) -> float:
    """Completed requests per second with `clients` sending back to back for
    `seconds` (and finishing what they sent)."""
    done = [0]
    start = time.perf_counter()

    async def client(i: int, http: httpx.AsyncClient) -> None:
        rng = random.Random(1000 + i)
        while time.perf_counter() - start < seconds:
            r = await stream_once(http, mixed(rng, models))  # awaited first: `+=` would read done[0] before
            done[0] += r["outcome"] == "done"

    async with httpx.AsyncClient(base_url=url, timeout=120) as http:
        await asyncio.gather(*(client(i, http) for i in range(clients)))
    if not done[0]:
        raise RuntimeError("no request completed while measuring the serviceable rate")
    return done[0] / (time.perf_counter() - start)


async def _soak(url: str, pid: int, rate: float, seconds: float, runtime: dict[str, Path]) -> dict:
    rng = random.Random(0)
    models = ["base", "chat", "sql", "poet"]
    requests: list[asyncio.Task] = []
    samples: list[dict] = []
    swaps: list[dict] = []
    t0 = time.perf_counter()

    async def adapters_every_minute(http: httpx.AsyncClient) -> None:
        previous = None
        for name, path in runtime.items():
            await asyncio.sleep(60)
            if time.perf_counter() - t0 >= seconds:
                return
            load = await http.post("/v1/load_lora_adapter", json={"lora_name": name, "lora_path": str(path)})
            models.append(name)
            unload = None
            if previous is not None:
                models.remove(previous)
                unload = (await http.post("/v1/unload_lora_adapter", json={"lora_name": previous})).status_code
            swaps.append({"t": round(time.perf_counter() - t0), "load": load.status_code, "unload": unload})
            previous = name

    async def sample(http: httpx.AsyncClient) -> None:
        while time.perf_counter() - t0 < seconds:
            samples.append({"t": time.perf_counter() - t0, "rss": rss_bytes(pid), "load1": os.getloadavg()[0]})
            await asyncio.sleep(5)

    limits = httpx.Limits(max_connections=None, max_keepalive_connections=64)
    async with httpx.AsyncClient(base_url=url, limits=limits, timeout=httpx.Timeout(120, connect=10)) as http:
        side = [asyncio.create_task(adapters_every_minute(http)), asyncio.create_task(sample(http))]
        while (now := time.perf_counter() - t0) < seconds:
            await asyncio.sleep(rng.expovariate(rate))
            drop = rng.randint(1, 8) if rng.random() < 0.10 else None
            requests.append(asyncio.create_task(stream_once(http, mixed(rng, list(models)), drop)))
        results = await asyncio.gather(*requests)
        for task in side:
            task.cancel()
    for r in results:
        r["t"] -= t0
    return {"results": results, "samples": samples, "swaps": swaps}


def window(results: list[dict], start: float, end: float) -> dict:
    done = [r for r in results if start <= r["t"] < end and r["outcome"] == "done" and r["ttft"] is not None]
    tpot = [(r["e2e"] - r["ttft"]) / (r["tokens"] - 1) for r in done if r["tokens"] > 1]
    return {"requests": len(done), "ttft_p50": percentile([r["ttft"] for r in done], 50),
            "ttft_p95": percentile([r["ttft"] for r in done], 95), "tpot_mean": mean(tpot)}


def soak(model_dir, adapters, lora_dir, runtime: dict[str, Path], minutes: float, calibrate_s: float) -> dict:
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    proc = start(model_dir, port, adapters, lora_dir)
    try:
        capacity = asyncio.run(_saturated(url, ["base", "chat", "sql", "poet"], calibrate_s, 16))
        rate = 0.8 * capacity
        run = asyncio.run(_soak(url, proc.pid, rate, minutes * 60, runtime))
        time.sleep(1.0)
        health = httpx.get(url + "/health", timeout=10).json()
        after = state(port)
    finally:
        stop(proc)
    results, samples = run["results"], run["samples"]
    outcomes: dict[str, int] = {}
    for r in results:
        key = r["outcome"] if r["outcome"] != "refused" else f"refused_{r['status']}"
        outcomes[key] = outcomes.get(key, 0) + 1
    span = min(300.0, minutes * 60 / 3)
    end = minutes * 60
    first, last = window(results, 0, span), window(results, end - span, end)
    ratios = {k: (last[k] / first[k] if first[k] and last[k] is not None else None)
              for k in ("ttft_p50", "ttft_p95", "tpot_mean")}
    warm = [s["rss"] for s in samples if span <= s["t"] < span + 60]
    tail = [s["rss"] for s in samples if s["t"] >= end - 60]
    base_rss = percentile(warm, 50)
    growth = percentile(tail, 50) / base_rss - 1
    peak_growth = max(s["rss"] for s in samples if s["t"] >= span) / base_rss - 1
    lost = outcomes.get("lost", 0)
    return {"minutes": minutes, "capacity_rps": round(capacity, 2), "rate_rps": round(rate, 2),
            "requests": len(results), "outcomes": outcomes, "lost": lost,
            "lost_examples": [r.get("error") for r in results if r["outcome"] == "lost"][:3],
            "errors_seen": sorted({r.get("error", "")[:80] for r in results if r["outcome"] == "error_event"})[:5],
            "adapter_swaps": run["swaps"], "window_s": span, "first": first, "last": last,
            "last_over_first": ratios, "rss_after_warmup_mib": round(base_rss / 2**20),
            "rss_end_mib": round(percentile(tail, 50) / 2**20), "rss_growth": round(growth, 4),
            "rss_peak_growth": round(peak_growth, 4),
            "load1_mean": round(mean([s["load1"] for s in samples]), 2), "health_after": health, "after": after,
            "rss_mib_every_30s": [round(s["rss"] / 2**20) for s in samples[::6]],
            "pass": (growth < 0.05 and lost == 0 and health == {"status": "ok"} and after["running_kv_blocks"] == 0
                     and all(v is not None and v <= 1.2 for v in ratios.values()))}


def table(result: dict) -> str:
    lines = [f"reliability — {result['date']} commit {result['commit']} — {result['machine']['class']}"]
    if "burst" in result:
        b = result["burst"]
        lines.append(f"burst: {b['requests']} at once, --max-waiting 64: {b['statuses']} in {b['seconds']} s; "
                     f"5xx {b['server_errors']}, hung {b['hung']}, 429 with Retry-After "
                     f"{b['refused_with_retry_after']}; after: {b['health_after']}, KV blocks "
                     f"{b['after']['running_kv_blocks']:.0f} — {'PASS' if b['pass'] else 'FAIL'}")
    if "kill" in result:
        k = result["kill"]
        lines.append(f"kill -9: {k['outcomes']}, wrong answers {k['wrong_answers']}, restart {k['restart_to_healthy_s']}"
                     f" s, models after {k['models_after_restart']}, same answers {k['same_answers_after_restart']}"
                     f" — {'PASS' if k['pass'] else 'FAIL'}")
    if "soak" in result:
        s = result["soak"]
        fmt = lambda w: (f"TTFT p50 {w['ttft_p50']:.3f} p95 {w['ttft_p95']:.3f} s, TPOT {w['tpot_mean'] * 1e3:.1f} ms"
                         if w["requests"] else "no requests")
        lines += [f"soak: {s['minutes']} min at {s['rate_rps']} req/s (80% of {s['capacity_rps']}), "
                  f"{s['requests']} requests {s['outcomes']}, lost {s['lost']}, swaps {len(s['adapter_swaps'])}",
                  f"  first {s['window_s']:.0f} s: {fmt(s['first'])}", f"  last  {s['window_s']:.0f} s: {fmt(s['last'])}",
                  f"  last/first {s['last_over_first']}; RSS {s['rss_after_warmup_mib']} → {s['rss_end_mib']} MiB "
                  f"({s['rss_growth']:+.1%}, peak {s['rss_peak_growth']:+.1%}); mean load1 {s['load1_mean']}"
                  f" — {'PASS' if s['pass'] else 'FAIL'}"]
    return "\n".join(lines) + "\n"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--parts", nargs="+", default=["burst", "kill", "soak"], choices=["burst", "kill", "soak"])
    p.add_argument("--burst", type=int, default=2000)
    p.add_argument("--soak-minutes", type=float, default=30)
    p.add_argument("--calibrate-seconds", type=float, default=60)
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "reliability.json"))
    args = p.parse_args()
    model_dir, adapters, template = model("smollm2")
    runtime = fresh_adapters("smollm2", template, int(args.soak_minutes) + 1, prefix="soak")
    lora_dir = next(iter(runtime.values())).parent
    result: dict = {"date": time.strftime("%Y-%m-%d %H:%M"), "commit": git_commit(), "machine": machine()}
    if "burst" in args.parts:
        result["burst"] = burst(model_dir, adapters, lora_dir, args.burst, timeout=600)
        print(table(result), flush=True)
    if "kill" in args.parts:
        result["kill"] = kill(model_dir, adapters, lora_dir, runtime, clients=8, kill_after=25.0)
        print(table(result), flush=True)
    if "soak" in args.parts:
        result["soak"] = soak(model_dir, adapters, lora_dir, runtime, args.soak_minutes, args.calibrate_seconds)
    write_results(result, Path(args.out), table)


if __name__ == "__main__":
    main()
