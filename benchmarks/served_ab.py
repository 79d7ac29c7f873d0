"""Two servers side by side: TPOT of one streaming request at a time, alternating.

Starts `loraserve serve` from two source trees (say, the commit before a
change and this checkout) on SmolLM2 fp32 with two of the throughput
benchmark's adapters, then sends the same 64-token greedy requests to each in
turn, with an adapter and without, never two at once. Reports each server's
median time per output token. Both servers wait idle while the other runs, so
they share the machine's moments and not its cores.

    git worktree add /tmp/before <commit>
    python benchmarks/served_ab.py --before /tmp/before   # appends to results/served_ab-<machine class>.txt
"""

from __future__ import annotations

import argparse
import os
import signal
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

import throughput as tp  # noqa: E402
from loraserve.dtypes import cpu_class, cpu_line  # noqa: E402

START_TIMEOUT_S = 300
SERVE = "import sys; from loraserve.cli import main; sys.exit(main(sys.argv[1:]))"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def describe(tree: str) -> str:
    """The tree's commit (and whether it has changes), for the record."""
    try:
        rev = subprocess.run(["git", "-C", tree, "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                             check=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", tree, "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, check=True).stdout.strip()
        return rev + (" with changes" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return tree


def tpot(client, model: str, prompt: str, tokens: int) -> float:
    times = []
    stream = client.completions.create(model=model, prompt=prompt, max_tokens=tokens, temperature=0, stream=True,
                                       extra_body={"ignore_eos": True})
    for _ in stream:
        times.append(time.perf_counter())
    return (times[-1] - times[0]) / (len(times) - 1)


def main() -> None:
    from openai import OpenAI

    p = argparse.ArgumentParser()
    p.add_argument("--before", required=True, help="source tree of the first server")
    p.add_argument("--after", default=str(ROOT), help="source tree of the second (default: this checkout)")
    p.add_argument("--rounds", type=int, default=6)
    p.add_argument("--tokens", type=int, default=64)
    args = p.parse_args()
    model_dir, adapters = tp.prepare("smollm2")
    trees = {"before": args.before, "after": args.after}
    procs, clients = {}, {}
    try:
        for name, tree in trees.items():
            port = free_port()
            cmd = [sys.executable, "-c", SERVE, "serve", "--model", str(model_dir), "--dtype", "float32",
                   "--lora", f"a0={adapters['a0']}", "--lora", f"a1={adapters['a1']}", "--port", str(port)]
            procs[name] = subprocess.Popen(cmd, cwd=tree, env=dict(os.environ, PYTHONPATH=tree),
                                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            clients[name] = OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="-", timeout=120, max_retries=0)
        for name, client in clients.items():
            deadline = time.monotonic() + START_TIMEOUT_S
            while True:
                try:
                    client.models.list()
                    break
                except Exception:
                    if procs[name].poll() is not None or time.monotonic() > deadline:
                        raise SystemExit(f"the {name} server did not start")
                    time.sleep(0.5)
        got = {name: {"a0": [], "model": []} for name in trees}
        for r in range(args.rounds):
            for name, client in clients.items():
                for model in got[name]:
                    got[name][model].append(tpot(client, model, f"Round {r}: tell me a story about", args.tokens))
    finally:
        for proc in procs.values():
            proc.send_signal(signal.SIGTERM)
        for proc in procs.values():
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
    lines = [f"# {cpu_line()}; SmolLM2-135M fp32, {args.tokens}-token greedy streams, one at a time, "
             f"{args.rounds} rounds alternating; before = {describe(args.before)}, after = {describe(args.after)}",
             "| request | before TPOT ms (median) | after TPOT ms (median) | before / after |", "|---|---|---|---|"]
    for model, label in (("a0", "adapter a0"), ("model", "base model")):
        b, a = (statistics.median(got[n][model]) * 1e3 for n in ("before", "after"))
        lines.append(f"| {label} | {b:.1f} | {a:.1f} | {b / a:.2f} |")
    print("\n".join(lines))
    out = ROOT / "benchmarks" / "results" / f"served_ab-{cpu_class()}.txt"
    with out.open("a") as f:
        f.write(f"\n## {time.strftime('%Y-%m-%d %H:%M')}\n" + "\n".join(lines) + "\n")
    print(f"appended to {out}")


if __name__ == "__main__":
    main()
