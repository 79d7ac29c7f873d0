"""Decode steps with the layer glue compiled against torch's ops, alternating in one process.

Between a layer's matmuls sit the residual adds, the RMSNorms, RoPE and
SiLU(gate) * up: as torch ops, 2-7 small ops each, and on a 2-core CPU each
small op pays for waking the other core's worker. `model/cpu_kernels.py`
compiles each into one pass over the rows, on the calling thread for a
decode's few rows (`model/ops.py` dispatches). Here the engine steps the
throughput workload's decodes (SmolLM2-135M fp32, 128-token prompts; 32
requests over 8 rank-16 adapters, the same without adapters, and one request
alone), switching between "compiled" and "torch ops" every few steps. Decode
attention is the same in both (the compiled kernel with its K/V write in
fp32; in bf16 it gathers).

    python benchmarks/cpu_glue.py                     # appends to benchmarks/results/cpu_glue-<machine class>.txt
    python benchmarks/cpu_glue.py --dtype bfloat16    # the glue kernels take bf16 too (attention then gathers)
"""

from __future__ import annotations

import argparse
import contextlib
import sys
from pathlib import Path
from unittest import mock

sys.path.insert(0, str(Path(__file__).resolve().parent))

import decode_ab  # noqa: E402
from loraserve.model import cpu_kernels  # noqa: E402

STEPS_PER_SWITCH, SWITCHES = 3, 12


def torch_ops():
    """The glue as torch's ops, as before the kernels."""
    return mock.patch.object(cpu_kernels, "fused_available", lambda x: False)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    args = ap.parse_args()
    assert cpu_kernels.kernels() is not None, "the kernels could not be built here"
    decode_ab.run("cpu_glue", {"torch ops": torch_ops, "compiled": contextlib.nullcontext},
                  [(32, True), (32, False), (1, False)], STEPS_PER_SWITCH, SWITCHES, append=True, dtype=args.dtype)


if __name__ == "__main__":
    main()
