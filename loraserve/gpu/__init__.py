"""The GPU path's kernels: our own Triton kernels for paged attention and LoRA,
each next to the plain torch computation it must equal (`reference_*`).

Nothing here imports triton at import time: the CPU path never loads it, and a
CUDA machine without triton falls back to the CPU path's kernels. `active`
decides, per device, which path a step takes; `LORASERVE_KERNELS=triton`
forces the Triton path on a CPU too, which with `TRITON_INTERPRET=1` is how
the tests check these kernels (and the model through them) without a GPU.
"""

from __future__ import annotations

import functools
import importlib.util
import os

import torch


@functools.cache
def triton_installed() -> bool:
    return importlib.util.find_spec("triton") is not None


FORCE: bool | None = {"triton": True, "torch": False}.get(os.environ.get("LORASERVE_KERNELS", ""))
"""`LORASERVE_KERNELS=triton|torch` at start (tests set this attribute): the
Triton path on any device, or the torch kernels even on a GPU."""


def active(device: torch.device) -> bool:
    """Whether a step on `device` runs the Triton kernels (called per matmul: kept cheap)."""
    if FORCE is not None:
        return FORCE
    return device.type == "cuda" and triton_installed()
