"""Which fp32 matmul form runs fastest on this CPU, by batch rows (why `model/transformer.linear` is what it is).

For SmolLM2-135M's projection shapes (30 layers of q|k|v, o, gate|up, down,
each weight its own tensor so they stream from DRAM as in the model, and the
tied lm_head), times three forms of y = x W^T side by side, alternating, best
of the repeats:

- `x @ w_in_out`: weights stored [in, out] (loraserve's former layout)
- `F.linear`: weights stored [out, in], the nn.Linear call
- `linear`: weights stored [out, in], loraserve's `linear` (w @ x.T up to 64 rows, one row
  computed as two; F.linear above)

    python benchmarks/linear_forms.py          # writes benchmarks/results/linear_forms.txt
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from loraserve.model.linear import linear  # noqa: E402

LAYERS = 30
PROJECTIONS = {"qkv": (960, 576), "o": (576, 576), "gate_up": (3072, 576), "down": (576, 1536)}  # [out, in]
LM_HEAD = (49152, 576)
ROWS = [1, 2, 4, 8, 16, 32, 64, 128, 512, 2048]
FORMS = {
    "x @ w_in_out": lambda x, w_oi, w_io: x @ w_io,
    "F.linear": lambda x, w_oi, w_io: F.linear(x, w_oi),
    "linear": lambda x, w_oi, w_io: linear(x, w_oi),
}


def time_forms(weights: list[tuple[torch.Tensor, torch.Tensor]], rows: int, repeats: int = 5) -> dict[str, float]:
    """Best ms of each form over `weights`, the forms alternating inside each repeat."""
    xs = {k: torch.randn(rows, k) for k in {w.shape[1] for w, _ in weights}}
    best = dict.fromkeys(FORMS, float("inf"))
    for _ in range(repeats + 1):  # the first round warms up
        for name, form in FORMS.items():
            t = time.perf_counter()
            for w_oi, w_io in weights:
                form(xs[w_oi.shape[1]], w_oi, w_io)
            best[name] = min(best[name], (time.perf_counter() - t) * 1e3)
    return best


def main() -> None:
    torch.manual_seed(0)
    layer_w = [(w, w.t().contiguous()) for shape in PROJECTIONS.values()
               for w in (torch.randn(shape) for _ in range(LAYERS))]
    head = torch.randn(LM_HEAD)
    head_w = [(head, head.t().contiguous())]
    lines = [f"# fp32 on {torch.get_num_threads()} threads; ms per decode step's matmuls, best of 5",
             f"# layers = {LAYERS} x (qkv, o, gate_up, down) of SmolLM2-135M; lm_head = {LM_HEAD}",
             "| rows | part | " + " | ".join(FORMS) + " | x @ w_in_out / linear |",
             "|---|---|" + "---|" * (len(FORMS) + 1)]
    for rows in ROWS:
        for part, weights in (("layers", layer_w), ("lm_head", head_w)):
            ms = time_forms(weights, rows)
            cells = " | ".join(f"{v:.2f}" for v in ms.values())
            lines.append(f"| {rows} | {part} | {cells} | {ms['x @ w_in_out'] / ms['linear']:.2f}x |")
            print(lines[-1], flush=True)
    out = ROOT / "benchmarks" / "results" / "linear_forms.txt"
    out.write_text("\n".join(lines) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
