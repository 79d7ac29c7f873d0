"""Paged attention in Triton, reading K/V blocks in place through the block
table (no gather into a padded copy, no mask tensor).

Two kernels over one layout (`kv[0|1, block, offset, kv_head, dim]`, this
step's K/V already written through the slot mapping):

- decode: one program per (sequence, KV head); its query heads (the GQA group)
  are the rows of one tile, so each K/V block is read once per KV head. With
  few sequences and long contexts the keys are also split over programs
  (flash-decoding), their partial softmax states combined after;
- prefill (chunked): one program per (sequence, tile of its new queries, query
  head), causal from the sequence's already computed tokens on.

Both run an online softmax in fp32 over key tiles; a key tile may span
blocks (each key's block comes from the table), so any block size works.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _attend_tile(q, acc, m_i, l_i, k_ptr, v_ptr, table_row, n0, q_pos, kv_start, kv_end, window, scale,
                 stride_kb, stride_ko, head_off, dims, dmask,
                 BLOCK_N: tl.constexpr, PAGE: tl.constexpr, PRECISION: tl.constexpr):
    """Fold keys [n0, n0 + BLOCK_N) ∩ [kv_start, kv_end) into the running softmax of the query rows at q_pos."""
    n = n0 + tl.arange(0, BLOCK_N)
    nmask = (n < kv_end) & (n >= kv_start)
    page = tl.load(table_row + n // PAGE, mask=nmask, other=0).to(tl.int64)
    off = page * stride_kb + (n % PAGE) * stride_ko + head_off
    k = tl.load(k_ptr + off[:, None] + dims[None, :], mask=nmask[:, None] & dmask[None, :], other=0.0)
    v = tl.load(v_ptr + off[:, None] + dims[None, :], mask=nmask[:, None] & dmask[None, :], other=0.0)
    s = tl.dot(q, tl.trans(k), input_precision=PRECISION).to(tl.float32) * scale
    valid = nmask[None, :] & (n[None, :] <= q_pos[:, None])
    if window > 0:
        valid = valid & (n[None, :] > q_pos[:, None] - window)
    s = tl.where(valid, s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, 1))
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # a row with no key yet
    p = tl.exp(s - m_safe[:, None])
    alpha = tl.exp(m_i - m_safe)
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION).to(tl.float32)
    return acc, m_new, l_i


@triton.jit
def _decode_kernel(q_ptr, k_ptr, v_ptr, out_ptr, part_ptr, seqs_ptr, rows_ptr, ctx_ptr, tables_ptr, window, scale,
                   split_keys, num_heads, stride_qt, stride_qh, stride_ot, stride_oh, stride_kb, stride_ko, stride_kh,
                   stride_tb, GROUP: tl.constexpr, GROUP_PAD: tl.constexpr, HEAD_DIM: tl.constexpr,
                   D_PAD: tl.constexpr, BLOCK_N: tl.constexpr, PAGE: tl.constexpr, PRECISION: tl.constexpr,
                   SPLIT: tl.constexpr):
    seq = tl.load(seqs_ptr + tl.program_id(0))
    kvh = tl.program_id(1)
    row = tl.load(rows_ptr + seq).to(tl.int64)
    pos = tl.load(ctx_ptr + seq)  # the new token's position: keys 0..pos
    heads = kvh * GROUP + tl.arange(0, GROUP_PAD)
    hmask = tl.arange(0, GROUP_PAD) < GROUP
    dims = tl.arange(0, D_PAD)
    dmask = dims < HEAD_DIM
    qmask = hmask[:, None] & dmask[None, :]
    q = tl.load(q_ptr + row * stride_qt + heads[:, None] * stride_qh + dims[None, :], mask=qmask, other=0.0)
    q_pos = tl.zeros((GROUP_PAD,), dtype=tl.int32) + pos
    acc = tl.zeros((GROUP_PAD, D_PAD), dtype=tl.float32)
    m_i = tl.full((GROUP_PAD,), float("-inf"), dtype=tl.float32)
    l_i = tl.zeros((GROUP_PAD,), dtype=tl.float32)
    lo = 0
    if window > 0:
        lo = tl.maximum(pos + 1 - window, 0)
    hi = pos + 1
    if SPLIT:  # this program's share of the keys (flash-decoding): partial softmax state, combined after
        split = tl.program_id(2)
        lo = tl.maximum(lo, split * split_keys)
        hi = tl.minimum(hi, (split + 1) * split_keys)
    table_row = tables_ptr + seq.to(tl.int64) * stride_tb
    for n0 in range(lo // BLOCK_N * BLOCK_N, hi, BLOCK_N):
        acc, m_i, l_i = _attend_tile(q, acc, m_i, l_i, k_ptr, v_ptr, table_row, n0, q_pos, lo, hi, window, scale,
                                     stride_kb, stride_ko, kvh * stride_kh, dims, dmask, BLOCK_N, PAGE, PRECISION)
    if SPLIT:
        # part[i, head, split] = (acc[0:D], m, l), unnormalised
        base = ((tl.program_id(0) * num_heads + heads).to(tl.int64) * tl.num_programs(2) + split) * (HEAD_DIM + 2)
        tl.store(part_ptr + base[:, None] + dims[None, :], acc, mask=qmask)
        tl.store(part_ptr + base + HEAD_DIM, m_i, mask=hmask)
        tl.store(part_ptr + base + HEAD_DIM + 1, l_i, mask=hmask)
    else:
        out = acc / tl.where(l_i == 0.0, 1.0, l_i)[:, None]
        tl.store(out_ptr + row * stride_ot + heads[:, None] * stride_oh + dims[None, :],
                 out.to(out_ptr.dtype.element_ty), mask=qmask)


@triton.jit
def _prefill_kernel(q_ptr, k_ptr, v_ptr, out_ptr, seqs_ptr, rows_ptr, ctx_ptr, lens_ptr, tables_ptr, window, scale,
                    stride_qt, stride_qh, stride_ot, stride_oh, stride_kb, stride_ko, stride_kh, stride_tb,
                    GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, D_PAD: tl.constexpr,
                    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, PAGE: tl.constexpr, PRECISION: tl.constexpr):
    seq = tl.load(seqs_ptr + tl.program_id(0))
    q_len = tl.load(lens_ptr + seq)
    m0 = tl.program_id(1) * BLOCK_M
    if m0 >= q_len:
        return
    h = tl.program_id(2)
    row0 = tl.load(rows_ptr + seq).to(tl.int64)
    ctx = tl.load(ctx_ptr + seq)  # tokens before the first new one
    i = m0 + tl.arange(0, BLOCK_M)
    imask = i < q_len
    q_pos = ctx + i
    dims = tl.arange(0, D_PAD)
    dmask = dims < HEAD_DIM
    qmask = imask[:, None] & dmask[None, :]
    q = tl.load(q_ptr + (row0 + i)[:, None] * stride_qt + h * stride_qh + dims[None, :], mask=qmask, other=0.0)
    acc = tl.zeros((BLOCK_M, D_PAD), dtype=tl.float32)
    m_i = tl.full((BLOCK_M,), float("-inf"), dtype=tl.float32)
    l_i = tl.zeros((BLOCK_M,), dtype=tl.float32)
    kv_end = ctx + tl.minimum(m0 + BLOCK_M, q_len)  # one past the last key any row of the tile sees
    first = 0
    if window > 0:
        first = tl.maximum(ctx + m0 + 1 - window, 0) // BLOCK_N * BLOCK_N
    table_row = tables_ptr + seq.to(tl.int64) * stride_tb
    for n0 in range(first, kv_end, BLOCK_N):
        acc, m_i, l_i = _attend_tile(q, acc, m_i, l_i, k_ptr, v_ptr, table_row, n0, q_pos, 0, kv_end, window, scale,
                                     stride_kb, stride_ko, (h // GROUP) * stride_kh, dims, dmask, BLOCK_N, PAGE,
                                     PRECISION)
    out = acc / tl.where(l_i == 0.0, 1.0, l_i)[:, None]
    tl.store(out_ptr + (row0 + i)[:, None] * stride_ot + h * stride_oh + dims[None, :],
             out.to(out_ptr.dtype.element_ty), mask=qmask)


def precision(dtype: torch.dtype) -> str:
    """fp32 dots in full precision (the oracle compares fp32 runs to 1e-4); the
    default TF32 only where inputs are 16-bit anyway (where it is not used)."""
    return "ieee" if dtype == torch.float32 else "tf32"


def _key_tile(head_dim: int) -> int:
    """Keys per tile: several blocks at once (each key finds its own block), fewer for wide heads (registers)."""
    return 64 if head_dim <= 128 else 32


def _pow2(n: int, least: int = 16) -> int:
    return max(least, triton.next_power_of_2(n))


def decode_attention(q: torch.Tensor, kv: torch.Tensor, out: torch.Tensor, seqs: torch.Tensor, rows: torch.Tensor,
                     ctx: torch.Tensor, tables: torch.Tensor, window: int | None, max_keys: int,
                     splits: int | None = None) -> None:
    """out[rows[s]] = attention of q[rows[s]] (one new token at position ctx[s])
    over keys 0..ctx[s] of sequence s's blocks, for each s in `seqs`.

    q, out: [T, Hq, D]; kv: [2, blocks, block_size, Hkv, D]; seqs: [B'] int32;
    rows, ctx: [B] int32; tables: [B, max_blocks] int32; max_keys: a host-known
    bound on ctx[seqs] + 1. With few sequences and long contexts the keys are
    split over several programs (`splits`, None: chosen here) whose partial
    softmax states are combined after."""
    _, _, page, hkv, d = kv.shape
    group, block_n = q.shape[1] // hkv, _key_tile(d)
    assert kv.stride(-1) == 1 and q.stride(-1) == 1 and out.stride(-1) == 1
    splits = splits or _splits(seqs.numel() * hkv, max_keys)
    split_keys = -(-max_keys // splits // block_n) * block_n if splits > 1 else max_keys
    splits = -(-max_keys // split_keys)
    part = q.new_empty((seqs.numel(), q.shape[1], splits, d + 2), dtype=torch.float32) if splits > 1 else out
    _decode_kernel[(seqs.numel(), hkv, splits)](
        q, kv[0], kv[1], out, part, seqs, rows, ctx, tables, window or 0, d ** -0.5, split_keys, q.shape[1],
        q.stride(0), q.stride(1), out.stride(0), out.stride(1), kv.stride(1), kv.stride(2), kv.stride(3),
        tables.stride(0), GROUP=group, GROUP_PAD=_pow2(group), HEAD_DIM=d, D_PAD=_pow2(d), BLOCK_N=block_n,
        PAGE=page, PRECISION=precision(q.dtype), SPLIT=splits > 1)
    if splits > 1:
        acc, m, lse = part[..., :d], part[..., d], part[..., d + 1]
        top = m.amax(-1, keepdim=True)
        w = torch.exp(m - torch.where(torch.isinf(top), 0.0, top))  # an empty split weighs 0
        total = (w * lse).sum(-1)[..., None]
        out[rows[seqs].long()] = ((w[..., None] * acc).sum(-2) / total.clamp_min(1e-30)).to(out.dtype)


def _splits(programs: int, max_keys: int) -> int:
    """Key splits per (sequence, KV head): enough programs to fill a GPU (~128),
    none under ~512 keys each."""
    if programs >= 128 or max_keys <= 512:
        return 1
    return min(-(-128 // programs), -(-max_keys // 512), 32)


def prefill_attention(q: torch.Tensor, kv: torch.Tensor, out: torch.Tensor, seqs: torch.Tensor, rows: torch.Tensor,
                      ctx: torch.Tensor, lens: torch.Tensor, tables: torch.Tensor, max_len: int,
                      window: int | None) -> None:
    """out[rows[s] + i] = causal attention of query i of sequence s (position
    ctx[s] + i) over the sequence's keys, for each s in `seqs` and i < lens[s].
    max_len: a host-known bound on lens[seqs]."""
    _, _, page, hkv, d = kv.shape
    assert kv.stride(-1) == 1 and q.stride(-1) == 1 and out.stride(-1) == 1
    block_m = 16 if max_len <= 16 else 64
    grid = (seqs.numel(), triton.cdiv(max_len, block_m), q.shape[1])
    _prefill_kernel[grid](q, kv[0], kv[1], out, seqs, rows, ctx, lens, tables, window or 0, d ** -0.5,
                          q.stride(0), q.stride(1), out.stride(0), out.stride(1),
                          kv.stride(1), kv.stride(2), kv.stride(3), tables.stride(0),
                          GROUP=q.shape[1] // hkv, HEAD_DIM=d, D_PAD=_pow2(d), BLOCK_M=block_m,
                          BLOCK_N=_key_tile(d), PAGE=page, PRECISION=precision(q.dtype))
