"""The plain torch computations the Triton kernels must equal, written for
clarity (a loop per sequence or group, full-precision math), not speed."""

from __future__ import annotations

import torch


def paged_attention(q: torch.Tensor, kv: torch.Tensor, rows: list[int], ctx: list[int], lens: list[int],
                    tables: list[list[int]], window: int | None) -> torch.Tensor:
    """q: [T, Hq, D]; sequence s has lens[s] new queries at rows[s]..., positions
    ctx[s]..., and its keys in blocks tables[s]. Returns [T, Hq, D] (rows of
    no sequence zero)."""
    _, _, page, hkv, d = kv.shape
    group = q.shape[1] // hkv
    out = torch.zeros_like(q, dtype=torch.float32)
    for row, start, n, table in zip(rows, ctx, lens, tables):
        num_keys = start + n
        pos = torch.arange(num_keys)
        blocks, offsets = [table[p // page] for p in pos.tolist()], (pos % page).tolist()
        keys = kv[0][blocks, offsets].float().repeat_interleave(group, dim=1)  # [N, Hq, D]
        vals = kv[1][blocks, offsets].float().repeat_interleave(group, dim=1)
        qs = q[row:row + n].float()  # [n, Hq, D]
        scores = torch.einsum("qhd,khd->hqk", qs, keys) / d ** 0.5
        q_pos = torch.arange(start, start + n)
        allowed = pos[None, :] <= q_pos[:, None]
        if window:
            allowed &= pos[None, :] > q_pos[:, None] - window
        probs = scores.masked_fill(~allowed, float("-inf")).softmax(-1)
        out[row:row + n] = torch.einsum("hqk,khd->qhd", probs, vals)
    return out.to(q.dtype)


def segment_mm(x: torch.Tensor, w: torch.Tensor, starts: list[int], ends: list[int], index: list[int],
               ncols: list[int]) -> torch.Tensor:
    """y[starts[g]:ends[g], :ncols[g]] = x[...] @ w[index[g], :, :ncols[g]]; zeros elsewhere."""
    y = torch.zeros(x.shape[0], w.shape[-1], dtype=torch.float32)
    for s, e, i, c in zip(starts, ends, index, ncols):
        y[s:e, :c] = x[s:e].double().matmul(w[i, :, :c].double()).float()
    return y


def expand_add(shrunk: torch.Tensor, b: torch.Tensor, out: torch.Tensor, starts: list[int], ends: list[int],
               index: list[int], units: list[list[tuple[int, int]]], bounds: list[int], slice_cols: int
               ) -> torch.Tensor:
    """out + for each group g and output slice j:
    shrunk[rows, j c + lo : j c + hi] @ b[index[g], lo:hi, slice j], (lo, hi) = units[g][j], c = slice_cols."""
    y = out.double().clone()
    edges = [0, *bounds, out.shape[1]]
    for s, e, i, unit in zip(starts, ends, index, units):
        for j, (lo, hi) in enumerate(unit):
            c0, c1, at = edges[j], edges[j + 1], j * slice_cols
            y[s:e, c0:c1] += shrunk[s:e, at + lo:at + hi].double() @ b[i, lo:hi, c0:c1].double()
    return y.to(out.dtype)
