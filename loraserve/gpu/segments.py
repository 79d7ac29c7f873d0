"""Step metadata for the GPU path without host synchronisation.

A CUDA copy from pageable host memory waits for the copy engine (so for the
stream's earlier work), and reading a device value on the host waits for
everything: either inside a forward stalls the launch queue. So the host
builds each step's small integer tables once, in one pinned buffer, and sends
them with one asynchronous copy; what depends on the forward's own results
(MoE routing) is turned into offsets on the device (`group_bounds`).
"""

from __future__ import annotations

from typing import Sequence

import torch


def upload(tables: Sequence[Sequence[int]], device: torch.device) -> list[torch.Tensor]:
    """int32 device tensors of the given lists, sent in one copy (pinned and
    asynchronous on CUDA; the caching host allocator keeps the staging buffer
    until the copy has run)."""
    sizes = [len(t) for t in tables]
    flat = torch.tensor([v for t in tables for v in t], dtype=torch.int32)
    if device.type == "cuda":
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
