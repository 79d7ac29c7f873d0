"""One batched LoRA delta over rows from any number of instances.

Rows arrive in whatever order their messages had; each carries its adapter's
slot (and, for expert projections, its expert). Sorting by group (slot, or
expert × (slots + 1) + slot + 1, the bank's expert layout) makes every group
one segment, so one segmented delta (`lora.batch.segmented_delta`) serves
every adapter and expert of the batch, as in the coupled engine.

`store_delta` is the same kernel behind the store's slots: what a server
(or one rank of a parallel server) runs for a batch of rows.
"""

from __future__ import annotations

import torch

from loraserve.kernels import fused_delta
from loraserve.lora.bank import LoraBank
from loraserve.lora.batch import compiled, segmented_delta
from loraserve.lora_server.store import AdapterStore
from loraserve.model.targets import Target, out_dim


def batched_delta(bank: LoraBank, layer: int, target: Target, x: torch.Tensor, slot: torch.Tensor,
                  expert: torch.Tensor | None = None) -> torch.Tensor:
    """x: [N, in]; slot: [N] each row's slot; expert: [N] its expert (expert
    targets). Returns the [N, out] deltas in x's row order, in the bank's dtype."""
    if (layer, target) not in bank.a:  # expert targets before any adapter has them (see LoraBank)
        return x.new_zeros(x.shape[0], out_dim(bank.spec, target), dtype=bank.dtype)
    if expert is None:
        group, groups = slot, bank.num_slots
    else:
        group, groups = expert * (bank.num_slots + 1) + slot + 1, bank.a[(layer, target)].shape[0]
    order = torch.argsort(group, stable=True)
    counts = torch.bincount(group, minlength=groups)
    y = x.new_zeros(x.shape[0], out_dim(bank.spec, target), dtype=bank.dtype)
    segmented_delta(bank, (layer, target), x[order], y, counts.cumsum(0, dtype=torch.int32), compiled(bank, counts))
    out = torch.empty_like(y)
    out[order] = y
    return out


def store_delta(store: AdapterStore, layer: int, target: Target, x: torch.Tensor, adapters: list[str],
                row_adapter: torch.Tensor, expert: torch.Tensor | None = None) -> torch.Tensor | None:
    """The deltas of rows under `adapters` (row_adapter: [N] each row's index
    into it) with the store's slots; None if some adapter's weights for this
    layer are not in a slot yet (the rows wait). ProtocolError for an unknown
    adapter."""
    slots: list[int] = []
    try:
        for a in adapters:
            slot = store.acquire(a, layer)
            if slot is None:
                return None
            slots.append(slot)
        dev, bank = store.bank.device, store.bank
        if expert is None and len(slots) == 1:  # one adapter (a lone instance's decode): its plain products
            a, b = bank.a[(layer, target)][slots[0]], bank.b[(layer, target)][slots[0]]
            cd = bank.compute_dtype  # bf16 weights widen where bf16 is emulated
            return fused_delta(x.to(dev, cd), a.to(cd), b.to(cd), bank.edges[(layer, target)]).to(bank.dtype)
        slot = torch.tensor(slots)[row_adapter]
        return batched_delta(store.bank, layer, target, x.to(dev, store.bank.dtype), slot.to(dev),
                             None if expert is None else expert.to(dev))
    finally:
        for a in adapters[:len(slots)]:
            store.release(a)
