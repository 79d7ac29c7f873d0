"""The per-layer round trip to the LoRA server, push against pull, against the raw transport.

One delta round trip is what an instance pays per adapted projection and layer
when its LoRA lives on a `loraserve lora-server`: send the projection's input
rows, get the delta back (pull adds a `pull` message). This script measures it
with the instance's real client (`RemoteLoraBackend.submit` then `wait`, as the
model calls them) against a `loraserve lora-server` subprocess, and, for the
same bytes each way, the round trip of a bare pyzmq DEALER/ROUTER echo in its
own process (this file run with `--echo-server`): what ZeroMQ over loopback TCP
costs with no framing, no checks and no LoRA.

The model is a synthetic one-layer Llama with hidden size 1024 (fp32), so one
row of activations is 4 KiB and 1 ... 1024 rows span 4 KiB ... 4 MiB; the
projection is `o` (in = out = 1024), so the reply carries as many bytes as the
request. Two adapters, each on its own server (a server's slots share one
rank, the largest loaded, so a rank-1 adapter beside a rank-16 one would
compute at rank 16): rank 1 (the LoRA compute is negligible: the round trip is
framing + batching + transport) and rank 16. The server's own compute time
per delta comes from its Prometheus histograms (`compute_seconds`: from the
batch's concatenation to its result; `queue_seconds`), scraped around every
block of round trips. Systems alternate in blocks inside every repeat, so all
columns of a row are from the same minutes. The servers run with one torch
thread (`--server-threads`): on two cores shared with the client, two OpenMP
threads per server stalled round trips by milliseconds. A last sweep starts
one fresh server per (`--batch-window-us`, torch threads) and times one
instance's round trips against each.

    python benchmarks/remote_roundtrip.py                 # about 2-3 minutes
    python benchmarks/remote_roundtrip.py --repeats 20 --block 25

Results: benchmarks/results/remote_roundtrip.json and .txt.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

HIDDEN = 1024
ROWS = (1, 4, 16, 64, 256, 1024)
RANKS = (1, 16)
SWEEP = ((0, 1), (200, 1), (999, 1), (1000, 1), (2000, 1), (200, 2))
"""(--batch-window-us, server torch threads) of the one-instance sweep."""
CACHE = ROOT / ".cache" / "bench" / "roundtrip-h1024"
PY = sys.executable


# -- the machine ---------------------------------------------------------------

def machine() -> dict:
    """CPU model, flags that decide the fast dtype, load: recorded with every result."""
    info: dict = {"platform": platform.platform(), "python": platform.python_version(), "cpus": os.cpu_count()}
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        text = ""
    first = text.split("\n\n")[0]
    fields = dict(line.split(":", 1) for line in first.splitlines() if ":" in line)
    fields = {k.strip(): v.strip() for k, v in fields.items()}
    flags = set(fields.get("flags", "").split())
    info.update({"model_name": fields.get("model name"), "vendor": fields.get("vendor_id"),
                 "family": fields.get("cpu family"), "model": fields.get("model"),
                 "avx2": "avx2" in flags, "avx512f": "avx512f" in flags, "avx512_bf16": "avx512_bf16" in flags,
                 "amx_bf16": "amx_bf16" in flags})
    info["class"] = ("AVX-512 with native bf16 (avx512_bf16)" if info["avx512_bf16"] else
                     "AVX-512 without native bf16" if info["avx512f"] else
                     "AVX2 only (no AVX-512, bf16 emulated)" if info["avx2"] else "no AVX2")
    try:
        import torch
        info["torch"], info["torch_threads"] = torch.__version__, torch.get_num_threads()
    except ImportError:
        pass
    info["loadavg"] = os.getloadavg()
    return info


def write_results(result: dict, out: Path, table) -> None:
    """Stamp the end load, write `out` (JSON) and its `.txt` table beside it, print the table."""
    result["loadavg_end"] = os.getloadavg()
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1) + "\n")
    text = table(result)
    out.with_suffix(".txt").write_text(text)
    print(text)


def git_commit() -> str | None:
    try:
        return subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], capture_output=True,
                              text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# -- the raw echo (its own process) ---------------------------------------------

def echo_server() -> None:
    """A bare ROUTER: each request [header: reply bytes as text, payload] is answered
    with a preallocated payload of that many bytes. No JSON, no checks, no copies."""
    import zmq

    ctx = zmq.Context()
    sock = ctx.socket(zmq.ROUTER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.bind("tcp://127.0.0.1:*")
    print(f"echo listening on {sock.getsockopt_string(zmq.LAST_ENDPOINT)}", flush=True)
    replies: dict[int, bytes] = {}
    while True:
        peer, head, *_ = sock.recv_multipart(copy=False)
        n = int(bytes(head.buffer))
        if n < 0:
            break
        if n not in replies:
            replies[n] = b"\0" * n
        sock.send_multipart([peer, replies[n]], copy=False)


class RawClient:
    """The DEALER end of the echo, with the instance's socket options."""

    def __init__(self, endpoint: str) -> None:
        import zmq

        self.zmq = zmq
        self.sock = zmq.Context.instance().socket(zmq.DEALER)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.setsockopt(zmq.IMMEDIATE, 1)
        self.sock.connect(endpoint)

    def roundtrip(self, payload, reply_bytes: bytes) -> None:
        self.sock.send_multipart([reply_bytes, payload], copy=False)
        frames = self.sock.recv_multipart(copy=False)
        assert len(frames[0]) == int(reply_bytes)

    def close(self) -> None:
        self.sock.send_multipart([b"-1", b""])
        self.sock.close(100)


# -- the LoRA server (its own process) -------------------------------------------

def build_model() -> tuple[Path, dict[str, Path]]:
    """A one-layer Llama, hidden 1024 (only its config.json matters to the server
    and the client), with rank-1 and rank-16 adapters on o_proj."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from loraserve.demo import make_adapter

    model_dir = CACHE / "model"
    if not (model_dir / "config.json").is_file():
        cfg = AutoConfig.for_model("llama", vocab_size=256, hidden_size=HIDDEN, intermediate_size=HIDDEN,
                                   num_hidden_layers=1, num_attention_heads=8, num_key_value_heads=8,
                                   max_position_embeddings=512, architectures=["LlamaForCausalLM"])
        torch.manual_seed(0)
        tmp = CACHE / "model.partial"
        AutoModelForCausalLM.from_config(cfg, dtype=torch.float32).save_pretrained(tmp)
        tmp.rename(model_dir)
    adapters = {f"r{r}": make_adapter(model_dir, CACHE / "adapters" / f"r{r}", r, 2 * r, ["o_proj"], False, seed=r)
                for r in RANKS}
    return model_dir, adapters


def start(cmd: list[str], marker: str, env: dict | None = None, timeout: float = 120) -> tuple[subprocess.Popen, str]:
    """Start a process and wait for the line containing `marker`; returns it and the line's last word."""
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, "PYTHONPATH": str(ROOT), **(env or {})})
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if not line and proc.poll() is not None:
            raise RuntimeError(f"{' '.join(cmd[:4])} exited with {proc.returncode}")
        if marker in line:
            return proc, line.strip().rsplit(" ", 1)[-1]
    proc.kill()
    raise RuntimeError(f"{' '.join(cmd[:4])} did not start in {timeout:.0f} s")


def lora_server(model_dir: Path, adapters: dict[str, Path], window_us: int, metrics_port: int,
                threads: int) -> tuple:
    cmd = [PY, "-m", "loraserve.cli", "lora-server", "--model", str(model_dir), "--listen", "tcp://127.0.0.1:0",
           "--metrics-port", str(metrics_port), "--batch-window-us", str(window_us),
           *(x for n, p in adapters.items() for x in ("--lora", f"{n}={p}"))]
    return start(cmd, "listening on", env={"OMP_NUM_THREADS": str(threads)})


def stop(proc: subprocess.Popen | None) -> None:
    if proc is not None and proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


class Scraper:
    """The server's compute and queue histograms (sum, count), for per-block differences."""

    def __init__(self, port: int) -> None:
        import httpx

        from loraserve.bench.scrape import parse_prometheus

        self.url, self.get, self.parse = f"http://127.0.0.1:{port}/metrics", httpx.get, parse_prometheus

    def read(self) -> tuple[float, float, float]:
        m = self.parse(self.get(self.url, timeout=10).text)
        p = "loraserve_lora_server_"
        return m[p + "compute_seconds_sum"], m[p + "compute_seconds_count"], m[p + "queue_seconds_sum"]


class Lora:
    """The instance's side, as the model drives it: one RemoteLoraBackend per mode."""

    def __init__(self, endpoint: str, model_dir: Path) -> None:
        from loraserve.model.spec import ModelSpec
        from loraserve.remote.backend import RemoteLoraBackend
        from loraserve.remote.client import LoraServerClient, adapter_meta
        from loraserve.remote.config import RemoteLoraConfig

        spec = ModelSpec.from_dir(model_dir)
        self.clients, self.backends = [], {}
        for mode in ("push", "pull"):
            client = LoraServerClient(RemoteLoraConfig(endpoint, mode=mode, overlap=True))
            catalogue = client.connect()  # no heartbeat thread: nothing else runs during the timing
            self.ids = {e["name"]: e["id"] for e in catalogue}
            metas = {e["id"]: adapter_meta(e) for e in catalogue}
            self.clients.append(client)
            self.backends[mode] = RemoteLoraBackend(spec, client, metas)

    def prepare(self, mode: str, adapter: str, rows: int) -> None:
        self.backends[mode].begin([self.ids[adapter]], [rows], [])

    def roundtrip(self, mode: str, x, out) -> None:
        from loraserve.model.targets import Target

        b = self.backends[mode]
        b.wait(b.submit(0, Target.O, x), out)

    def close(self) -> None:
        for b in self.backends.values():
            b.close()
        for c in self.clients:
            c.close()


# -- measuring -------------------------------------------------------------------

def percentile(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    k = (len(xs) - 1) * q
    lo = int(k)
    return xs[lo] + (xs[min(lo + 1, len(xs) - 1)] - xs[lo]) * (k - lo)


def summary(us: list[float]) -> dict:
    return {"n": len(us), "median_us": statistics.median(us), "p90_us": percentile(us, 0.9),
            "mean_us": statistics.fmean(us), "min_us": min(us)}


def sizes_run(loras: dict[str, Lora], raw: RawClient, scrapers: dict[str, Scraper], repeats: int,
              block: int) -> list[dict]:
    """Every size: raw, then push and pull for each adapter, alternating in blocks."""
    import torch

    rows_out = []
    for rows in ROWS:
        x = torch.randn(rows, HIDDEN)
        out = torch.zeros(rows, HIDDEN)
        payload = memoryview(torch.cat([x.flatten(), torch.zeros(rows)]).numpy())  # x + the int32 row ids
        reply_bytes = str(rows * HIDDEN * 4).encode()
        systems = ["raw"] + [f"{mode}-r{r}" for r in RANKS for mode in ("push", "pull")]
        times: dict[str, list[float]] = {s: [] for s in systems}
        server: dict[str, list[float]] = {s: [0.0, 0.0, 0.0] for s in systems[1:]}
        for s in systems:  # warm-up: slots filled, buffers allocated
            for _ in range(3):
                _one(s, loras, raw, x, out, payload, reply_bytes, rows)
        for _ in range(repeats):
            for s in systems:
                before = scrapers[s.split("-")[1]].read() if s != "raw" else None
                if s != "raw":
                    mode, adapter = s.split("-")
                    loras[adapter].prepare(mode, adapter, rows)
                for _ in range(block):
                    t = time.perf_counter()
                    _one(s, loras, raw, x, out, payload, reply_bytes, rows, prepared=True)
                    times[s].append((time.perf_counter() - t) * 1e6)
                if before is not None:
                    after = scrapers[s.split("-")[1]].read()
                    for i in range(3):
                        server[s][i] += after[i] - before[i]
        row = {"rows": rows, "request_bytes": rows * HIDDEN * 4 + rows * 4, "reply_bytes": rows * HIDDEN * 4,
               "systems": {}}
        raw_median = statistics.median(times["raw"])
        for s in systems:
            d = summary(times[s])
            if s != "raw":
                compute_s, count, queue_s = server[s]
                d["server_compute_us_mean"] = compute_s / count * 1e6 if count else None
                d["server_queue_us_mean"] = queue_s / count * 1e6 if count else None
                d["over_raw_median"] = d["median_us"] / raw_median
                d["minus_compute_over_raw"] = (d["median_us"] - (d["server_compute_us_mean"] or 0)) / raw_median
            row["systems"][s] = d
        rows_out.append(row)
        print(_row_line(row), flush=True)
    return rows_out


def _one(s, loras, raw, x, out, payload, reply_bytes, rows, prepared=False) -> None:
    if s == "raw":
        raw.roundtrip(payload, reply_bytes)
        return
    mode, adapter = s.split("-")
    if not prepared:
        loras[adapter].prepare(mode, adapter, rows)
    loras[adapter].roundtrip(mode, x, out)


def _row_line(row: dict) -> str:
    s = row["systems"]
    kib = row["reply_bytes"] / 1024
    parts = [f"{kib:6.0f} KiB: raw {s['raw']['median_us']:7.0f}/{s['raw']['p90_us']:7.0f}"]
    for name, d in s.items():
        if name != "raw":
            parts.append(f"{name} {d['median_us']:7.0f}/{d['p90_us']:7.0f} (x{d['over_raw_median']:.2f}, "
                         f"compute {d['server_compute_us_mean']:.0f})")
    return " | ".join(parts)


def sweep_run(model_dir: Path, adapters: dict, raw: RawClient, repeats: int, block: int, rows: int) -> list[dict]:
    """One instance, push, rank 1, `rows` rows, a fresh server per (batching window, torch threads)."""
    import torch

    x, out = torch.randn(rows, HIDDEN), torch.zeros(rows, HIDDEN)
    payload = memoryview(torch.cat([x.flatten(), torch.zeros(rows)]).numpy())
    reply_bytes = str(rows * HIDDEN * 4).encode()
    results = []
    for window, threads in SWEEP:
        proc, lora = None, None
        try:
            proc, endpoint = lora_server(model_dir, adapters, window, free_port(), threads)
            lora = Lora(endpoint, model_dir)
            lora.prepare("push", "r1", rows)
            for _ in range(5):
                lora.roundtrip("push", x, out)
            rt, raw_t = [], []
            for _ in range(repeats):
                for _ in range(block):
                    t = time.perf_counter()
                    lora.roundtrip("push", x, out)
                    rt.append((time.perf_counter() - t) * 1e6)
                for _ in range(block):
                    t = time.perf_counter()
                    raw.roundtrip(payload, reply_bytes)
                    raw_t.append((time.perf_counter() - t) * 1e6)
            d = {"window_us": window, "server_threads": threads, "rows": rows, "push_r1": summary(rt),
                 "raw": summary(raw_t)}
            d["over_raw_median"] = d["push_r1"]["median_us"] / d["raw"]["median_us"]
            results.append(d)
            print(f"window {window:5d} us, {threads} thread(s): push-r1 {d['push_r1']['median_us']:.0f}/"
                  f"{d['push_r1']['p90_us']:.0f} us, raw {d['raw']['median_us']:.0f} us, x{d['over_raw_median']:.2f}",
                  flush=True)
        finally:
            if lora is not None:
                lora.close()
            stop(proc)
    return results


def table(result: dict) -> str:
    m = result["machine"]
    lines = [f"remote_roundtrip: {result['date']}, commit {result['commit']}, {result['runtime_s']:.0f} s",
             f"machine: {m['model_name']} (family {m['family']} model {m['model']}), {m['cpus']} cpus, "
             f"{m['class']}; load average at start {m['loadavg'][0]:.2f}, at end {result['loadavg_end'][0]:.2f}",
             f"server batch window {result['window_us']} us (the default), {result['server_threads']} torch "
             f"thread(s) per server, {m.get('torch_threads')} in the client; {result['repeats']} blocks of "
             f"{result['block']} round trips per system and size, systems alternating",
             "", "Round trip, median / p90 in microseconds (x: median over the raw echo's median; "
             "'-compute': the median less the server's mean kernel time, over raw)", ""]
    head = ["activations", "raw echo", "push r1", "pull r1", "push r16", "pull r16", "push r1 x", "pull r1 x",
            "push r16 x", "push r16 -compute x", "pull r16 x", "kernel r16 us"]
    lines.append("| " + " | ".join(head) + " |")
    lines.append("|" + "---|" * len(head))
    for row in result["sizes"]:
        s = row["systems"]
        kib = row["reply_bytes"] / 1024
        size = f"{kib:.0f} KiB" if kib < 1024 else f"{kib / 1024:.0f} MiB"
        cells = [f"{size} ({row['rows']} rows)"]
        cells += [f"{s[k]['median_us']:.0f} / {s[k]['p90_us']:.0f}" for k in ("raw", "push-r1", "pull-r1", "push-r16",
                                                                                "pull-r16")]
        cells += [f"{s['push-r1']['over_raw_median']:.2f}", f"{s['pull-r1']['over_raw_median']:.2f}",
                  f"{s['push-r16']['over_raw_median']:.2f}", f"{s['push-r16']['minus_compute_over_raw']:.2f}",
                  f"{s['pull-r16']['over_raw_median']:.2f}", f"{s['push-r16']['server_compute_us_mean']:.0f}"]
        lines.append("| " + " | ".join(cells) + " |")
    if result.get("sweep"):
        lines += ["", f"One instance, push rank 1, {result['sweep'][0]['rows']} rows, a fresh server per row "
                      "(median / p90 us)", "",
                  "| --batch-window-us | server torch threads | push r1 | raw echo | x |", "|---|---|---|---|---|"]
        for w in result["sweep"]:
            lines.append(f"| {w['window_us']} | {w['server_threads']} | {w['push_r1']['median_us']:.0f} / "
                         f"{w['push_r1']['p90_us']:.0f} | {w['raw']['median_us']:.0f} / {w['raw']['p90_us']:.0f} "
                         f"| {w['over_raw_median']:.2f} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--echo-server", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--repeats", type=int, default=10, help="blocks per system and size")
    ap.add_argument("--block", type=int, default=20, help="round trips per block")
    ap.add_argument("--window-us", type=int, default=200, help="the server's --batch-window-us for the size sweep")
    ap.add_argument("--server-threads", type=int, default=1,
                    help="torch threads of the LoRA servers of the size sweep (OMP_NUM_THREADS)")
    ap.add_argument("--no-sweep", action="store_true", help="skip the batching-window and threads sweep")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "remote_roundtrip.json"))
    args = ap.parse_args()
    if args.echo_server:
        echo_server()
        return
    t0 = time.monotonic()
    result = {"date": time.strftime("%Y-%m-%d %H:%M"), "commit": git_commit(), "machine": machine(),
              "hidden": HIDDEN, "window_us": args.window_us, "server_threads": args.server_threads,
              "repeats": args.repeats, "block": args.block}
    print(json.dumps(result["machine"]), flush=True)
    model_dir, adapters = build_model()
    echo = raw = None
    servers: list[subprocess.Popen] = []
    loras: dict[str, Lora] = {}
    try:
        echo, echo_endpoint = start([PY, __file__, "--echo-server"], "echo listening on")
        raw = RawClient(echo_endpoint)
        scrapers = {}
        for name, path in adapters.items():  # one server per adapter (see the top)
            port = free_port()
            proc, endpoint = lora_server(model_dir, {name: path}, args.window_us, port, args.server_threads)
            servers.append(proc)
            loras[name], scrapers[name] = Lora(endpoint, model_dir), Scraper(port)
        result["sizes"] = sizes_run(loras, raw, scrapers, args.repeats, args.block)
        for lora in loras.values():
            lora.close()
        loras = {}
        for proc in servers:
            stop(proc)
        if not args.no_sweep:
            result["sweep"] = sweep_run(model_dir, {"r1": adapters["r1"]}, raw, args.repeats // 2 or 1, args.block,
                                        16)
    finally:
        for lora in loras.values():
            lora.close()
        for proc in servers:
            stop(proc)
        if raw is not None:
            try:
                raw.close()
            except Exception:
                pass
        stop(echo)
    result["runtime_s"] = time.monotonic() - t0
    write_results(result, Path(args.out), table)


if __name__ == "__main__":
    main()
