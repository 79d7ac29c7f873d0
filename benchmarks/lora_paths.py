"""The three CPU LoRA paths, by how a step's rows fall on its adapters (why `lora/batch.py` picks as it does).

For SmolLM2-135M's LoRA shapes (8 rank-16 adapters on all seven projections,
so A/B of q|k|v, o, gate|up and down in the fused layout of
`targets.out_edges`; 30 layers, each its own tensors so they stream from DRAM
as in the model), times the paths of `LoraBatch` on one step's adapter rows,
alternating, and reports each one's best time and what `LoraBatch` picks:

- padded (`kernels.padded_lora_delta`): segments padded to the longest, batched matmuls;
- segmented (`kernels.lora_delta`): a grouped shrink and in-place expands per segment;
- compiled (`model/cpu_lora.py`): one C++ call per projection, each adapter's weights read once per 4 rows
  (8 of a long segment on AVX-512);
  also from bf16 copies of the weights (`--lora-dtype bfloat16`), which it widens as it reads them.

    python benchmarks/lora_paths.py     # writes benchmarks/results/lora_paths-<machine class>.txt
"""

from __future__ import annotations

import sys
import time
from pathlib import Path
from types import SimpleNamespace

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from loraserve.dtypes import cpu_class, cpu_line  # noqa: E402
from loraserve.kernels import lora_delta, padded_lora_delta  # noqa: E402
from loraserve.lora.batch import LoraBatch, compiled  # noqa: E402
from loraserve.model import cpu_kernels  # noqa: E402

LAYERS, RANK = 30, 16
TARGETS = {"qkv": (576, (0, 576, 768, 960)), "o": (576, (0, 576)), "gate_up": (576, (0, 1536, 3072)),
           "down": (1536, (0, 576))}  # in, output slice edges
STEPS = {  # rows per adapter slot
    "decode, 1 row each": [1] * 8,
    "decode, 4 rows each": [4] * 8,
    "decode, 1-7 rows": [1, 2, 3, 4, 4, 5, 6, 7],
    "decode, 2-8 rows": [2, 8, 4, 8, 8, 6, 8, 8],
    "12-16 rows": [12] + [16] * 7,
    "16 and 32 rows": [16, 32] * 4,
    "64 rows each": [64] * 8,
    "128 rows each": [128] * 8,
    "256 rows each": [256] * 8,
    "40-64 rows": [40] + [64] * 7,
    "prefill beside prefix hits": [16] * 4 + [512] * 4,
    "512 rows each (a 4096-token prefill)": [512] * 8,
    "1024 rows each": [1024] * 8,
}
PATHS = ("padded", "segmented", "compiled", "compiled, bf16 weights")


def time_paths(counts: list[int], repeats: int = 7) -> dict[str, float]:
    """Each path's best time (s) over one step's LoRA of all layers, the paths alternating."""
    slots, rows, pad = len(counts), sum(counts), max(counts)
    offs = torch.tensor(counts).cumsum(0).to(torch.int32)
    ranks = torch.full((slots,), RANK, dtype=torch.int32)
    index = None if all(c == pad for c in counts) else torch.tensor(
        [s * pad + i for s, c in enumerate(counts) for i in range(c)])
    work = []
    for k, edges in TARGETS.values():
        x, out = torch.randn(rows, k), torch.zeros(rows, edges[-1])
        work += [(x, torch.randn(slots, k, (len(edges) - 1) * RANK), torch.randn(slots, RANK, edges[-1]), out, edges)
                 for _ in range(LAYERS)]
    kernels = cpu_kernels.kernels()
    run = {"padded": lambda x, a, b, out, e: padded_lora_delta(x, a, b, pad, index, out=out, edges=e),
           "segmented": lambda x, a, b, out, e: lora_delta(x, a, b, offs, out=out, edges=e),
           "compiled": lambda x, a, b, out, e: kernels.lora_segments(x, a, b, offs, ranks, list(e), out),
           "compiled, bf16 weights": lambda x, a, b, out, e: kernels.lora_segments(x, narrow[id(a)], narrow[id(b)],
                                                                                 offs, ranks, list(e), out)}
    narrow = {id(t): t.bfloat16() for x, a, b, out, edges in work for t in (a, b)}  # --lora-dtype bfloat16
    best = dict.fromkeys(PATHS, float("inf"))
    for _ in range(repeats + 1):
        for path in PATHS:
            t = time.perf_counter()
            for x, a, b, out, edges in work:
                run[path](x, a, b, out, edges)
            best[path] = min(best[path], time.perf_counter() - t)
    return best


def picks(counts: list[int]) -> str:
    bank = SimpleNamespace(num_slots=len(counts), slots=[None] * len(counts), device=torch.device("cpu"),
                           dtype=torch.float32, compute_dtype=torch.float32)
    batch = LoraBatch(bank, counts, 0, torch.zeros(sum(counts), dtype=torch.long))
    return "compiled" if compiled(bank, batch.pad) else "padded" if batch.padded else "segmented"


def main() -> None:
    assert cpu_kernels.kernels() is not None, "the CPU kernels could not be built here"
    lines = [f"# {cpu_line()}, fp32; one step's LoRA over {LAYERS} layers, 8 rank-{RANK} adapters; "
             f"best of 7 alternating",
             "| step | rows per slot | padded ms | segmented ms | compiled ms | compiled, bf16 weights ms "
             "| fastest (fp32) | LoraBatch picks |",
             "|---|---|---|---|---|---|---|---|"]
    for name, counts in STEPS.items():
        best = time_paths(counts)
        times = " | ".join(f"{best[p] * 1e3:.1f}" for p in PATHS)
        fastest = min(PATHS[:3], key=best.get)  # of the paths over the same (fp32) weights
        lines.append(f"| {name} | {counts} | {times} | {fastest} | {picks(counts)} |")
        print(lines[-1], flush=True)
    out = ROOT / "benchmarks" / "results" / f"lora_paths-{cpu_class()}.txt"
    out.write_text("\n".join(lines) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
