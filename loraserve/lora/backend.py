"""LoRA computed in this process: the model's `LoraBackend` over stacked slots.

Resident adapters sit in the bank's slots (`lora/bank.py`); which adapter has
which slot is `LoraSlots`' business, and the scheduler sees only its budget of
distinct adapters. Each step, `begin` fills the slots of newly admitted
adapters from their device blocks, orders the step's sequences base model
first, then by slot (so each adapter's rows are one segment), and prepares
the step's `LoraBatch`; the model's `submit`/`wait` then add the deltas (this
backend computes at `wait`, right after the base matmul it could overlap).
"""

from __future__ import annotations

from typing import Callable, Sequence

import torch

from loraserve.gpu import active as triton_active
from loraserve.gpu.segments import upload
from loraserve.lora.adapter import LoraAdapter
from loraserve.lora.bank import LoraBank
from loraserve.lora.batch import LoraBatch
from loraserve.lora.packing import unpack
from loraserve.lora.slots import LoraSlots
from loraserve.model.lora import Routing
from loraserve.model.spec import ModelSpec
from loraserve.model.targets import Target


class LocalLoraBackend:
    def __init__(self, spec: ModelSpec, num_slots: int, dtype: torch.dtype, device: torch.device,
                 adapters: dict[str, LoraAdapter], read_blocks: Callable[[list[int]], torch.Tensor],
                 model_dtype: torch.dtype | None = None) -> None:
        """`dtype`: what adapter weights are stored in (`model_dtype`: what the model computes in;
        None: the same); `adapters`: id → metadata (layout) of every known adapter;
        `read_blocks`: the packed bytes of device blocks."""
        self.bank = LoraBank(spec, num_slots, dtype, device, model_dtype=model_dtype)
        self.slots = LoraSlots(num_slots)
        """The adapter budget the scheduler works with."""
        self.adapters = adapters
        self.read_blocks = read_blocks
        self.batch: LoraBatch | None = None
        """The current step's rows by slot (None: no adapter rows in it)."""
        self.units = None
        """The GPU path's per-slot rank tables (`lora/gpu_batch.py`), made on its first step."""

    def begin(self, adapters: Sequence[str | None], rows: Sequence[int],
              loads: Sequence[tuple[str, list[int]]]) -> list[int]:
        """Start a step whose sequence i has rows[i] rows under adapters[i]
        (None: the base model). `loads`: (adapter id, its device blocks) of the
        adapters admitted without a slot. Returns the order in which the step's
        sequences must lay out their rows."""
        for adapter_id, blocks in loads:
            weights = unpack(self.read_blocks(blocks), self.adapters[adapter_id], self.bank.dtype, self.bank.device)
            self.bank.load(self.slots.slot_of(adapter_id), weights)
        slot = [None if a is None else self.slots.slot_of(a) for a in adapters]
        order = sorted(range(len(adapters)), key=lambda i: -1 if slot[i] is None else slot[i])
        counts, groups = [0] * self.bank.num_slots, []
        for i in order:
            if slot[i] is not None:
                counts[slot[i]] += rows[i]
            groups.extend([0 if slot[i] is None else slot[i] + 1] * rows[i])
        num_base = sum(rows[i] for i in order if slot[i] is None)
        self.batch = None
        if num_base < len(groups) and triton_active(self.bank.device):
            from loraserve.lora.gpu_batch import GpuLoraBatch, UnitTables
            self.units = self.units or UnitTables(self.bank)
            self.batch = GpuLoraBatch(self.bank, self.units, counts, num_base, upload([groups], self.bank.device)[0])
        elif num_base < len(groups):
            self.batch = LoraBatch(self.bank, counts, num_base, torch.tensor(groups, device=self.bank.device))
        return order

    @property
    def active(self) -> bool:
        """Whether the current step has adapter rows at all."""
        return self.batch is not None

    def submit(self, layer: int, target: Target, x: torch.Tensor, routing: Routing | None = None):
        if self.batch is None or (layer, target) not in self.batch.targets:
            return None
        return layer, target, x, routing

    def wait(self, handle, out: torch.Tensor) -> None:
        layer, target, x, routing = handle
        if routing is None:
            self.batch.add(layer, target, x, out)
        else:
            self.batch.add_experts(layer, target, x, out, routing)

    def forget(self, adapter_id: str) -> None:
        """Drop an adapter from its slot unless running requests pin it: it was
        unloaded, or a load that raised may have left its slot half written."""
        slot = self.slots.slot_of(adapter_id)
        if slot is not None and not self.slots.pinned(adapter_id):
            self.slots.evict(adapter_id)
            self.bank.clear(slot)
