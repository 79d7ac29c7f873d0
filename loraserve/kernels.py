"""Segmented matmuls: the batched kernels under the base model (MoE experts) and LoRA.

Tokens of one step arrive sorted by LoRA slot, so each adapter's tokens form a
contiguous segment; every projection then needs two segmented matmuls (shrink
to the rank, expand back, the expand once per output slice of a fused
projection), whatever the number of adapters in the batch. These are torch's
matmuls; on a CPU, steps of few rows per adapter take the compiled kernel
instead (`model/cpu_lora.py`, chosen by `lora/batch.py`).
"""

from __future__ import annotations

from typing import Sequence

import torch

from loraserve.gpu import active as triton_active

_HAS_GROUPED_MM = hasattr(torch, "_grouped_mm")


def segmented_mm(x: torch.Tensor, w: torch.Tensor, offs: torch.Tensor) -> torch.Tensor:
    """Multiply each row segment of `x` by its own matrix.

    x: [T, K]; w: [G, K, N]; offs: [G] int32, cumulative segment ends (the last
    one equals T; empty segments are allowed). Returns [T, N].

    Semantics:
        out = empty(T, N); start = 0
        for g in range(G):
            out[start:offs[g]] = x[start:offs[g]] @ w[g]; start = offs[g]
    """
    if triton_active(x.device):
        from loraserve.gpu.experts import experts_mm
        return experts_mm(x, w, offs)
    live = _segments(offs)
    # CPU grouped_mm multiplies every group, empty ones too: only worth it when most have rows
    if (_HAS_GROUPED_MM and x.device.type == "cpu" and x.dtype == torch.float32 and 2 * len(live) > len(offs)
            and _aligned(x) and _aligned(w)):
        return torch._grouped_mm(x, w, offs=offs)
    out = x.new_empty(x.shape[0], w.shape[-1])
    for g, start, end in live:
        torch.mm(x[start:end], w[g], out=out[start:end])
    return out


def _segments(offs: torch.Tensor) -> list[tuple[int, int, int]]:
    """(group, start row, end row) of every non-empty segment."""
    ends = offs.tolist()
    return [(g, start, end) for g, (start, end) in enumerate(zip([0] + ends[:-1], ends)) if end > start]


def _aligned(t: torch.Tensor) -> bool:
    """torch._grouped_mm wants its data and every non-unit stride on 16 bytes (a slice's view may not be)."""
    return t.data_ptr() % 16 == 0 and all(st == 1 or (st * t.element_size()) % 16 == 0 for st in t.stride())


def _slices(b: torch.Tensor, edges: Sequence[int] | None) -> list[tuple[int, int, int]]:
    """(j, first column, end column) of each output slice (`targets.out_edges`; None: one slice)."""
    edges = (0, b.shape[-1]) if edges is None else edges
    return [(j, edges[j], edges[j + 1]) for j in range(len(edges) - 1)]


def fused_delta(x: torch.Tensor, a: torch.Tensor, b: torch.Tensor, edges: Sequence[int] | None = None) -> torch.Tensor:
    """One adapter's LoRA update in the fused layout of `targets.out_edges`: x [.., T, K];
    a [.., K, W r]; b [.., r, N]. Returns [.., T, N]: slice j is x @ a[.., j r:(j+1) r] @ b[.., slice j]."""
    shrunk, r = x @ a, b.shape[-2]
    return torch.cat([shrunk[..., j * r:(j + 1) * r] @ b[..., lo:hi] for j, lo, hi in _slices(b, edges)], dim=-1)


def lora_delta(x: torch.Tensor, a: torch.Tensor, b: torch.Tensor, offs: torch.Tensor,
               out: torch.Tensor | None = None, edges: Sequence[int] | None = None) -> torch.Tensor:
    """LoRA update for segmented tokens: x: [T, K]; a: [G, K, W R]; b: [G, R, N]
    in the fused layout of `targets.out_edges` (edges: its W + 1 slice edges;
    None: one slice), the adapter's scaling already folded into b. Returns [T, N].

    With `out` ([T, N]) the update is added into it in place and `out` is
    returned: when `out` has b's dtype the expand writes no [T, N] temporary and
    makes no second pass to add it, which in prefill (N up to twice the MLP
    width, a rank-sized K) is most of the LoRA cost."""
    shrunk, r = segmented_mm(x, a, offs), b.shape[-2]
    slices = _slices(b, edges)
    if out is None or out.dtype != b.dtype or triton_active(x.device):  # (a GPU's segments stay on it)
        y = torch.cat([segmented_mm(shrunk[:, j * r:(j + 1) * r], b[..., lo:hi], offs) for j, lo, hi in slices], 1)
        return y if out is None else out.add_(y.to(out.dtype))
    for g, start, end in _segments(offs):
        for j, lo, hi in slices:
            out[start:end, lo:hi].addmm_(shrunk[start:end, j * r:(j + 1) * r], b[g, :, lo:hi])
    return out


def padded_lora_delta(x: torch.Tensor, a: torch.Tensor, b: torch.Tensor, pad: int,
                      pad_index: torch.Tensor | None, out: torch.Tensor | None = None,
                      edges: Sequence[int] | None = None) -> torch.Tensor:
    """The same update as `lora_delta`, computed on a padded layout.

    x: [T, K] rows sorted by slot; a: [S, K, W R]; b: [S, R, N]; slot s owns
    padded rows [s * pad, (s + 1) * pad); pad_index: [T] padded row of each x
    row (None when every slot has exactly `pad` rows). Returns [T, N]; with
    `out`, adds into it in place as `lora_delta` does.

    Semantics (one slice):
        xp = zeros(S * pad, K); xp[pad_index] = x
        yp = bmm(bmm(xp.view(S, pad, K), a), b).view(S * pad, N)
        return yp[pad_index]
    """
    num_slots, r = a.shape[0], b.shape[-2]
    if pad_index is None:
        xp = x.view(num_slots, pad, -1)
    else:
        xp = x.new_zeros(num_slots * pad, x.shape[1]).index_copy_(0, pad_index, x).view(num_slots, pad, -1)
    shrunk = torch.bmm(xp, a)
    slices = _slices(b, edges)
    if out is not None and pad_index is None and out.dtype == b.dtype:
        view = out.view(num_slots, pad, -1)
        for j, lo, hi in slices:
            view[..., lo:hi].baddbmm_(shrunk[..., j * r:(j + 1) * r], b[..., lo:hi])
        return out
    y = torch.cat([torch.bmm(shrunk[..., j * r:(j + 1) * r], b[..., lo:hi]) for j, lo, hi in slices], -1)
    y = y.view(num_slots * pad, -1)
    y = y if pad_index is None else y[pad_index]
    return y if out is None else out.add_(y.to(out.dtype))


def combine_rows(rows: torch.Tensor, token: torch.Tensor, weight: torch.Tensor, num_tokens: int) -> torch.Tensor:
    """The MoE combine: [num_tokens, out], each token's (token, expert) rows times their routing
    weights, summed (rows [N, out], token [N] each row's token, weight [N]). The model combines
    its experts' outputs with it, and the LoRA server a token's expert deltas, the same way."""
    weighted = rows * weight.to(rows.device, rows.dtype)[:, None]
    return rows.new_zeros(num_tokens, rows.shape[1]).index_add_(0, token.to(rows.device), weighted)
