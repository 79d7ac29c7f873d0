"""Per-layer round trip to the LoRA server: NIXL push against ZeroMQ push, side by side.

One `loraserve lora-server` process (tiny llama, rank-16 adapter, one
compute thread); in this process, two `RemoteLoraBackend`s on it, one per
transport. A round trip is what the engine's forward pass waits for per
adapted projection: `submit` (send the rows' activations over ZeroMQ) then
`wait` (the delta back: ZeroMQ push = a multipart reply received into a
registered buffer; NIXL push = a one-sided write into the registered arena
plus a notification) and the in-place add. The projection is gate|up
(64 in, 256 out, fp32): a result is 1 KiB per row, its request a quarter of
that. Sizes by rows; the transports alternate in blocks of 20 round trips, so
both see the same machine; median, p10 and p90 over every round trip.

    python benchmarks/remote_nixl.py            # writes benchmarks/results/remote_nixl.txt
"""

from __future__ import annotations

import argparse
import os
import queue
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from loraserve.model.spec import ModelSpec  # noqa: E402
from loraserve.model.targets import Target, in_dim, out_dim  # noqa: E402
from loraserve.remote.backend import RemoteLoraBackend  # noqa: E402
from loraserve.remote.client import LoraServerClient, adapter_meta  # noqa: E402
from remote_roundtrip import machine  # noqa: E402  (a sibling script)
from loraserve.remote.config import RemoteLoraConfig  # noqa: E402

ROWS = [16, 256, 1024, 4096]
TARGET = Target.GATE_UP


def tiny_llama() -> Path:
    cache = Path(os.environ.get("LORASERVE_TEST_CACHE", ROOT / ".cache" / "test-models"))
    from loraserve.demo import build_tiny
    return build_tiny(cache / "tiny-llama", "llama")


def start_server(root: Path) -> tuple[subprocess.Popen, str]:
    args = [sys.executable, "-m", "loraserve.cli", "lora-server", "--model", str(root / "model"),
            "--listen", "tcp://127.0.0.1:0", "--batch-window-us", "0", "--lora", f"r16={root / 'adapters' / 'r16'}"]
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=ROOT)
    lines: queue.Queue[str] = queue.Queue()
    threading.Thread(target=lambda: [lines.put(line) for line in proc.stdout], daemon=True).start()
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        try:
            line = lines.get(timeout=1)
        except queue.Empty:
            continue
        if "listening on " in line:
            return proc, line.split("listening on ")[1].strip()
    proc.kill()
    raise SystemExit("the LoRA server did not start")


def backend(spec: ModelSpec, endpoint: str, transport: str) -> RemoteLoraBackend:
    client = LoraServerClient(RemoteLoraConfig(endpoint, transport=transport))
    adapters = {e["id"]: adapter_meta(e) for e in client.connect()}
    return RemoteLoraBackend(spec, client, adapters)


def round_trips(b: RemoteLoraBackend, rows: int, n: int) -> list[float]:
    adapter = next(iter(b.adapters))
    x = torch.randn(rows, in_dim(b.spec, TARGET))
    out = torch.zeros(rows, out_dim(b.spec, TARGET))
    times = []
    for _ in range(n):
        b.begin([adapter], [rows], [])
        start = time.perf_counter()
        b.wait(b.submit(0, TARGET, x), out)
        times.append(time.perf_counter() - start)
    return times


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--rows", type=int, nargs="+", default=ROWS)
    p.add_argument("--blocks", type=int, default=10, help="blocks of 20 round trips per transport and size")
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "remote_nixl.txt"))
    args = p.parse_args()
    torch.set_num_threads(1)
    root = tiny_llama()
    spec = ModelSpec.from_dir(root / "model")
    proc, endpoint = start_server(root)
    backends = {}
    try:
        backends = {t: backend(spec, endpoint, t) for t in ("zmq", "nixl")}
        for b in backends.values():
            round_trips(b, ROWS[0], 20)  # warm up: slots filled, connections made
        times: dict[tuple[str, int], list[float]] = {(t, r): [] for t in backends for r in args.rows}
        for _ in range(args.blocks):
            for rows in args.rows:
                for t, b in backends.items():
                    times[(t, rows)] += round_trips(b, rows, 20)
        assert backends["nixl"].nixl.written >= args.blocks * 20 * len(args.rows)  # every one came by NIXL
    finally:
        for b in backends.values():
            b.close()
            b.client.close()
        proc.kill()
        proc.wait(timeout=30)
    isa = machine()["class"]
    lines = [f"# per-layer round trip (submit + wait + add), {TARGET.value} of tiny llama (64 -> 256, fp32, r16),",
             f"# one lora-server process on 127.0.0.1; {os.cpu_count()} cores, {isa}; "
             f"{args.blocks * 20} round trips per cell, transports alternating in blocks of 20",
             "# nixl-cu12 1.5.1, UCX 1.23 defaults on one host: RMA emulated over TCP loopback, CMA for rendezvous; "
             "no progress thread, notifications polled",
             "| rows | request | result | zmq push median (p10-p90) us | nixl push median (p10-p90) us | nixl / zmq |",
             "|---|---|---|---|---|---|"]
    for rows in args.rows:
        cells = []
        for t in ("zmq", "nixl"):
            ts = sorted(times[(t, rows)])
            cells.append((statistics.median(ts) * 1e6, ts[len(ts) // 10] * 1e6, ts[len(ts) * 9 // 10] * 1e6))
        lines.append(f"| {rows} | {kib(rows * in_dim(spec, TARGET) * 4)} | {kib(rows * out_dim(spec, TARGET) * 4)} | "
                     + " | ".join(f"{m:.0f} ({lo:.0f}-{hi:.0f})" for m, lo, hi in cells)
                     + f" | {cells[1][0] / cells[0][0]:.2f}x |")
    text = "\n".join(lines) + "\n"
    print(text, end="")
    Path(args.out).write_text(text)


def kib(n: int) -> str:
    return f"{n / 1024:g} KiB" if n < 1 << 20 else f"{n / (1 << 20):g} MiB"


if __name__ == "__main__":
    main()
