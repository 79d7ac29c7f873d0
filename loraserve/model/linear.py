"""A projection's weight, kept in the layout its device multiplies fastest.

The checkpoint gives [out, in] weights (nn.Linear's order). How fast y = x W^T
runs depends on the device, the dtype and the number of rows, and on CPUs by
a wide margin (benchmarks/results/linear_forms.txt, throughput.json):

- bf16 on CPU: oneDNN's matmul reorders a plain weight into its blocked
  layout on every call; reordered once at load (`mkldnn._reorder_linear_weight`,
  the prepacking inductor's freezing does) a one-row product streams the
  weight 3-4x faster and a 256-row one ~1.5x. The packed copy replaces the
  plain one: no extra memory.
- fp32 on an AVX2 CPU: MKL ran w @ x.T 1.3-4x faster than x @ w.T (F.linear's
  form) at decode-sized batches, and one row faster as two than as a GEMV;
  above ~64 rows F.linear won (benchmarks/results/linear_forms-avx2.txt). On an
  AVX-512 CPU that form is up to 2x slower at one row and no faster at 32
  (linear_forms-avx512.txt): F.linear there.
- elsewhere (GPUs) F.linear: the library picks well.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from loraserve.dtypes import cpu_flags

SMALL_BATCH = 64
"""Most rows for which fp32 on an AVX2 CPU streams the weight as MKL's left operand."""

TRANSPOSED_FORM = "avx512f" not in cpu_flags()
"""Whether `linear` takes `transposed_form` for small fp32 batches (AVX2 CPUs)."""


def _can_pack(w: torch.Tensor) -> bool:
    return (w.device.type == "cpu" and w.dtype == torch.bfloat16 and torch.backends.mkldnn.is_available()
            and hasattr(torch.ops.mkldnn, "_reorder_linear_weight"))


class Linear:
    """y = x @ weight.T (+ bias), by the fastest form for the weight's device and dtype."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None = None, pack: bool = True) -> None:
        """weight: [out, in]. `pack`: allow the blocked bf16 CPU layout (then
        `weight` is no longer a plain tensor: read `plain` for that)."""
        self.out_features, self.in_features = weight.shape
        self.bias = bias
        self.packed = pack and _can_pack(weight)
        # the batch-size hint only tunes the blocking; 32 serves 1 to 4096 rows within noise
        self.weight = torch.ops.mkldnn._reorder_linear_weight(weight, 32) if self.packed else weight

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """x: [T, in]. Returns [T, out]."""
        if self.packed:
            return torch.ops.mkldnn._linear_pointwise(x, self.weight, self.bias, "none", [], "")
        return linear(x, self.weight, self.bias)

    @property
    def dtype(self) -> torch.dtype:
        return self.weight.dtype

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
