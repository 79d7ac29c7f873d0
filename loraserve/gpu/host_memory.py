"""Host-tier memory and copies for a CUDA device tier.

Pinned memory: `Tensor.pin_memory()` goes through torch's caching host
allocator, which rounds each request up to a power of two (a 48 GiB host tier
would lock 64 GiB). A large, long-lived arena is instead an ordinary tensor
whose pages are registered with CUDA (cudaHostRegister): its size to the page,
still pinned for asynchronous DMA.

Copies between tiers run on the mover's stream, after the compute stream's
work at the time they were asked for (`CopyOrder`), and a device → host copy
lands in pinned staging and is waited for by its event before anyone reads
the bytes: `.to("cpu", non_blocking=True)` returns before they are there.
"""

from __future__ import annotations

import ctypes
import logging
import math
import mmap
import weakref

import torch

log = logging.getLogger(__name__)


def pinned_empty(shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    """An uninitialised host tensor of its size (to the page), page-locked for CUDA copies."""
    nbytes = math.prod(shape) * dtype.itemsize
    if not nbytes:
        return torch.empty(shape, dtype=dtype)
    page = mmap.PAGESIZE
    locked = -(-nbytes // page) * page
    raw = torch.empty(locked + page, dtype=torch.uint8)  # room to start on a page boundary
    start = -raw.data_ptr() % page
    t = raw[start:start + nbytes].view(dtype).view(shape)
    cudart = torch.cuda.cudart()
    err = cudart.cudaHostRegister(t.data_ptr(), locked, 0)
    if int(err) != 0:  # (a sandboxed driver may refuse): pinned all the same, at the allocator's rounding
        _clear_last_error()
        log.warning("cudaHostRegister of %d bytes failed (%s): pinning through torch's host allocator, "
                    "which rounds up to a power of two", locked, cudart.cudaGetErrorString(err))
        return torch.empty(shape, dtype=dtype).pin_memory()
    weakref.finalize(t, cudart.cudaHostUnregister, t.data_ptr())
    return t


def _clear_last_error() -> None:
    """Reset CUDA's last error after a refused registration, or torch's next
    kernel-launch check would report it as its own."""
    for name in ("libcudart.so.13", "libcudart.so.12", "libcudart.so.11.0", "libcudart.so"):
        try:
            ctypes.CDLL(name).cudaGetLastError()
            return
        except OSError:
            continue


def gather_blocks(tier: torch.Tensor, blocks: list[int], to: torch.device) -> torch.Tensor:
    """tier[:, :, blocks] (a tier is [layers, 2, block, ...]) on device `to`, its bytes there when this returns
    for a host destination, or ordered on the current stream for a device one."""
    src = tier.device
    index = torch.tensor(blocks, device=src)
    if src.type == "cuda" and to.type == "cpu":
        picked = tier.index_select(2, index)
        staging = torch.empty(picked.shape, dtype=picked.dtype, pin_memory=True)
        staging.copy_(picked, non_blocking=True)
        done = torch.cuda.Event()
        done.record()
        done.synchronize()  # this stream's copy only, not the device
        return staging
    if src.type == "cpu" and to.type == "cuda":
        staging = torch.empty((*tier.shape[:2], len(blocks), *tier.shape[3:]), dtype=tier.dtype, pin_memory=True)
        torch.index_select(tier, 2, index, out=staging)
        return staging.to(to, non_blocking=True)  # the host allocator keeps `staging` until the copy has run
    return tier.index_select(2, index).to(to)


class CopyOrder:
    """Orders a copy stream after the compute stream: `mark` where the copy is
    asked for (the engine thread, after the steps that wrote its blocks were
    launched), `wait` on the copy stream before copying."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.event = torch.cuda.Event()
        self.event.record(torch.cuda.current_stream(device))

    def wait(self, stream: torch.cuda.Stream) -> None:
        stream.wait_event(self.event)
