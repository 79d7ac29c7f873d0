"""Batched LoRA math: the one place it lives.

Tokens of one step arrive sorted by LoRA slot, so each adapter's tokens form a
contiguous segment; every projection then needs two segmented matmuls (shrink
to the rank, expand back), whatever the number of adapters in the batch.
"""

from __future__ import annotations

import torch

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
    ends = offs.tolist()
    live = [(g, start, end) for g, (start, end) in enumerate(zip([0] + ends[:-1], ends)) if end > start]
    # CPU grouped_mm multiplies every group, empty ones too: only worth it when most have rows
    if (_HAS_GROUPED_MM and x.device.type == "cpu" and x.dtype == torch.float32 and 2 * len(live) > len(ends)
            and _aligned(x) and _aligned(w)):
        return torch._grouped_mm(x, w, offs=offs)
    out = x.new_empty(x.shape[0], w.shape[-1])
    for g, start, end in live:
        torch.mm(x[start:end], w[g], out=out[start:end])
    return out


def _aligned(t: torch.Tensor) -> bool:
    """torch._grouped_mm wants every non-unit stride to be a multiple of 16 bytes."""
    return all(st == 1 or (st * t.element_size()) % 16 == 0 for st in t.stride())


def lora_delta(x: torch.Tensor, a: torch.Tensor, b: torch.Tensor, offs: torch.Tensor) -> torch.Tensor:
    """LoRA update for segmented tokens: x: [T, K]; a: [G, K, R]; b: [G, R, N]
    (the adapter's scaling already folded into b). Returns [T, N]."""
    return segmented_mm(segmented_mm(x, a, offs), b, offs)


def padded_lora_delta(x: torch.Tensor, a: torch.Tensor, b: torch.Tensor, pad: int,
                      pad_index: torch.Tensor | None) -> torch.Tensor:
    """The same update as `lora_delta`, computed on a padded layout.

    x: [T, K] rows sorted by slot; a: [S, K, R]; b: [S, R, N]; slot s owns
    padded rows [s * pad, (s + 1) * pad); pad_index: [T] padded row of each x
    row (None when every slot has exactly `pad` rows). Returns [T, N].

    Semantics:
        xp = zeros(S * pad, K); xp[pad_index] = x
        yp = bmm(bmm(xp.view(S, pad, K), a), b).view(S * pad, N)
        return yp[pad_index]
    """
    num_slots = a.shape[0]
    if pad_index is None:
        xp = x.view(num_slots, pad, -1)
    else:
        xp = x.new_zeros(num_slots * pad, x.shape[1]).index_copy_(0, pad_index, x).view(num_slots, pad, -1)
    y = torch.bmm(torch.bmm(xp, a), b).view(num_slots * pad, -1)
    return y if pad_index is None else y[pad_index]
