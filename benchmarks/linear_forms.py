"""Which matmul form runs fastest on this CPU, by dtype and batch rows (why `model/linear.py` is what it is).

For SmolLM2-135M's projection shapes (30 layers of q|k|v, o, gate|up, down,
each weight its own tensor so they stream from DRAM as in the model, and the
tied lm_head), times the forms of y = x W^T side by side, alternating, best
of the repeats:

- fp32: `F.linear` (the nn.Linear call), `w @ x.T` (MKL streaming the weight as
  its left operand; one row computed as two), the form `linear` takes up to 64
  rows on CPUs without AVX-512, `packed` (the weight reordered once for
  oneDNN) and `panels` (our kernel over column panels, fetching the next
  panels as it goes: what `Linear` takes on AVX-512 CPUs);
- bf16: `F.linear`, `packed` and `panels` (the same kernel over pairs of k,
  where the CPU has bf16 dot products: what `Linear` takes there).

    python benchmarks/linear_forms.py     # writes benchmarks/results/linear_forms-<machine class>.txt

The result file is named by machine class (avx2 / avx512, and -native-bf16 where
the CPU has it): the winner differs between them.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from loraserve.dtypes import cpu_class, cpu_line, native_bf16_cpu  # noqa: E402
from loraserve.model.linear import Linear, can_take, transposed_form  # noqa: E402

LAYERS = 30
PROJECTIONS = {"qkv": (960, 576), "o": (576, 576), "gate_up": (3072, 576), "down": (576, 1536)}  # [out, in]
LM_HEAD = (49152, 576)
ROWS = [1, 2, 4, 8, 16, 32, 128, 512, 4096]
FORMS = {
    torch.float32: {"F.linear": lambda x, w, lin: F.linear(x, w), "w @ x.T": lambda x, w, lin: transposed_form(x, w),
                    "packed": lambda x, w, lin: lin["packed"](x), "panels": lambda x, w, lin: lin["panels"](x)},
    torch.bfloat16: {"F.linear": lambda x, w, lin: F.linear(x, w), "packed": lambda x, w, lin: lin["packed"](x),
                     "panels": lambda x, w, lin: lin["panels"](x)},
}
RATIO = {torch.float32: ("packed", "panels"), torch.bfloat16: ("packed", "panels")}
"""Each dtype's last column: the first form's time over the second's."""

Weights = list[tuple[torch.Tensor, dict[str, Linear]]]


def time_forms(weights: Weights, rows: int, dtype: torch.dtype, repeats: int = 5) -> dict[str, float]:
    """Best ms of each form over `weights`, the forms alternating inside each repeat."""
    xs = {k: torch.randn(rows, k, dtype=dtype) for k in {w.shape[1] for w, _ in weights}}
    best = dict.fromkeys(FORMS[dtype], float("inf"))
    for _ in range(repeats + 1):  # the first round warms up
        for name, form in FORMS[dtype].items():
            if (rows > 512 and name == "w @ x.T") or (name in ("packed", "panels") and name not in weights[0][1]):
                continue  # no contender at that size, and the slowest; or a form this machine cannot run
            t = time.perf_counter()
            for w, lin in weights:
                form(xs[w.shape[1]], w, lin)
            best[name] = min(best[name], (time.perf_counter() - t) * 1e3)
    return best


def with_forms(w: torch.Tensor) -> tuple[torch.Tensor, dict[str, Linear]]:
    """The plain weight beside a `Linear` of each of its dtype's forms this machine can run."""
    return w, {form: Linear(w.clone(), form=form) for form in ("packed", "panels")
               if form in FORMS[w.dtype] and can_take(form, w)}


def main() -> None:
    torch.manual_seed(0)
    lines = [f"# {cpu_line()}; "
             "ms per decode step's matmuls, best of 5",
             f"# layers = {LAYERS} x (qkv, o, gate_up, down) of SmolLM2-135M; lm_head = {LM_HEAD}"]
    for dtype, forms in FORMS.items():
        names, (num, den) = list(forms), RATIO[dtype]
        layer_w = [with_forms(torch.randn(shape, dtype=dtype)) for shape in PROJECTIONS.values() for _ in range(LAYERS)]
        head_w = [with_forms(torch.randn(LM_HEAD, dtype=dtype))]
        lines += ["", f"{str(dtype).split('.')[1]}:", "| rows | part | " + " | ".join(names) + f" | {num} / {den} |",
                  "|---|---|" + "---|" * (len(names) + 1)]
        for rows in ROWS:
            for part, weights in (("layers", layer_w), ("lm_head", head_w)):
                ms = time_forms(weights, rows, dtype)
                cells = " | ".join(f"{v:.2f}" if v < float("inf") else "-" for v in ms.values())
                ratio = f"{ms[num] / ms[den]:.2f}x" if max(ms[num], ms[den]) < float("inf") else "-"
                lines.append(f"| {rows} | {part} | {cells} | {ratio} |")
                print(lines[-1], flush=True)
    suffix = "-native-bf16" if native_bf16_cpu() else ""
    out = ROOT / "benchmarks" / "results" / f"linear_forms-{cpu_class()}{suffix}.txt"
    out.write_text("\n".join(lines) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
