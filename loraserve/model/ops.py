"""The elementwise steps between a layer's matmuls, one call each.

The residual add with the RMSNorm after it, RoPE, and SiLU(gate) * up. On
CPU (float32 or bfloat16) each is one pass of a compiled kernel
(`cpu_kernels.py`); elsewhere (GPUs, fp16, no compiler) torch's ops, which
are the reference: the kernels round as they do, up to the order of a sum.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from loraserve.model import cpu_kernels


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    if x.dtype == torch.float32:  # one fused kernel, same arithmetic as below
        return F.rms_norm(x, weight.shape, weight, eps)
    # as HF: normalize in fp32, round, then scale
    return weight * F.rms_norm(x.float(), weight.shape, None, eps).to(x.dtype)


def add_rms_norm(x: torch.Tensor, delta: torch.Tensor | None, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """x += delta in place (the residual stream; skipped when delta is None), then rms_norm(x).
    x: [T, H]."""
    if (cpu_kernels.fused_available(x) and x.is_contiguous() and weight.dtype == x.dtype
            and (delta is None or delta.dtype == x.dtype)):
        return cpu_kernels.kernels().add_rms_norm(x, delta, weight, eps)
    if delta is not None:
        x.add_(delta)
    return rms_norm(x, weight, eps)


def rope_(qk: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotary embedding in place, HF's rotate-half convention, computed in fp32.
    qk: [T, heads, D] (a view into the step's q|k|v is fine); cos, sin: [T, D/2]."""
    if cpu_kernels.fused_available(qk) and qk.stride(2) == 1:
        cpu_kernels.kernels().rope_(qk, cos, sin)
        return qk
    x1, x2 = qk.float().chunk(2, dim=-1)
    c, s = cos[:, None, :], sin[:, None, :]
    return qk.copy_(torch.cat((x1 * c - x2 * s, x2 * c + x1 * s), dim=-1))


def silu_mul(gate_up: torch.Tensor) -> torch.Tensor:
    """gate_up: [T, 2I], gate then up. Returns silu(gate) * up, [T, I]."""
    if cpu_kernels.fused_available(gate_up) and gate_up.is_contiguous():
        return cpu_kernels.kernels().silu_mul(gate_up)
    gate, up = gate_up.chunk(2, dim=-1)
    return F.silu(gate) * up
