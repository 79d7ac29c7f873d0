"""An adapter's weights as bytes in cache blocks, split along the rank.

Each projection's A is stored transposed and B as is, so both are rank rows
([R, in] and [R, out], per expert for expert projections): consecutive bytes
are consecutive rank slices, and an adapter takes blocks in proportion to its
rank rather than to the largest rank served. `pack` and `unpack` are exact
inverses; the cache manager only ever sees the byte count.
"""

from __future__ import annotations

import dataclasses
import math

import torch

from loraserve.lora.adapter import LoraAdapter


def pack(adapter: LoraAdapter) -> torch.Tensor:
    """The adapter's weights as one flat uint8 tensor of `adapter.num_bytes` bytes."""
    parts = []
    for key, _, _ in adapter.layout:
        a, b = adapter.weights[key]
        parts.append(a.transpose(-1, -2).contiguous().flatten())
        parts.append(b.contiguous().flatten())
    return torch.cat(parts).view(torch.uint8)


def unpack(data: torch.Tensor, adapter: LoraAdapter, dtype: torch.dtype, device: torch.device) -> LoraAdapter:
    """The adapter with its weights rebuilt from `pack`'s bytes (trailing padding ignored)."""
    flat = data[:adapter.num_bytes].view(dtype)
    weights, at = {}, 0
    for key, a_shape, b_shape in adapter.layout:
        n = math.prod(a_shape)
        a_t = flat[at:at + n].view(*a_shape[:-2], a_shape[-1], a_shape[-2])
        at += n
        n = math.prod(b_shape)
        b = flat[at:at + n].view(b_shape)
        at += n
        weights[key] = (a_t.transpose(-1, -2).to(device), b.to(device))
    return dataclasses.replace(adapter, weights=weights)
