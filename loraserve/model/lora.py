"""What the model asks of LoRA: for each adapted projection, a delta added
into its output. Where the adapters live (stacked slots in this process, or a
LoRA server in another) is the backend's business, behind this interface.

The model calls `submit` with a projection's input before the base matmul and
`wait` after it, so a remote backend can overlap its round trip with the base
GEMM (the local backend computes in `wait`). For MoE experts the model also
hands over the routing: which token each row is and its expert, rows sorted by
expert (stable: a step's rows stay in their order inside an expert).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch

from loraserve.model.targets import Target


@dataclass
class Routing:
    """One MoE layer's (token, expert) pairs, top-k of each token, sorted by expert."""

    token: torch.Tensor
    """[T*K] the step row (token) each pair belongs to."""

    expert: torch.Tensor
    """[T*K] its expert, nondecreasing."""

    weight: torch.Tensor
    """[T*K] its routing weight (the model applies it after the delta is added)."""


class LoraBackend(Protocol):
    def submit(self, layer: int, target: Target, x: torch.Tensor, routing: Routing | None = None) -> object | None:
        """Start the delta of `x` (the projection's input rows; expert rows with
        their `routing`). None: no adapter of the step adapts this projection."""
        ...

    def wait(self, handle: object, out: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
        """Add the delta `submit` started into `out` (the base projection's output), in place.
        For an expert down projection a backend may instead return (token rows [U], deltas
        [U, out]) already combined over each token's experts with the routing weights (a LoRA
        server sends one row per token, not top-k): the model adds them after its own combine."""
        ...
