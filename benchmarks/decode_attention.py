"""Decode steps with KV blocks read in place against gathered, alternating in one process.

The throughput workload's decode (SmolLM2-135M, fp32, 32 requests over 8
rank-16 adapters, 128-token prompts): the engine runs batches of decode steps,
switching between the CPU decode kernel (`model/cpu_kernels.py`, with its
K/V write) and the gather-then-SDPA path (with `index_copy_`) every few steps, so both see the same contexts and the
same moments of this shared machine. Reports the median step time of each and
their ratio per batch size.

    python benchmarks/decode_attention.py     # writes benchmarks/results/decode_attention-<machine class>.txt
"""

from __future__ import annotations

import contextlib
import sys
from pathlib import Path
from unittest import mock

sys.path.insert(0, str(Path(__file__).resolve().parent))

import decode_ab  # noqa: E402
from loraserve.model import cpu_kernels  # noqa: E402

STEPS_PER_SWITCH, SWITCHES = 3, 12


def gathering():
    """Decode attention gathers KV blocks, as before the kernel."""
    return mock.patch.object(cpu_kernels, "attention_available", lambda q, kv: False)


def main() -> None:
    assert cpu_kernels.kernels() is not None, "the kernel could not be built here"
    decode_ab.run("decode_attention", {"in place": contextlib.nullcontext, "gather": gathering},
                  [(32, True), (32, False), (8, True), (1, False)], STEPS_PER_SWITCH, SWITCHES)


if __name__ == "__main__":
    main()
