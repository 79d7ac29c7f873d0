"""One step's LoRA context: which rows belong to which slot.

The executor orders the step's tokens base-model first, then by LoRA slot, so
each slot's tokens are one contiguous segment and `add` is two segmented
matmuls per projection, whatever the number of adapters.
"""

from __future__ import annotations

import torch

from loraserve.lora.bank import LoraBank
from loraserve.lora.ops import lora_delta


class LoraBatch:
    def __init__(self, bank: LoraBank, slot_counts: list[int], num_base: int, token_slot: torch.Tensor) -> None:
        self.bank = bank
        self.num_slots = bank.num_slots
        self.num_base = num_base
        """Leading rows that use no adapter."""
        self.offs = torch.tensor(slot_counts, dtype=torch.int32, device=token_slot.device).cumsum(0, dtype=torch.int32)
        """[S] cumulative ends of each slot's segment, counted from row num_base."""
        self.token_slot = token_slot
        """[T] slot of each row; num_slots (the zero slot) for base-model rows."""
        self.any = num_base < token_slot.shape[0]

    def add(self, layer: int, target: str, x: torch.Tensor, out: torch.Tensor) -> None:
        """out[t] += x[t] @ A[slot(t)] @ B[slot(t)] for every adapter row t."""
        if self.any:
            n = self.num_base
            out[n:] += lora_delta(x[n:], self.bank.a[(layer, target)], self.bank.b[(layer, target)], self.offs)

    def add_experts(self, layer: int, target: str, x: torch.Tensor, out: torch.Tensor, keys: torch.Tensor) -> None:
        """Same for expert projections; rows sorted by keys = expert * (S + 1) + slot."""
        if self.any:
            groups = self.bank.spec.num_experts * (self.num_slots + 1)
            offs = torch.bincount(keys, minlength=groups).cumsum(0, dtype=torch.int32)
            out += lora_delta(x, self.bank.a[(layer, target)], self.bank.b[(layer, target)], offs)
