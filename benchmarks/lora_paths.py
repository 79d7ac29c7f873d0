"""Padded or segmented LoRA on CPU, by how a step's rows fall on its adapters (why `lora/batch.py` picks as it does).

For SmolLM2-135M's LoRA shapes (8 rank-16 adapters on all seven projections,
so A/B of q|k|v, o, gate|up and down; 30 layers, each its own tensors so they
stream from DRAM as in the model), times both paths of `LoraBatch` on one
step's adapter rows, alternating, and reports the median over the repeats of
segmented time / padded time (above 1: padded wins) and what `LoraBatch` picks:

- padded (`kernels.padded_lora_delta`): segments padded to the longest, two batched matmuls;
- segmented (`kernels.lora_delta`): a grouped shrink and one in-place expand per segment.

    python benchmarks/lora_paths.py     # writes benchmarks/results/lora_paths-<machine class>.txt
"""

from __future__ import annotations

import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from loraserve.dtypes import cpu_class, cpu_line  # noqa: E402
from loraserve.kernels import lora_delta, padded_lora_delta  # noqa: E402
from loraserve.lora.batch import LoraBatch  # noqa: E402

LAYERS, RANK = 30, 16
TARGETS = {"qkv": (576, 3, 960), "o": (576, 1, 576), "gate_up": (576, 2, 3072), "down": (1536, 1, 576)}  # in, width, out
STEPS = {  # rows per adapter slot
    "decode, 4 rows each": [4] * 8,
    "decode, 1-7 rows": [1, 2, 3, 4, 4, 5, 6, 7],
    "decode, 2-8 rows": [2, 8, 4, 8, 8, 6, 8, 8],
    "12-16 rows": [12] + [16] * 7,
    "16 and 32 rows": [16, 32] * 4,
    "64 rows each": [64] * 8,
    "128 rows each": [128] * 8,
    "40-64 rows": [40] + [64] * 7,
    "prefill beside prefix hits": [16] * 4 + [512] * 4,
}


def time_paths(counts: list[int], repeats: int = 7) -> tuple[float, float, float]:
    """(median segmented / padded, best padded s, best segmented s) over one step's LoRA of all layers."""
    slots, rows, pad = len(counts), sum(counts), max(counts)
    offs = torch.tensor(counts).cumsum(0).to(torch.int32)
    index = None if all(c == pad for c in counts) else torch.tensor(
        [s * pad + i for s, c in enumerate(counts) for i in range(c)])
    work = []
    for k, width, n in TARGETS.values():
        x, out = torch.randn(rows, k), torch.zeros(rows, n)
        work += [(x, torch.randn(slots, k, width * RANK), torch.randn(slots, width * RANK, n), out)
                 for _ in range(LAYERS)]

    def padded():
        for x, a, b, out in work:
            padded_lora_delta(x, a, b, pad, index, out=out)

    def segmented():
        for x, a, b, out in work:
            lora_delta(x, a, b, offs, out=out)

    padded(), segmented()
    ratios, best_p, best_s = [], float("inf"), float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        padded()
        tp = time.perf_counter() - t
        t = time.perf_counter()
        segmented()
        ts = time.perf_counter() - t
        ratios.append(ts / tp)
        best_p, best_s = min(best_p, tp), min(best_s, ts)
    return statistics.median(ratios), best_p, best_s


def picks_padded(counts: list[int]) -> bool:
    bank = type("Bank", (), {"num_slots": len(counts), "slots": [None] * len(counts)})()
    return LoraBatch(bank, counts, 0, torch.zeros(sum(counts), dtype=torch.long)).padded


def main() -> None:
    lines = [f"# {cpu_line()}, fp32; "
             f"one step's LoRA over {LAYERS} layers; ratio = segmented / padded time (median of 7 alternating)",
             "| step | rows per slot | padded ms | segmented ms | ratio | faster | LoraBatch picks |",
             "|---|---|---|---|---|---|---|"]
    for name, counts in STEPS.items():
        ratio, tp, ts = time_paths(counts)
        picks = "padded" if picks_padded(counts) else "segmented"
        lines.append(f"| {name} | {counts} | {tp * 1e3:.1f} | {ts * 1e3:.1f} | {ratio:.2f} | "
                     f"{'padded' if ratio > 1 else 'segmented'} | {picks} |")
        print(lines[-1], flush=True)
    out = ROOT / "benchmarks" / "results" / f"lora_paths-{cpu_class()}.txt"
    out.write_text("\n".join(lines) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
