"""A projection's weight, kept in the layout its device multiplies fastest.

The checkpoint gives [out, in] weights (nn.Linear's order). How fast y = x W^T
runs depends on the device, the dtype and the number of rows, and on CPUs by
a wide margin (benchmarks/results/linear_forms-*.txt, by machine class). The
forms (`Linear.form`):

- "panels", fp32 on an AVX-512 CPU where the CPU kernels build: the weight as
  panels of 16 output columns, multiplied by our kernel, which fetches the
  next panels while it multiplies these (`cpu_linear.py`). Over SmolLM2's
  layers it ran 1.3-1.5x oneDNN's packed product at 1-32 rows (a batch of
  decodes), 1.15x at 128, level at 512 and 3% slower at 4096 (a long
  prefill; linear_forms-avx512.txt). At one row MKL's GEMV (F.linear) is 5%
  faster, but a second copy of every weight would cost more than that.
- "packed", bf16 on CPU (and fp32 on AVX-512 without the kernels): oneDNN's
  matmul reorders a plain weight into its blocked layout on every call;
  reordered once at load (`mkldnn._reorder_linear_weight`, the prepacking
  inductor's freezing does) the product runs 1.2-1.75x faster up to 128 rows
  and no slower above (linear_forms-avx512-native-bf16.txt); fp32 packed was
  1.2-1.6x faster than F.linear at 4-32 rows there, equal above, 15% slower
  at one row.
- "plain" elsewhere: fp32 on an AVX2 CPU, where MKL ran w @ x.T 1.3-4x faster
  than x @ w.T (F.linear's form) at decode-sized batches, and one row faster
  as two than as a GEMV; above ~64 rows F.linear won
  (benchmarks/results/linear_forms-avx2.txt, an older run without the packed
  or panel forms; on AVX-512 that form is up to 2x slower). On GPUs F.linear:
  the library picks well.

Each form replaces the plain weight: no extra copy.
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


def _can_pack(w: torch.Tensor) -> bool:
    return (w.device.type == "cpu" and (w.dtype == torch.float32 or (w.dtype == torch.bfloat16 and PACK_BF16))
            and torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_reorder_linear_weight"))


def _can_panel(w: torch.Tensor) -> bool:
    return w.device.type == "cpu" and w.dtype == torch.float32 and cpu_kernels.kernels() is not None


FORMS = ("panels", "packed", "plain")


def fastest_form(w: torch.Tensor) -> str:
    """The form this machine multiplies `w` fastest in (see the module docstring)."""
    if w.dtype == torch.float32 and not TRANSPOSED_FORM and _can_panel(w):
        return "panels"
    if _can_pack(w) and (w.dtype == torch.bfloat16 or not TRANSPOSED_FORM):
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
        if form not in FORMS or (form == "panels" and not _can_panel(weight)) or (form == "packed"
                                                                                   and not _can_pack(weight)):
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
