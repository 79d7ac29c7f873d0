"""Decode steps with LoRA through the compiled kernel, through torch's matmuls, and skipped, alternating.

`model/cpu_lora.py` does a projection's LoRA in one C++ call for steps of up
to `COMPILED_MAX_ROWS` rows per adapter; torch's path (padded or segmented
batched matmuls, one expand per output slice of a fused projection) is what
`lora/batch.py` takes otherwise. Here the engine steps the throughput
workload's decodes (SmolLM2-135M, fp32 or bf16, 128-token prompts; 32 requests over 8
rank-16 adapters, and one request with an adapter), switching every few steps
between the two paths and a third condition that skips the LoRA products
(`LoraBatch.add` does nothing: wrong tokens, but every other cost of the step
is the same), so "LoRA's share" of a step is measured in the same minutes as
the step, on this machine whose speed moves within minutes.

    python benchmarks/cpu_lora.py [--dtype bfloat16]    # appends to benchmarks/results/cpu_lora-<machine class>.txt
"""

from __future__ import annotations

import argparse
import statistics
import sys
from contextlib import nullcontext
from pathlib import Path
from unittest import mock

sys.path.insert(0, str(Path(__file__).resolve().parent))

import decode_ab  # noqa: E402
from loraserve.dtypes import cpu_line  # noqa: E402
from loraserve.lora import batch as lora_batch  # noqa: E402
from loraserve.model import cpu_kernels  # noqa: E402

STEPS_PER_SWITCH, SWITCHES = 3, 12
MODES = {
    "torch matmuls": lambda: mock.patch.object(lora_batch, "COMPILED_MAX_ROWS", 0),
    "compiled": nullcontext,
    "LoRA skipped": lambda: mock.patch.object(lora_batch.LoraBatch, "add", lambda *args: None),
}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    dtype = ap.parse_args().dtype
    assert cpu_kernels.kernels() is not None, "the kernels could not be built here"
    llm = decode_ab.engine(dtype)
    lines = [f"# {cpu_line()}; SmolLM2-135M {dtype}, decode steps after 128-token prompts, 8 rank-16 adapters "
             f"round robin, {STEPS_PER_SWITCH} steps per switch x {SWITCHES} switches each; median ms",
             "| batch | torch matmuls | compiled | LoRA skipped | compiled / torch | skipped / compiled |",
             "|---|---|---|---|---|---|"]
    for batch in (32, 1):
        times = decode_ab.decode_steps(llm, batch, True, MODES, STEPS_PER_SWITCH, SWITCHES)
        t, c, s = (statistics.median(times[m]) * 1e3 for m in MODES)
        lines.append(f"| {batch} | {t:.1f} | {c:.1f} | {s:.1f} | {c / t:.2f} | {s / c:.0%} |")
        print(lines[-1], flush=True)
    decode_ab.record("cpu_lora", lines)


if __name__ == "__main__":
    main()
