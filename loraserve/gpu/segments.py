"""Step metadata for the GPU path without host synchronisation.

A CUDA copy from pageable host memory waits for the copy engine (so for the
stream's earlier work), and reading a device value on the host waits for
everything: either inside a forward stalls the launch queue. So the host
builds each step's small integer tables once, in one pinned buffer, and sends
them with one asynchronous copy; what depends on the forward's own results
(MoE routing) is turned into offsets on the device (`group_bounds`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

BLOCK_M = 16
"""Rows per tile of the segmented kernels: decode segments are a few rows, and tl.dot wants at least 16."""


@dataclass
class Tiles:
    """The row tiles of a segmented matmul: tile p covers rows first[p] up to
    min(first[p] + BLOCK_M, ends[group[p]]) of group group[p]; group -1: no tile
    (the list is sized by a bound)."""

    group: torch.Tensor
    """[P] int32."""
    first: torch.Tensor
    """[P] int32."""
    ends: torch.Tensor
    """[G] int32: each group's end row."""

    @property
    def size(self) -> int:
        return self.group.numel()


def host_tiles(counts: Sequence[int]) -> tuple[list[int], list[int], list[int]]:
    """(group, first row) of each tile and each group's end row, for consecutive
    segments of these row counts (to `upload`)."""
    group, first, ends, start = [], [], [], 0
    for g, n in enumerate(counts):
        for row in range(start, start + n, BLOCK_M):
            group.append(g)
            first.append(row)
        start += n
        ends.append(start)
    return group, first, ends


def device_tiles(starts: torch.Tensor, ends: torch.Tensor, num_rows: int) -> Tiles:
    """The tiles of groups whose bounds are on the device, sized by the host-known
    bound cdiv(num_rows, BLOCK_M) + G (each group wastes at most one partial tile)."""
    tiles = (ends - starts + BLOCK_M - 1) // BLOCK_M  # [G]
    tile_ends = tiles.cumsum(0, dtype=torch.int32)
    bound = -(-num_rows // BLOCK_M) + starts.numel()
    p = torch.arange(bound, dtype=torch.int32, device=starts.device)
    group = torch.searchsorted(tile_ends, p, right=True, out_int32=True)
    real = group < starts.numel()
    g = group.clamp(max=starts.numel() - 1)
    first = starts[g] + (p - (tile_ends[g] - tiles[g])) * BLOCK_M
    return Tiles(torch.where(real, group, -1), first, ends)


def upload(tables: Sequence[Sequence[int]], device: torch.device) -> list[torch.Tensor]:
    """int32 device tensors of the given lists, sent in one copy (pinned and
    asynchronous on CUDA; the caching host allocator keeps the staging buffer
    until the copy has run)."""
    sizes = [len(t) for t in tables]
    flat = torch.tensor([v for t in tables for v in t], dtype=torch.int32)
    if device.type == "cuda" and flat.numel():
        flat = flat.pin_memory().to(device, non_blocking=True)
    else:
        flat = flat.to(device)
    return list(flat.split(sizes))


def group_bounds(keys: torch.Tensor, num_groups: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(starts, ends) int32 [G] of each group's rows in nondecreasing `keys`
    (group g's rows are starts[g]:ends[g]); no host sync, unlike `bincount`,
    whose output size depends on the data."""
    groups = torch.arange(num_groups, device=keys.device, dtype=keys.dtype)
    starts = torch.searchsorted(keys, groups, out_int32=True)
    ends = torch.searchsorted(keys, groups, right=True, out_int32=True)
    return starts, ends


def group_ends(keys: torch.Tensor, num_groups: int) -> torch.Tensor:
    """Cumulative row ends [G] int32 of nondecreasing `keys`: `bincount` on a
    CPU (fastest there), `searchsorted` on a device (no host sync)."""
    if keys.device.type == "cpu":
        return torch.bincount(keys, minlength=num_groups).cumsum(0, dtype=torch.int32)
    return group_bounds(keys, num_groups)[1]
