"""Decode steps with one OpenMP team in the process against two, alternating in one process.

GNU OpenMP gives every thread that opens a parallel region a team of its own;
with more team threads than CPUs it stops spinning between regions, and each
of a step's hundreds of small parallel ops waits for a sleeping worker to wake
(`loraserve/threads.py`). Until this change the block mover's thread made a
second team the first time it copied (an adapter load is a copy), and a
server's loading thread left one beside the engine thread's. Here a parked
thread that has run one parallel op stands for that second team: the engine
steps the throughput workload's decodes (SmolLM2-135M fp32, 128-token prompts;
32 requests over 8 rank-16 adapters, the same without adapters, and one
request alone), switching between "one team" (the parked thread gone) and
"two teams" every few steps. Reports the median step time of each
(`tests/test_threads.py` checks that the engine's threads hold one team).

    python benchmarks/omp_teams.py     # appends to benchmarks/results/omp_teams-<machine class>.txt
"""

from __future__ import annotations

import contextlib
import sys
import threading
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402

import decode_ab  # noqa: E402

STEPS_PER_SWITCH, SWITCHES = 3, 10


@contextlib.contextmanager
def second_team():
    """A thread that ran one parallel op and waits: its OpenMP team lives as long as it does."""
    release, ready = threading.Event(), threading.Event()

    def park() -> None:
        torch.ones(1 << 22).sum()  # 16 MB: split over the team
        ready.set()
        release.wait()

    thread = threading.Thread(target=park, daemon=True)
    thread.start()
    ready.wait(10)
    try:
        yield
    finally:
        release.set()
        thread.join(10)


def main() -> None:
    decode_ab.run("omp_teams", {"one team": contextlib.nullcontext, "two teams": second_team},
                  [(32, True), (32, False), (1, False)], STEPS_PER_SWITCH, SWITCHES, append=True)


if __name__ == "__main__":
    main()
