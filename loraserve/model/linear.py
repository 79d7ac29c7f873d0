"""A projection's weight, kept in the layout its device multiplies fastest.

The checkpoint gives [out, in] weights (nn.Linear's order). How fast y = x W^T
runs depends on the device, the dtype and the number of rows, and on CPUs by
a wide margin (benchmarks/results/linear_forms-*.txt, by machine class). The
forms (`Linear.form`):

- "panels", fp32 on an AVX-512 CPU where the CPU kernels build, and bf16 on
  a CPU with bf16 dot products (`avx512_bf16`; an even number of input
  features): the weight as panels of 16 output columns, multiplied by our
  kernel, which fetches the next panels while it multiplies these
  (`cpu_linear.py`). Over SmolLM2's layers it ran fp32 1.3-1.5x oneDNN's
  packed product at 1-32 rows (a batch of decodes), 1.15x at 128, level at
  512 and 3% slower at 4096 (a long prefill; linear_forms-avx512.txt, an
  Intel Xeon), and bf16 1.25-1.96x at 1-32 rows, 1.07x at 128, 4-9% slower
  from 512 (linear_forms-avx512-native-bf16.txt, an AMD Zen 4). At one row
  MKL's fp32 GEMV (F.linear) is 5% faster on the layers and 15% on the
  lm_head, but a second copy of every weight would cost more than that.
- "packed", bf16 on CPUs without bf16 dot products that can reorder it
  (AVX-512), and fp32 on AVX-512 without the kernels: oneDNN's matmul
  reorders a plain weight into its blocked layout on every call; reordered
  once at load (`mkldnn._reorder_linear_weight`, the prepacking inductor's
  freezing does) the bf16 product ran 1.2-1.7x faster up to 32 rows,
  1.04-1.09x above (linear_forms-avx512-native-bf16-xeon.txt); fp32 packed
  was 1.1-2.5x faster than F.linear at 4-128 rows there (the lm_head most),
  level on the layers at 32, 12% slower on them at one row.
- "plain" elsewhere: fp32 on an AVX2 CPU, where MKL ran w @ x.T 1.3-4x faster
  than x @ w.T (F.linear's form) at decode-sized batches, and one row faster
  as two than as a GEMV; above ~64 rows F.linear won
  (benchmarks/results/linear_forms-avx2.txt, an older run without the packed
  or panel forms; on AVX-512 that form is up to 2x slower). On GPUs F.linear:
  the library picks well.

Each form replaces the plain weight: no extra copy (but for a tied lm_head,
whose embedding lookup keeps reading the plain one).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from loraserve.dtypes import cpu_flags
from loraserve.model import cpu_kernels
from loraserve.model.cpu_linear import to_panels

SMALL_BATCH = 64
"""Most rows for which fp32 on an AVX2 CPU streams the weight as MKL's left operand."""

TRANSPOSED_FORM = "avx512f" not in cpu_flags()
"""Whether `linear` takes `transposed_form` for small fp32 batches (AVX2 CPUs)."""


PACK_BF16 = {"avx512bw", "avx512vl", "avx512dq"} <= cpu_flags() or "avx_ne_convert" in cpu_flags()
"""Whether oneDNN can reorder a bf16 weight on this CPU (it refuses on AVX2-only ones)."""


FORMS = ("panels", "packed", "plain")


def can_take(form: str, w: torch.Tensor) -> bool:
    """Whether this machine can multiply `w` in `form` (fast or not)."""
    if form == "panels":
        if w.device.type != "cpu" or cpu_kernels.kernels() is None:
            return False
        return w.dtype == torch.float32 or (w.dtype == torch.bfloat16 and cpu_kernels.kernels().bf16_panels()
                                            and w.shape[1] % 2 == 0)
    if form == "packed":
        return (w.device.type == "cpu" and (w.dtype == torch.float32 or (w.dtype == torch.bfloat16 and PACK_BF16))
                and torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_reorder_linear_weight"))
    return form == "plain"


def fastest_form(w: torch.Tensor) -> str:
    """The form this machine multiplies `w` fastest in (see the module docstring)."""
    if (w.dtype == torch.bfloat16 or not TRANSPOSED_FORM) and can_take("panels", w):
        return "panels"
    if can_take("packed", w) and (w.dtype == torch.bfloat16 or not TRANSPOSED_FORM):
        return "packed"
    return "plain"


class Linear:
    """y = x @ weight.T (+ bias), by the fastest form for the weight's device and dtype."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None = None, form: str | None = None) -> None:
        """weight: [out, in]. `form`: one of FORMS (where this machine can run it: to
        measure one against another), or None for `fastest_form`."""
        self.out_features, self.in_features = weight.shape
        self.bias = bias
        if form is None:
            form = fastest_form(weight)
        if not can_take(form, weight):
            raise ValueError(f"a {weight.dtype} weight on {weight.device} cannot take the {form!r} form here")
        self.form = form
        if form == "panels":
            self.weight = to_panels(weight)
        elif form == "packed":
            # the batch-size hint only tunes the blocking; 32 serves 1 to 4096 rows within noise
            self.weight = torch.ops.mkldnn._reorder_linear_weight(weight, 32)
        else:
            self.weight = weight

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """x: [T, in]. Returns [T, out]."""
        if self.form == "panels":
            return cpu_kernels.kernels().panel_linear(x, self.weight, self.bias, self.out_features)
        if self.form == "packed":
            return torch.ops.mkldnn._linear_pointwise(x, self.weight, self.bias, "none", [], "")
        return linear(x, self.weight, self.bias)

    @property
    def num_bytes(self) -> int:
        n = self.out_features * self.in_features + (0 if self.bias is None else self.bias.numel())
        return n * self.weight.element_size()


def linear(x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x: [T, in]; w: [out, in] plain. Returns [T, out] (see the module docstring for the forms)."""
    if (TRANSPOSED_FORM and x.device.type == "cpu" and x.dtype == torch.float32
            and x.shape[0] <= SMALL_BATCH):
        y = transposed_form(x, w)
        return y if bias is None else y.add_(bias)
    return F.linear(x, w, bias)


def transposed_form(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """x @ w.T computed as (w @ x.T).T, one row as two."""
    rows = x.shape[0]
    xt = (torch.cat([x, x]) if rows == 1 else x).t()
    return torch.mm(w, xt)[:, :rows].t().contiguous()
