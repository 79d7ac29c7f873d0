"""Paged attention in plain PyTorch.

KV lives in fixed-size blocks: ``kv[layer, 0|1, block, offset, kv_head, dim]``.
Each step writes its new K/V through a flat slot mapping, then gathers each
request's blocks (by its block table) into a padded batch and runs SDPA with a
mask that encodes causality, chunk offsets and padding. Requests of one step are
split into two groups (single-token decodes; multi-token prefills) so a long
prefill never pads the decodes' queries. On CPU in float32 the decodes skip
the gather: a small kernel reads their blocks in place (`cpu_kernels.py`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from loraserve.gpu import active as triton_active
from loraserve.model import cpu_kernels


@dataclass
class AttnGroup:
    src: torch.Tensor
    """[n] long: rows of the step's flat token order that belong to this group."""
    dst: torch.Tensor
    """[n] long: where those rows go in the padded [B * Lq] query layout."""
    batch: int
    q_len: int
    block_tables: torch.Tensor
    """[B, max_blocks] long (padded with block 0, masked out)."""
    mask: torch.Tensor
    """[B, 1, Lq, Lk] bool: True where a query may attend a key."""
    identity: bool = False
    """The only group, with src = dst = every row in order (e.g. an all-decode step)."""
    kv_lens: torch.Tensor | None = None
    """[B] long: keys each sequence attends (its length so far); decode groups only."""
    sliding_window: int | None = None


@dataclass
class AttnMetadata:
    positions: torch.Tensor  # [T] long
    slot_mapping: torch.Tensor  # [T] long: block * block_size + offset
    groups: list[AttnGroup]
    paged: object | None = None
    """The Triton kernels' tables (`gpu/paged.py`) on the GPU path, in place of groups."""


def build_metadata(
    seqs: list[tuple[list[int], int, int]],
    block_size: int,
    sliding_window: int | None,
    device: torch.device,
) -> AttnMetadata:
    """Attention metadata for one step.

    seqs: per scheduled request, in the step's row order, (block_ids,
    num_computed_tokens, num_new_tokens); each request's new tokens are
    contiguous rows of the step.
    """
    positions, slots, first_rows = flatten(seqs, block_size)
    if triton_active(device):
        from loraserve.gpu.paged import build_paged
        positions_t, slot_mapping, paged = build_paged(seqs, (positions, slots, first_rows), block_size,
                                                       sliding_window, device)
        return AttnMetadata(positions_t, slot_mapping, [], paged=paged)
    groups = []
    for want_decode in (True, False):
        members = [i for i, (_, _, n) in enumerate(seqs) if (n == 1) == want_decode]
        if members:
            groups.append(_group([seqs[i] for i in members], [first_rows[i] for i in members],
                                 block_size, sliding_window, device))
    if len(groups) == 1:
        g = groups[0]
        rows = torch.arange(len(positions), device=device)
        g.identity = g.batch * g.q_len == len(positions) and torch.equal(g.src, rows) and torch.equal(g.dst, rows)
    return AttnMetadata(torch.tensor(positions, dtype=torch.long, device=device),
                        torch.tensor(slots, dtype=torch.long, device=device), groups)


def flatten(seqs: list[tuple[list[int], int, int]], block_size: int) -> tuple[list[int], list[int], list[int]]:
    """The step's rows: each new token's position and KV slot (block * block_size
    + offset), in row order, and each sequence's first row."""
    positions, slots, first_rows = [], [], []
    for blocks, start, n in seqs:
        first_rows.append(len(positions))
        for p in range(start, start + n):
            positions.append(p)
            slots.append(blocks[p // block_size] * block_size + p % block_size)
    return positions, slots, first_rows


def _group(seqs, token_order, block_size, sliding_window, device) -> AttnGroup:
    batch = len(seqs)
    q_len = max(n for _, _, n in seqs)
    max_blocks = max(-(-(start + n) // block_size) for _, start, n in seqs)
    k_len = max_blocks * block_size
    tables = torch.zeros(batch, max_blocks, dtype=torch.long)
    q_pos = torch.full((batch, q_len), -1, dtype=torch.long)
    src, dst = [], []
    for b, ((blocks, start, n), row) in enumerate(zip(seqs, token_order)):
        nb = -(-(start + n) // block_size)
        tables[b, :nb] = torch.tensor(blocks[:nb], dtype=torch.long)
        q_pos[b, :n] = torch.arange(start, start + n)
        src.extend(range(row, row + n))
        dst.extend(range(b * q_len, b * q_len + n))
    k_pos = torch.arange(k_len)
    mask = k_pos[None, None, :] <= q_pos[:, :, None]  # causal; padded queries (-1) see nothing
    if sliding_window is not None:
        mask &= k_pos[None, None, :] > q_pos[:, :, None] - sliding_window
    mask[:, :, 0] |= q_pos < 0  # padded query rows attend key 0 rather than produce NaN
    return AttnGroup(
        src=torch.tensor(src, dtype=torch.long, device=device),
        dst=torch.tensor(dst, dtype=torch.long, device=device),
        batch=batch,
        q_len=q_len,
        block_tables=tables.to(device),
        mask=mask[:, None].to(device),
        kv_lens=torch.tensor([start + n for _, start, n in seqs], device=device) if q_len == 1 else None,
        sliding_window=sliding_window,
    )


def paged_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kv: torch.Tensor, meta: AttnMetadata
) -> torch.Tensor:
    """q: [T, Hq, D]; k, v: [T, Hkv, D] (this step's new keys and values);
    kv: [2, num_blocks, block_size, Hkv, D] (one layer's cache). Returns [T, Hq, D]."""
    _, num_blocks, block_size, hkv, d = kv.shape
    compiled = cpu_kernels.attention_available(q, kv)
    if compiled:
        cpu_kernels.kernels().write_kv(kv, meta.slot_mapping, k, v)
    else:
        flat = kv.view(2, num_blocks * block_size, hkv, d)
        flat[0].index_copy_(0, meta.slot_mapping, k)
        flat[1].index_copy_(0, meta.slot_mapping, v)
    if meta.paged is not None:
        return meta.paged.attend(q, kv)
    out = torch.empty_like(q)
    for g in meta.groups:
        if g.kv_lens is not None and compiled:  # decodes: blocks read in place
            o = cpu_kernels.kernels().paged_decode(q if g.identity else q[g.src], kv, g.block_tables, g.kv_lens,
                                                   1 / math.sqrt(d), g.sliding_window or 0)
            if g.identity:
                return o
            out[g.src] = o
            continue
        if g.identity:  # rows are already the padded layout: no scatter, no gather
            qp = q.view(g.batch, g.q_len, -1, d).transpose(1, 2)
        else:
            qp = q.new_zeros(g.batch * g.q_len, q.shape[1], d)
            qp[g.dst] = q[g.src]
            qp = qp.view(g.batch, g.q_len, -1, d).transpose(1, 2)  # [B, Hq, Lq, D]
        # index_select copies whole blocks (2-5x faster on CPU than kv[0][block_tables]), K and V in one call
        gathered = kv.index_select(1, g.block_tables.view(-1))  # [2, B * blocks, block_size, Hkv, D]
        keys = gathered[0].view(g.batch, -1, hkv, d).transpose(1, 2)  # [B, Hkv, Lk, D]
        vals = gathered[1].view(g.batch, -1, hkv, d).transpose(1, 2)
        o = F.scaled_dot_product_attention(qp, keys, vals, attn_mask=g.mask, enable_gqa=True)
        o = o.transpose(1, 2).reshape(g.batch * g.q_len, -1, d)
        if g.identity:
            return o
        out[g.src] = o[g.dst]
    return out
