"""Decode steps under two conditions, alternating in one process: the harness of
`decode_attention.py` and `omp_teams.py`.

The throughput workload's decode (SmolLM2-135M fp32, 128-token prompts, 8
rank-16 adapters): for each case (a batch size, with adapters or not) the
engine prefills the batch, then steps its decodes, switching between the two
conditions every few steps, so both see the same contexts and the same
moments of this shared machine. Reports the median step of each and their
ratio, as a table written to (or appended to) the caller's results file.
"""

from __future__ import annotations

import statistics
import sys
import time
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Callable

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

import throughput as tp  # noqa: E402
from loraserve import LLM, SamplingParams  # noqa: E402
from loraserve.config import SchedulerConfig  # noqa: E402
from loraserve.dtypes import cpu_class, cpu_line  # noqa: E402

Modes = dict[str, Callable[[], AbstractContextManager]]
"""Two conditions by name, each entered around its steps (the first is the baseline of the ratio's denominator)."""


def engine(dtype: str = "float32") -> LLM:
    """SmolLM2 with the throughput benchmark's adapters, each loaded once (by the mover)."""
    model_dir, adapters = tp.prepare("smollm2")
    llm = LLM(str(model_dir), adapters=adapters, dtype=dtype,
              scheduler=SchedulerConfig(max_num_seqs=32, max_num_batched_tokens=4096, max_loras=8))
    llm.generate(tp.prompts()[:8], SamplingParams(max_tokens=2, temperature=0.0),
                 adapter=[f"a{i}" for i in range(8)], use_tqdm=False)
    return llm


def decode_steps(llm: LLM, batch: int, adapters: bool, modes: Modes, steps: int,
                 switches: int) -> dict[str, list[float]]:
    """Step times of `batch` decoding requests, the conditions alternating every `steps` steps."""
    engine = llm.engine
    names = [f"a{i % tp.NUM_ADAPTERS}" if adapters else None for i in range(batch)]
    sp = SamplingParams(max_tokens=steps * switches * 2 + 8, temperature=0.0, ignore_eos=True)
    for i, (p, n) in enumerate(zip(tp.prompts(), names)):
        engine.add_request([batch, i] + p[2:], sp, adapter=n)  # no prefix hits between runs
    while any(r.num_computed_tokens < len(r.prompt_token_ids) for r in engine.scheduler.running) \
            or engine.scheduler.waiting:
        engine.step()
    times: dict[str, list[float]] = {mode: [] for mode in modes}
    for _ in range(switches):
        for mode, condition in modes.items():
            with condition():
                for _ in range(steps):
                    t = time.perf_counter()
                    engine.step()
                    times[mode].append(time.perf_counter() - t)
    while engine.has_unfinished():
        engine.step()
    return times


def run(name: str, modes: Modes, cases: list[tuple[int, bool]], steps: int, switches: int,
        append: bool = False, dtype: str = "float32") -> list[str]:
    """Every case's medians as a table, printed and written to results/<name>-<machine class>.txt
    (`append`: after the runs already there, under the time of this one)."""
    llm = engine(dtype)
    first, second = modes
    lines = [f"# {cpu_line()}; SmolLM2-135M {dtype}, decode steps after 128-token prompts, "
             f"{steps} steps per switch x {switches} switches each",
             f"| batch | adapters | {first} ms (median) | {second} ms (median) | {second} / {first} |",
             "|---|---|---|---|---|"]
    for batch, with_adapters in cases:
        times = decode_steps(llm, batch, with_adapters, modes, steps, switches)
        a, b = statistics.median(times[first]), statistics.median(times[second])
        lines.append(f"| {batch} | {'8 rank-16' if with_adapters else 'none'} | {a * 1e3:.1f} | {b * 1e3:.1f} "
                     f"| {b / a:.2f} |")
        print(lines[-1], flush=True)
    record(name, lines, append)
    return lines


def record(name: str, lines: list[str], append: bool = True) -> None:
    """Write a table to results/<name>-<machine class>.txt, or append it under the time of this run."""
    out = ROOT / "benchmarks" / "results" / f"{name}-{cpu_class()}.txt"
    if append:
        with out.open("a") as f:
            f.write(f"\n## {time.strftime('%Y-%m-%d %H:%M')}\n" + "\n".join(lines) + "\n")
    else:
        out.write_text("\n".join(lines) + "\n")
    print(f"wrote {out}")
