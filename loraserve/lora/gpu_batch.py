"""One step's LoRA context on the GPU path: `LoraBatch`'s interface over the
Triton segmented kernels (`gpu/lora_kernels.py`).

Differences from the CPU path, for a device: the step's segment bounds go up
in one asynchronous copy, routed (expert) rows find their groups with
`searchsorted` on the device, so no LoRA call waits for the host; and each
adapter is multiplied at its own rank (`LoraBank.ranks`), not by the zeros
the bank pads to the largest rank: the shrink stops after the last slice's r
columns, and each slice's expand reads only B's first r rows (`UnitTables`).
"""

from __future__ import annotations

import torch

from loraserve.gpu.lora_kernels import expand_add, segment_mm
from loraserve.gpu.segments import Tiles, device_tiles, group_bounds, host_tiles, upload
from loraserve.lora.bank import Key, LoraBank
from loraserve.model.lora import Routing
from loraserve.model.targets import Target


class UnitTables:
    """Per bank key, an int32 table [rows, 2 * width + 1] on the device: each slot's
    (lo, hi) rank rows of B per output slice, (0, r) at its adapter's rank r, then the
    shrink's columns ((width - 1) * R + r: the last slice's r columns start at its
    (width - 1) * R). Dense keys: row = slot; expert keys: row = slot + 1, row 0 (the base
    model's group) all zeros. Rebuilt when a slot's adapter or the bank's rank changes."""

    def __init__(self, bank: LoraBank) -> None:
        self.bank = bank
        self.seen: list[object | None] = [None] * bank.num_slots
        self.rank = bank.rank
        self.tables: dict[Key, torch.Tensor] = {}
        """Made for a key when a first adapter has it (the bank too allocates some keys lazily)."""
        self.group_index = torch.arange(bank.num_experts * (bank.num_slots + 1), dtype=torch.int32,
                                        device=bank.device)
        """Expert groups index the bank's rows one to one."""

    def refresh(self) -> None:
        if self.bank.rank != self.rank:
            self.seen, self.rank = [None] * self.bank.num_slots, self.bank.rank
        for slot, adapter in enumerate(self.bank.slots):
            if adapter is not self.seen[slot]:
                for key in set(self.tables) | set(adapter.weights if adapter is not None else ()):
                    if key not in self.tables:
                        self.tables[key] = torch.zeros(self.bank.num_slots + key[1].is_expert, 2 * key[1].width + 1,
                                                       dtype=torch.int32, device=self.bank.device)
                    r = int(self.bank.ranks[key][slot]) if adapter is not None and key in adapter.weights else 0
                    width = key[1].width
                    row = [0, r] * width + [(width - 1) * self.bank.rank + r if r else 0]
                    self.tables[key][slot + key[1].is_expert] = torch.tensor(row, dtype=torch.int32)
                self.seen[slot] = adapter


class GpuLoraBatch:
    def __init__(self, bank: LoraBank, units: UnitTables, slot_counts: list[int], num_base: int,
                 token_group: torch.Tensor) -> None:
        units.refresh()
        self.bank, self.units = bank, units
        self.num_base = num_base
        self.token_group = token_group
        live = [s for s, c in enumerate(slot_counts) if c]
        self.targets: set[tuple[int, Target]] = set().union(
            *(bank.slots[i].weights.keys() for i in live if bank.slots[i] is not None))
        group, first, ends = host_tiles([slot_counts[s] for s in live])
        group_t, first_t, ends_t, self.index = upload([group, first, ends, live], bank.device)
        self.tiles = Tiles(group_t, first_t, ends_t)
        """Row tiles of the adapter rows (counted from row num_base), by taking-part slot."""
        self._routed: tuple[Routing, Tiles] | None = None

    def add(self, layer: int, target: Target, x: torch.Tensor, out: torch.Tensor) -> None:
        """out[t] += x[t] @ A[slot(t)] @ B[slot(t)] for every adapter row t."""
        key = (layer, target)
        if key not in self.targets:
            return
        n, table = self.num_base, self.units.tables[key]
        a, b = self.bank.a[key], self.bank.b[key]
        x = x[n:].to(a.dtype)
        shrunk = x.new_empty(x.shape[0], a.shape[-1])
        s = self.bank.num_slots
        segment_mm(x, a, self.tiles, self.index, (table[:, -1], s), out=shrunk)
        expand_add(shrunk, b, out[n:], self.tiles, self.index, table, s, self.bank.edges[key][1:-1],
                   self.bank.rank)

    def add_experts(self, layer: int, target: Target, x: torch.Tensor, out: torch.Tensor, routing: Routing) -> None:
        """Expert rows, sorted by expert and so by group (expert * (S + 1) + token group)."""
        key = (layer, target)
        if key not in self.targets:
            return
        tiles = self._group_tiles(routing, x.shape[0])
        table, groups = self.units.tables[key], self.bank.num_slots + 1
        a, b = self.bank.a[key], self.bank.b[key]
        x = x.to(a.dtype)
        shrunk = x.new_empty(x.shape[0], a.shape[-1])
        index = self.units.group_index
        segment_mm(x, a, tiles, index, (table[:, -1], groups), out=shrunk)
        expand_add(shrunk, b, out, tiles, index, table, groups, self.bank.edges[key][1:-1], self.bank.rank)

    def _group_tiles(self, routing: Routing, num_rows: int) -> Tiles:
        """Each (expert, group)'s row tiles: once per layer's routing, shared by gate|up and down."""
        if self._routed is None or self._routed[0] is not routing:
            groups = self.bank.num_slots + 1
            keys = routing.expert.to(torch.int32) * groups + self.token_group[routing.token]
            self._routed = routing, device_tiles(*group_bounds(keys, self.bank.num_experts * groups), num_rows)
        return self._routed[1]
