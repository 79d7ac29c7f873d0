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

import statistics
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

import torch  # noqa: E402

import throughput as tp  # noqa: E402
from loraserve import LLM, SamplingParams  # noqa: E402
from loraserve.config import SchedulerConfig  # noqa: E402
from loraserve.dtypes import cpu_class, cpu_line  # noqa: E402

STEPS_PER_SWITCH, SWITCHES = 3, 10


class SecondTeam:
    """A thread that ran one parallel op and waits: its OpenMP team lives as long as it does."""

    def __init__(self) -> None:
        self.release = threading.Event()
        ready = threading.Event()

        def park() -> None:
            torch.ones(1 << 22).sum()  # 16 MB: split over the team
            ready.set()
            self.release.wait()

        self.thread = threading.Thread(target=park, daemon=True)
        self.thread.start()
        ready.wait(10)

    def close(self) -> None:
        self.release.set()
        self.thread.join(10)


def decode_steps(llm: LLM, batch: int, adapters: bool) -> dict[str, list[float]]:
    engine = llm.engine
    names = [f"a{i % tp.NUM_ADAPTERS}" if adapters else None for i in range(batch)]
    sp = SamplingParams(max_tokens=STEPS_PER_SWITCH * SWITCHES * 2 + 8, temperature=0.0, ignore_eos=True)
    for i, (p, n) in enumerate(zip(tp.prompts(), names)):
        engine.add_request([batch, i, int(adapters)] + p[3:], sp, adapter=n)  # no prefix hits between runs
    while any(r.num_computed_tokens < len(r.prompt_token_ids) for r in engine.scheduler.running) \
            or engine.scheduler.waiting:
        engine.step()
    times: dict[str, list[float]] = {"one team": [], "two teams": []}
    for _ in range(SWITCHES):
        for mode in times:
            second = SecondTeam() if mode == "two teams" else None
            try:
                for _ in range(STEPS_PER_SWITCH):
                    t = time.perf_counter()
                    engine.step()
                    times[mode].append(time.perf_counter() - t)
            finally:
                if second is not None:
                    second.close()
    while engine.has_unfinished():
        engine.step()
    return times


def main() -> None:
    model_dir, adapters = tp.prepare("smollm2")
    llm = LLM(str(model_dir), adapters=adapters, dtype="float32",
              scheduler=SchedulerConfig(max_num_seqs=32, max_num_batched_tokens=4096, max_loras=8))
    llm.generate(tp.prompts()[:8], SamplingParams(max_tokens=2, temperature=0.0),
                 adapter=[f"a{i}" for i in range(8)], use_tqdm=False)  # adapters copied in by the mover
    lines = [f"# {cpu_line()}; SmolLM2-135M fp32, decode steps after 128-token prompts, "
             f"{STEPS_PER_SWITCH} steps per switch x {SWITCHES} switches each",
             "| batch | adapters | one team ms (median) | two teams ms (median) | two / one |",
             "|---|---|---|---|---|"]
    for batch, with_adapters in ((32, True), (32, False), (1, False)):
        times = decode_steps(llm, batch, with_adapters)
        one, two = statistics.median(times["one team"]), statistics.median(times["two teams"])
        lines.append(f"| {batch} | {'8 rank-16' if with_adapters else 'none'} | {one * 1e3:.1f} | {two * 1e3:.1f} "
                     f"| {two / one:.2f} |")
        print(lines[-1], flush=True)
    out = ROOT / "benchmarks" / "results" / f"omp_teams-{cpu_class()}.txt"
    with out.open("a") as f:  # every run is kept: the machine's noise shows between them
        f.write(f"\n## {time.strftime('%Y-%m-%d %H:%M')}\n" + "\n".join(lines) + "\n")
    print("\n".join(lines[:1]))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
