"""Decode steps with KV blocks read in place against gathered, alternating in one process.

The throughput workload's decode (SmolLM2-135M, fp32, 32 requests over 8
rank-16 adapters, 128-token prompts): the engine runs batches of decode steps,
switching between the CPU decode kernel (`model/cpu_attention.py`) and the
gather-then-SDPA path every few steps, so both see the same contexts and the
same moments of this shared machine. Reports the median step time of each and
their ratio per batch size.

    python benchmarks/decode_attention.py     # writes benchmarks/results/decode_attention-<machine class>.txt
"""

from __future__ import annotations

import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

import throughput as tp  # noqa: E402
from loraserve import LLM, SamplingParams  # noqa: E402
from loraserve.config import SchedulerConfig  # noqa: E402
from loraserve.dtypes import cpu_class, cpu_line  # noqa: E402
from loraserve.model import cpu_attention  # noqa: E402

STEPS_PER_SWITCH, SWITCHES = 3, 12


def decode_steps(llm: LLM, batch: int, adapters: bool) -> dict[str, list[float]]:
    """Step times of `batch` decoding requests, the two paths alternating."""
    engine = llm.engine
    available = cpu_attention.available
    names = [f"a{i % tp.NUM_ADAPTERS}" if adapters else None for i in range(batch)]
    sp = SamplingParams(max_tokens=STEPS_PER_SWITCH * SWITCHES * 2 + 8, temperature=0.0, ignore_eos=True)
    for i, (p, n) in enumerate(zip(tp.prompts(), names)):
        engine.add_request([batch, i] + p[2:], sp, adapter=n)  # no prefix hits between runs
    while any(r.num_computed_tokens < len(r.prompt_token_ids) for r in engine.scheduler.running) \
            or engine.scheduler.waiting:
        engine.step()
    times: dict[str, list[float]] = {"in place": [], "gather": []}
    try:
        for _ in range(SWITCHES):
            for mode in times:
                cpu_attention.available = available if mode == "in place" else (lambda q, kv: False)
                for _ in range(STEPS_PER_SWITCH):
                    t = time.perf_counter()
                    engine.step()
                    times[mode].append(time.perf_counter() - t)
    finally:
        cpu_attention.available = available
    while engine.has_unfinished():
        engine.step()
    return times


def main() -> None:
    assert cpu_attention.kernel() is not None, "the kernel could not be built here"
    model_dir, adapters = tp.prepare("smollm2")
    llm = LLM(str(model_dir), adapters=adapters, dtype="float32",
              scheduler=SchedulerConfig(max_num_seqs=32, max_num_batched_tokens=4096, max_loras=8))
    llm.generate(tp.prompts()[:8], SamplingParams(max_tokens=2, temperature=0.0),
                 adapter=[f"a{i}" for i in range(8)], use_tqdm=False)
    lines = [f"# {cpu_line()}; SmolLM2-135M fp32, "
             f"decode steps after 128-token prompts, {STEPS_PER_SWITCH} steps per switch x {SWITCHES} switches each",
             "| batch | adapters | in place ms (median) | gather ms (median) | gather / in place |",
             "|---|---|---|---|---|"]
    for batch, with_adapters in ((32, True), (32, False), (8, True), (1, False)):
        times = decode_steps(llm, batch, with_adapters)
        a, b = statistics.median(times["in place"]), statistics.median(times["gather"])
        lines.append(f"| {batch} | {'8 rank-16' if with_adapters else 'none'} | {a * 1e3:.1f} | {b * 1e3:.1f} "
                     f"| {b / a:.2f} |")
        print(lines[-1], flush=True)
    out = ROOT / "benchmarks" / "results" / f"decode_attention-{cpu_class()}.txt"
    out.write_text("\n".join(lines) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
