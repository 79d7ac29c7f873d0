"""The tiers' memory: one arena of equal-size blocks per tier, and the block
reads, writes and copies the executor, the mover and the LoRA backend share.

Each arena is laid out for attention ([layers, K/V, block, token, head,
dim]). A block holds either KV or a run of an adapter's packed rank slices
(`lora/packing.py`): a block's bytes are its slice of every layer, so KV and
adapter blocks are interchangeable and `copy_blocks` moves both.
"""

from __future__ import annotations

import math

import torch

from loraserve.gpu.host_memory import gather_blocks, pinned_empty
from loraserve.model.spec import ModelSpec


COPY_CHUNK_BYTES = 64 * 2**20
"""Most bytes one CUDA tier copy stages at once (the device tier's budget keeps this much free)."""


class TierMemory:
    def __init__(self, spec: ModelSpec, num_blocks: int, block_size: int, dtype: torch.dtype,
                 device: torch.device, num_host_blocks: int = 0) -> None:
        shape = (spec.num_layers, 2, num_blocks, block_size, spec.num_kv_heads, spec.head_dim)
        self.tiers = {"device": torch.zeros(shape, dtype=dtype, device=device)}
        if num_host_blocks:
            host_shape = shape[:2] + (num_host_blocks,) + shape[3:]
            # pinned at its size (to the page) for a GPU (see gpu/host_memory.py)
            self.tiers["host"] = pinned_empty(host_shape, dtype) if device.type == "cuda" else torch.empty(
                host_shape, dtype=dtype)
        self.block_size = block_size
        self.block_bytes = math.prod(shape) // num_blocks * dtype.itemsize

    def prefault(self) -> None:
        """Touch every page of the host tier now. `serve` does: its memory is
        then taken at start, so a host tier too big for RAM fails at once and
        resident memory stays flat while the cache fills (a 30-minute soak
        otherwise saw RSS grow 3.1 → 4.8 GiB with a 2 GiB host tier: not a
        leak, but a dashboard cannot tell). A library user, a test with many
        engines, and the LoRA server (several per test) keep the lazy pages."""
        if "host" in self.tiers:
            self.tiers["host"].zero_()

    @property
    def kv_cache(self) -> torch.Tensor:
        """The device arena, as attention reads and writes it."""
        return self.tiers["device"]

    def copy_blocks(self, src_tier: str, dst_tier: str, pairs: list[tuple[int, int]]) -> None:
        """Copy blocks (KV or adapter rank slices alike) between tiers: (src block, dst block) pairs."""
        if not pairs:
            return
        src_t, dst_t = self.tiers[src_tier], self.tiers[dst_tier]
        if src_t.device.type == "cpu" and dst_t.device.type == "cpu":
            # a strided copy per run of consecutive blocks: 4x faster than a gather and a scatter through
            # a temporary (143 MB of KV, 194 scattered blocks: 14 against 60 ms)
            for src, dst, n in _runs(pairs):
                dst_t[:, :, dst:dst + n].copy_(src_t[:, :, src:src + n])
            return
        # through a device temporary and pinned staging: in chunks, so a large copy cannot run a full GPU out
        step = max(1, COPY_CHUNK_BYTES // self.block_bytes)
        for i in range(0, len(pairs), step):
            chunk = pairs[i:i + step]
            dst = torch.tensor([p[1] for p in chunk], device=dst_t.device)
            dst_t[:, :, dst] = gather_blocks(src_t, [p[0] for p in chunk], dst_t.device)

    def write_blocks(self, tier: str, blocks: list[int], data: torch.Tensor) -> None:
        """Store flat bytes across blocks, in order (the last one zero-padded)."""
        t = self.tiers[tier]
        padded = torch.zeros(len(blocks) * self.block_bytes, dtype=torch.uint8)
        padded[:data.numel()] = data
        view = padded.view(t.dtype).view(len(blocks), *t.shape[:2], *t.shape[3:]).movedim(0, 2)
        t[:, :, torch.tensor(blocks, device=t.device)] = view.to(t.device)

    def read_blocks(self, tier: str, blocks: list[int]) -> torch.Tensor:
        """The flat bytes `write_blocks` stored (padding included)."""
        t = self.tiers[tier]
        return t[:, :, torch.tensor(blocks, device=t.device)].movedim(2, 0).contiguous().view(-1).view(torch.uint8)


def _runs(pairs: list[tuple[int, int]]) -> list[tuple[int, int, int]]:
    """(src, dst, length) of each run of pairs that go on from the one before (both blocks + 1)."""
    runs: list[list[int]] = []
    for src, dst in pairs:
        if runs and runs[-1][0] + runs[-1][2] == src and runs[-1][1] + runs[-1][2] == dst:
            runs[-1][2] += 1
        else:
            runs.append([src, dst, 1])
    return [(s, d, n) for s, d, n in runs]
