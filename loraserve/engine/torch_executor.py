"""Runs a StepPlan on the PyTorch model: the real engine's mechanism."""

from __future__ import annotations

import math
import time

import torch

from loraserve.engine.plan import StepPlan, StepResult
from loraserve.engine.sampler import sample
from loraserve.lora.adapter import LoraAdapter
from loraserve.lora.bank import LoraBank, lora_dtype
from loraserve.lora.batch import LoraBatch
from loraserve.lora.packing import unpack
from loraserve.model.attention import build_metadata
from loraserve.model.transformer import Transformer


class TorchExecutor:
    """Owns the tiers' arenas and the LoRA slots, and runs steps on the model.

    Each tier is one tensor of equal-size blocks, laid out for attention
    ([layers, K/V, block, token, head, dim]). A block holds either KV or a run
    of an adapter's packed rank slices (`lora/packing.py`): a block's bytes are
    its slice of every layer, so KV and adapter blocks are interchangeable and
    `copy_blocks` moves both.
    """

    def __init__(self, model: Transformer, num_blocks: int, block_size: int, num_slots: int,
                 adapters: dict[str, LoraAdapter], seed: int, num_host_blocks: int = 0) -> None:
        s = model.spec
        self.model = model
        self.block_size = block_size
        shape = (s.num_layers, 2, num_blocks, block_size, s.num_kv_heads, s.head_dim)
        self.tiers = {"device": torch.zeros(shape, dtype=model.dtype, device=model.device)}
        if num_host_blocks:
            host = torch.empty(shape[:2] + (num_host_blocks,) + shape[3:], dtype=model.dtype)
            self.tiers["host"] = host.pin_memory() if model.device.type == "cuda" else host
        self.block_bytes = math.prod(shape) // num_blocks * model.dtype.itemsize
        self.bank = LoraBank(s, num_slots, lora_dtype(model.dtype, model.device), model.device)
        self.adapters = adapters
        self.default_generator = torch.Generator().manual_seed(seed)
        self.generators: dict[str, torch.Generator] = {}

    def execute(self, plan: StepPlan) -> StepResult:
        start = time.perf_counter()
        for slot, adapter_id, blocks in plan.lora_loads:
            self.load_slot(slot, self.adapters[adapter_id], blocks)
        if plan.is_empty:
            return StepResult(elapsed=time.perf_counter() - start)
        num_slots = self.bank.num_slots
        seqs = sorted(plan.seqs, key=lambda q: -1 if q.lora_slot is None else q.lora_slot)
        ids, sample_rows, slot_counts, token_slot = [], [], [0] * num_slots, []
        for q in seqs:
            start_tok = q.request.num_computed_tokens
            ids.extend(q.request.token_slice(start_tok, start_tok + q.num_new_tokens))
            slot = num_slots if q.lora_slot is None else q.lora_slot
            token_slot.extend([slot] * q.num_new_tokens)
            if q.lora_slot is not None:
                slot_counts[q.lora_slot] += q.num_new_tokens
            if q.samples:
                sample_rows.append(len(ids) - 1)
        dev = self.model.device
        meta = build_metadata([(q.request.block_ids, q.request.num_computed_tokens, q.num_new_tokens) for q in seqs],
                              self.block_size, self.model.spec.sliding_window, dev)
        num_base = sum(q.num_new_tokens for q in seqs if q.lora_slot is None)
        lora = None
        if num_base < len(ids):
            lora = LoraBatch(self.bank, slot_counts, num_base, torch.tensor(token_slot, device=dev))
        sampling = [q for q in seqs if q.samples]
        result = StepResult()
        with torch.inference_mode():
            logits = self.model.forward(torch.tensor(ids, device=dev), meta, self.tiers["device"], lora,
                                        torch.tensor(sample_rows, dtype=torch.long, device=dev))
            if sampling:
                params = [q.request.sampling for q in sampling]
                gens = [self._generator(q.request.request_id, q.request.sampling.seed) for q in sampling]
                for q, tok in zip(sampling, sample(logits.cpu(), params, gens)):
                    result.sampled[q.request.request_id] = tok
        result.elapsed = time.perf_counter() - start
        return result

    def _generator(self, request_id: str, seed: int | None) -> torch.Generator:
        if seed is None:
            return self.default_generator
        if request_id not in self.generators:
            # torch takes a seed as 64 bits, wrapping negatives: the same wrap for any int never raises
            self.generators[request_id] = torch.Generator().manual_seed(seed & 0xFFFF_FFFF_FFFF_FFFF)
        return self.generators[request_id]

    def copy_blocks(self, src_tier: str, dst_tier: str, pairs: list[tuple[int, int]]) -> None:
        if not pairs:
            return
        src_t, dst_t = self.tiers[src_tier], self.tiers[dst_tier]
        src = torch.tensor([p[0] for p in pairs], device=src_t.device)
        dst = torch.tensor([p[1] for p in pairs], device=dst_t.device)
        dst_t[:, :, dst] = src_t[:, :, src].to(dst_t.device, non_blocking=True)

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

    def load_slot(self, slot: int, adapter: LoraAdapter, blocks: list[int]) -> None:
        """Fill a LoRA slot from the adapter's device blocks (a device-local copy)."""
        self.bank.load(slot, unpack(self.read_blocks("device", blocks), adapter, self.bank.dtype, self.bank.device))

    def release(self, request_ids: list[str]) -> None:
        for rid in request_ids:
            self.generators.pop(rid, None)
