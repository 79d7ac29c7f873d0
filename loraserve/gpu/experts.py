"""The MoE experts' base matmul on the GPU path, without a host sync.

torch._grouped_mm (CUTLASS grouped GEMM) takes the group offsets on the device
as they are; it is used where it runs (bf16 on Hopper-class GPUs). Elsewhere
the Triton segmented matmul does the same over row tiles found on the
device (`segments.device_tiles`).
"""

from __future__ import annotations

import torch

from loraserve.gpu.lora_kernels import segment_mm
from loraserve.gpu.segments import device_tiles


def grouped_mm_supported(x: torch.Tensor, w: torch.Tensor) -> bool:
    if x.device.type != "cuda" or not hasattr(torch, "_grouped_mm") or x.dtype != torch.bfloat16:
        return False
    if w.dtype != x.dtype or torch.cuda.get_device_capability(x.device) < (9, 0):
        return False
    return all(t.data_ptr() % 16 == 0 and all(st == 1 or (st * t.element_size()) % 16 == 0 for st in t.stride())
               for t in (x, w))


def experts_mm(x: torch.Tensor, w: torch.Tensor, offs: torch.Tensor) -> torch.Tensor:
    """x: [T, K] rows sorted by expert; w: [E, K, N]; offs: [E] int32 cumulative
    row ends on the device. Returns [T, N], each row times its expert's w."""
    if grouped_mm_supported(x, w):
        return torch._grouped_mm(x, w, offs=offs)
    ends = offs.to(torch.int32)
    starts = torch.cat([ends.new_zeros(1), ends[:-1]])
    index = torch.arange(ends.numel(), dtype=torch.int32, device=x.device)
    return segment_mm(x, w, device_tiles(starts, ends, x.shape[0]), index)
