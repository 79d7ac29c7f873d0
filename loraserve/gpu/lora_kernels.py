"""Segmented matmuls in Triton: LoRA shrink and expand, and the MoE experts'
matmul where torch has no grouped GEMM for the device or dtype.

Rows come in segments (an adapter's tokens, or one (expert, adapter) group's
routed rows), each multiplied by its own matrix from a stacked bank. The grid
runs over a list of row tiles (`segments.Tiles`: each tile's group and first
row), sized by a host-known bound, built on the host when the segments are
known there and on the device when they come from routing: no host sync to
learn the sizes, and no program per (group, possible tile) pair.

Each group reads only its adapter's own rank: the shrink computes the columns
a group's table entry names, and the expand of a fused projection (q|k|v,
gate|up) multiplies each output slice by its own shrink columns (slice j's
start at j * slice_cols) and only the rank rows of B that feed it (`units`).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from loraserve.gpu.attention_kernels import precision
from loraserve.gpu.segments import BLOCK_M, Tiles


@triton.jit
def _segment_mm_kernel(x_ptr, w_ptr, y_ptr, group_ptr, first_ptr, ends_ptr, index_ptr, ncols_ptr, ncols_stride,
                       ncols_mod, K, k_per_split, stride_xt, stride_xk, stride_wg, stride_wk, stride_wn,
                       stride_ys, stride_yt, stride_yn, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                       BLOCK_K: tl.constexpr, PRECISION: tl.constexpr):
    g = tl.load(group_ptr + tl.program_id(0))
    if g < 0:
        return
    m0 = tl.load(first_ptr + tl.program_id(0))
    end = tl.minimum(tl.load(ends_ptr + g), m0 + BLOCK_M)
    w = tl.load(index_ptr + g)
    ncols = tl.load(ncols_ptr + (w % ncols_mod) * ncols_stride)
    n0 = tl.program_id(1) * BLOCK_N
    if n0 >= ncols:
        return
    w = w.to(tl.int64)
    rows = m0 + tl.arange(0, BLOCK_M)
    cols = n0 + tl.arange(0, BLOCK_N)
    rmask = rows < end
    cmask = cols < ncols
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    k_lo = tl.program_id(2) * k_per_split  # split-K: this program's share of the inner dimension
    k_hi = tl.minimum(K, k_lo + k_per_split)
    for k0 in range(k_lo, k_hi, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        kmask = ks < k_hi
        xt = tl.load(x_ptr + rows[:, None] * stride_xt + ks[None, :] * stride_xk,
                     mask=rmask[:, None] & kmask[None, :], other=0.0)
        wt = tl.load(w_ptr + w * stride_wg + ks[:, None] * stride_wk + cols[None, :] * stride_wn,
                     mask=kmask[:, None] & cmask[None, :], other=0.0)
        acc += tl.dot(xt, wt.to(xt.dtype), input_precision=PRECISION)
    y_ptr += tl.program_id(2).to(tl.int64) * stride_ys
    tl.store(y_ptr + rows[:, None] * stride_yt + cols[None, :] * stride_yn, acc.to(y_ptr.dtype.element_ty),
             mask=rmask[:, None] & cmask[None, :])


@triton.jit
def _expand_kernel(s_ptr, b_ptr, out_ptr, group_ptr, first_ptr, ends_ptr, index_ptr, units_ptr, unit_mod, N, c1, c2,
                   slice_cols, stride_st, stride_bg, stride_br, stride_bn, stride_ot, stride_on,
                   WIDTH: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr,
                   PRECISION: tl.constexpr):
    g = tl.load(group_ptr + tl.program_id(0))
    if g < 0:
        return
    m0 = tl.load(first_ptr + tl.program_id(0))
    end = tl.minimum(tl.load(ends_ptr + g), m0 + BLOCK_M)
    w = tl.load(index_ptr + g)
    unit = units_ptr + (w % unit_mod) * (2 * WIDTH + 1)
    w = w.to(tl.int64)
    rows = m0 + tl.arange(0, BLOCK_M)
    rmask = rows < end
    n0 = tl.program_id(1) * BLOCK_N
    cols = n0 + tl.arange(0, BLOCK_N)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for j in tl.static_range(WIDTH):
        c_lo = 0 if j == 0 else (c1 if j == 1 else c2)
        c_hi = N if j == WIDTH - 1 else (c1 if j == 0 else c2)
        lo = tl.load(unit + 2 * j)
        hi = tl.load(unit + 2 * j + 1)
        cmask = (cols >= c_lo) & (cols < c_hi)
        if (n0 < c_hi) & (n0 + BLOCK_N > c_lo):  # the tile meets this output slice
            for r0 in range(lo, hi, BLOCK_R):
                rs = r0 + tl.arange(0, BLOCK_R)
                rk = rs < hi
                st = tl.load(s_ptr + rows[:, None] * stride_st + (j * slice_cols + rs)[None, :],
                             mask=rmask[:, None] & rk[None, :], other=0.0)
                bt = tl.load(b_ptr + w * stride_bg + rs[:, None] * stride_br + cols[None, :] * stride_bn,
                             mask=rk[:, None] & cmask[None, :], other=0.0)
                acc += tl.dot(st, bt.to(st.dtype), input_precision=PRECISION)
    omask = rmask[:, None] & (cols < N)[None, :]
    optr = out_ptr + rows[:, None] * stride_ot + cols[None, :] * stride_on
    tl.store(optr, (tl.load(optr, mask=omask, other=0.0).to(tl.float32) + acc).to(out_ptr.dtype.element_ty),
             mask=omask)


def segment_mm(x: torch.Tensor, w: torch.Tensor, tiles: Tiles, index: torch.Tensor,
               ncols: tuple[torch.Tensor, int] | None = None, out: torch.Tensor | None = None,
               split_k: int | None = None) -> torch.Tensor:
    """y[rows of g, :c] = x[rows of g] @ w[index[g], :, :c] for each group g of `tiles`,
    where c = ncols[0][index[g] % ncols[1]] (every column when ncols is None).

    x: [T, K]; w: [G', K, N] (any strides); index: [G] int32 on the device;
    ncols[0]: a 1-d int32 view (a rank column of the units table). Rows in no
    group and columns past a group's c: zeros if `out` is None, else left as
    they were (or zeroed when the inner dimension is split).

    Few tiles (a decode step's shrink: a handful of rows, a rank-wide output,
    thousands of inputs) would leave most of a GPU idle in one long loop over
    K, so K is then split over programs (`split_k`, None: chosen here) whose
    fp32 partial products are summed after, in a fixed order."""
    num_rows, k = x.shape
    n = w.shape[-1]
    y = x.new_zeros(num_rows, n) if out is None else out
    if num_rows == 0 or tiles.size == 0:
        return y
    if ncols is None:
        ncols = (torch.full((1,), n, dtype=torch.int32, device=x.device), 1)
    block_n, block_k = (64 if n >= 64 else 16), 32
    programs = tiles.size * triton.cdiv(n, block_n)
    split_k = split_k or (1 if programs >= 128 else max(1, min(-(-128 // programs), k // 256)))
    k_per_split = triton.cdiv(triton.cdiv(k, split_k), block_k) * block_k
    split_k = triton.cdiv(k, k_per_split)
    target = y if split_k == 1 else torch.zeros(split_k, num_rows, n, dtype=torch.float32, device=x.device)
    grid = (tiles.size, triton.cdiv(n, block_n), split_k)
    _segment_mm_kernel[grid](x, w, target, tiles.group, tiles.first, tiles.ends, index, ncols[0], ncols[0].stride(0),
                             ncols[1], k, k_per_split, x.stride(0), x.stride(1), w.stride(0), w.stride(1),
                             w.stride(2), target.stride(0) if split_k > 1 else 0, target.stride(-2),
                             target.stride(-1), BLOCK_M=BLOCK_M, BLOCK_N=block_n, BLOCK_K=block_k,
                             PRECISION=precision(x.dtype))
    if split_k > 1:
        y.copy_(target.sum(0))
    return y


def expand_add(shrunk: torch.Tensor, b: torch.Tensor, out: torch.Tensor, tiles: Tiles, index: torch.Tensor,
               units: torch.Tensor, unit_mod: int, bounds: tuple[int, ...], slice_cols: int) -> None:
    """out[rows of g] += shrunk[rows, j c + lo : j c + hi] @ b[index[g], lo:hi, slice j] for
    each output slice j of the fused projection (c = slice_cols), (lo, hi) its rank rows in
    `units` (the layout of `targets.out_edges`, c the bank's rank).

    shrunk: [T, width * c]; b: [G', R, N]; out: [T, N]; units: [U, 2 * width + 1] int32
    ((lo, hi) per slice, then the shrink's columns), row index[g] % unit_mod; bounds: the
    slices' inner column boundaries (width - 1 of them)."""
    width = len(bounds) + 1
    n = out.shape[1]
    if shrunk.shape[0] == 0 or tiles.size == 0:
        return
    c1, c2 = (list(bounds) + [n, n])[:2]
    block_n = 64 if n >= 64 else 16
    grid = (tiles.size, triton.cdiv(n, block_n))
    _expand_kernel[grid](shrunk, b, out, tiles.group, tiles.first, tiles.ends, index, units, unit_mod, n, c1, c2,
                         slice_cols,
                         shrunk.stride(0), b.stride(0), b.stride(1), b.stride(2), out.stride(0), out.stride(1),
                         WIDTH=width, BLOCK_M=BLOCK_M, BLOCK_N=block_n, BLOCK_R=16, PRECISION=precision(shrunk.dtype))
