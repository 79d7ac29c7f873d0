"""One step's attention tables for the Triton kernels, built on the host from
the scheduler's lists and sent in one asynchronous copy (`segments.upload`)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from loraserve.gpu.attention_kernels import decode_attention, prefill_attention
from loraserve.gpu.segments import upload


@dataclass
class PagedStep:
    rows: torch.Tensor
    """[B] int32: each sequence's first row in the step."""
    ctx: torch.Tensor
    """[B] int32: its tokens already in the cache before this step."""
    lens: torch.Tensor
    """[B] int32: its new tokens."""
    tables: torch.Tensor
    """[B, max_blocks] int32 block table (padded with block 0, never read past the sequence)."""
    decodes: torch.Tensor
    """[B_d] int32: the sequences with one new token (the decode kernel's)."""
    prefills: torch.Tensor
    """[B_p] int32: the others (the prefill kernel's)."""
    max_len: int
    """Most new tokens of a prefill sequence."""
    max_keys: int
    """Most keys a decode sequence attends (its position + 1)."""
    window: int | None

    def attend(self, q: torch.Tensor, kv: torch.Tensor) -> torch.Tensor:
        """q: [T, Hq, D]; kv: [2, blocks, block_size, Hkv, D] with this step's K/V written."""
        out = torch.empty_like(q)
        if self.decodes.numel():
            decode_attention(q, kv, out, self.decodes, self.rows, self.ctx, self.tables, self.window, self.max_keys)
        if self.prefills.numel():
            prefill_attention(q, kv, out, self.prefills, self.rows, self.ctx, self.lens, self.tables, self.max_len,
                              self.window)
        return out


def build_paged(seqs: list[tuple[list[int], int, int]], flat: tuple[list[int], list[int], list[int]],
                block_size: int, window: int | None, device: torch.device
                ) -> tuple[torch.Tensor, torch.Tensor, PagedStep]:
    """(positions [T] int32, slot mapping [T] int64, tables) of a step whose
    sequences are (block ids, tokens computed, new tokens) in row order;
    `flat`: their positions, slots and first rows (`model.attention.flatten`)."""
    positions, slots, rows = flat
    width = max(-(-(start + n) // block_size) for _, start, n in seqs)
    tables = [v for blocks, start, n in seqs for v in (blocks + [0] * width)[:width]]
    decodes = [i for i, (_, _, n) in enumerate(seqs) if n == 1]
    prefills = [i for i, (_, _, n) in enumerate(seqs) if n != 1]
    pos, slot, rows_t, ctx, lens, table, dec, pre = upload(
        [positions, slots, rows, [s for _, s, _ in seqs], [n for _, _, n in seqs], tables, decodes, prefills], device)
    step = PagedStep(rows_t, ctx, lens, table.view(len(seqs), width), dec, pre,
                     max((n for _, _, n in seqs), default=0), max((seqs[i][1] + 1 for i in decodes), default=0),
                     window)
    return pos, slot.long(), step
