"""One thread computes with an OpenMP team; side threads compute alone (loraserve/threads.py).

A second team in the process makes GNU OpenMP stop spinning between parallel
regions, which slowed every small op of the engine thread 1.1-1.5x
(`benchmarks/omp_teams.py`). These tests count threads: a thread that opens a
parallel region with a team brings OS threads (its workers) that stay until it
exits. They count in a fresh interpreter, where no other test's threads come
and go.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import threading
from pathlib import Path

import pytest

from loraserve.threads import apart

ROOT = Path(__file__).resolve().parent.parent

PRELUDE = """
import json, os, threading
from dataclasses import replace
import torch
from loraserve.threads import compute_alone

def os_threads():
    return len(os.listdir(f"/proc/{os.getpid()}/task"))

torch.set_num_threads(2)  # two, whatever the machine: one core would make no team at all
torch.ones(1 << 22).sum()  # the main thread's teams exist before anything is counted
a = torch.randn(512, 512)
a @ a
"""


def counted(script: str) -> dict:
    """Run PRELUDE + script in a fresh interpreter; it prints one JSON object."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("OMP_", "GOMP_", "MKL_"))}
    out = subprocess.run([sys.executable, "-c", PRELUDE + textwrap.dedent(script)], capture_output=True, text=True,
                         timeout=120, cwd=ROOT, env=env)
    assert out.returncode == 0, out.stderr[-2000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_a_thread_that_computes_alone_makes_no_team():
    got = counted("""
        def parked(alone):
            seen, ready, release = [], threading.Event(), threading.Event()
            def run():
                if alone:
                    compute_alone()
                torch.ones(1 << 22).sum()  # a parallel op of torch's
                a = torch.randn(512, 512)
                a @ a  # and one of MKL's
                seen.append(torch.get_num_threads())
                ready.set()
                release.wait(30)
            t = threading.Thread(target=run, daemon=True)
            t.start()
            ready.wait(30)
            counts = (seen[0], os_threads())
            release.set()
            t.join(30)
            return counts

        start = os_threads()
        alone, plain = parked(True), parked(False)
        print(json.dumps({"start": start, "alone": alone, "plain": plain, "main": torch.get_num_threads()}))
    """)
    start = got["start"]
    assert got["alone"] == [1, start + 1]  # the thread itself, no worker; its own setting, not the process's
    assert got["main"] == 2
    assert got["plain"] == [2, start + 2]  # the control: without compute_alone a worker comes along


def test_the_mover_copies_without_a_team_of_its_own():
    got = counted("""
        from loraserve.cache.mover import CopyJob
        from loraserve.engine.tier_memory import TierMemory
        from loraserve.engine.torch_mover import TorchMover
        from loraserve.sim.models import model_spec

        spec = replace(model_spec("llama3-8b"), num_layers=4, num_kv_heads=4, head_dim=64)  # 128 KiB blocks
        memory = TierMemory(spec, 64, 16, torch.float32, torch.device("cpu"), num_host_blocks=64)
        memory.tiers["host"].normal_()
        mover = TorchMover(memory, read_adapter=lambda a: None)
        start = os_threads()  # with the mover's thread
        blocks = tuple(range(32))  # 4 MiB: a parallel copy
        mover.submit(CopyJob(1, "host", "device", blocks, blocks, 32 * memory.block_bytes))
        mover.wait(1)
        done = mover.poll()
        same = torch.equal(memory.tiers["device"][:, :, :32], memory.tiers["host"][:, :, :32])
        print(json.dumps({"start": start, "after": os_threads(), "done": done, "same": same}))
        mover.close()
    """)
    assert got["done"] == [1] and got["same"]
    assert got["after"] == got["start"]  # (without compute_alone in the mover: one more, its worker)


def test_apart_returns_what_the_function_returns_and_raises_what_it_raises():
    def bad() -> None:
        raise ValueError("bad")

    assert apart(lambda x, y=1: x + y, 2, y=3) == 5
    with pytest.raises(ValueError, match="bad"):
        apart(bad)
    assert apart(threading.current_thread) is not threading.current_thread()
