"""Decode steps with LoRA through the compiled kernel against torch's matmuls, alternating in one process.

`model/cpu_lora.py` does a projection's LoRA in one C++ call for steps of up
to `COMPILED_MAX_ROWS` rows per adapter; torch's path (padded or segmented
batched matmuls, one expand per output slice of a fused projection) is what
`lora/batch.py` takes otherwise. Here the engine steps the throughput
workload's decodes (SmolLM2-135M fp32, 128-token prompts; 32 requests over 8
rank-16 adapters, and one request with an adapter), switching between the two
every few steps; the same batches without adapters give the base step the
LoRA is paid on top of (the two conditions are the same there).

    python benchmarks/cpu_lora.py     # appends to benchmarks/results/cpu_lora-<machine class>.txt
"""

from __future__ import annotations

import contextlib
import sys
from pathlib import Path
from unittest import mock

sys.path.insert(0, str(Path(__file__).resolve().parent))

import decode_ab  # noqa: E402
from loraserve.lora import batch as lora_batch  # noqa: E402
from loraserve.model import cpu_kernels  # noqa: E402

STEPS_PER_SWITCH, SWITCHES = 3, 12


def torch_matmuls():
    """LoRA through torch's batched matmuls, as where the kernel is not built."""
    return mock.patch.object(lora_batch, "COMPILED_MAX_ROWS", 0)


def main() -> None:
    assert cpu_kernels.kernels() is not None, "the kernels could not be built here"
    decode_ab.run("cpu_lora", {"torch matmuls": torch_matmuls, "compiled": contextlib.nullcontext},
                  [(32, True), (32, False), (1, True), (1, False)], STEPS_PER_SWITCH, SWITCHES, append=True)


if __name__ == "__main__":
    main()
