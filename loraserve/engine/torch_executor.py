"""Runs a StepPlan on the PyTorch model: the real engine's mechanism."""

from __future__ import annotations

import time

import torch

from loraserve.engine.plan import StepPlan, StepResult
from loraserve.engine.sampler import sample
from loraserve.engine.tier_memory import TierMemory
from loraserve.lora.backend import LocalLoraBackend
from loraserve.model.attention import build_metadata
from loraserve.model.transformer import Transformer


class TorchExecutor:
    """Lays a step's tokens out (in the order the LoRA backend wants), runs the
    model over the device tier's KV, and samples. Memory is the tiers'
    (`TierMemory`), adapters are the backend's: the executor owns neither."""

    def __init__(self, model: Transformer, memory: TierMemory, lora: LocalLoraBackend, seed: int) -> None:
        self.model = model
        self.memory = memory
        self.lora = lora
        self.default_generator = torch.Generator().manual_seed(seed)
        self.generators: dict[str, torch.Generator] = {}

    def execute(self, plan: StepPlan) -> StepResult:
        start = time.perf_counter()
        order = self.lora.begin([q.adapter for q in plan.seqs], [q.num_new_tokens for q in plan.seqs],
                                plan.lora_loads)
        if plan.is_empty:
            return StepResult(elapsed=time.perf_counter() - start)
        seqs = [plan.seqs[i] for i in order]
        ids, sample_rows = [], []
        for q in seqs:
            ids.extend(q.token_ids)
            if q.samples:
                sample_rows.append(len(ids) - 1)
        dev = self.model.device
        meta = build_metadata([(q.block_ids, q.start, q.num_new_tokens) for q in seqs],
                              self.memory.block_size, self.model.spec.sliding_window, dev)
        sampling = [q for q in seqs if q.samples]
        result = StepResult()
        with torch.inference_mode():
            logits = self.model.forward(torch.tensor(ids, device=dev), meta, self.memory.kv_cache,
                                        self.lora if self.lora.active else None,
                                        torch.tensor(sample_rows, dtype=torch.long, device=dev))
            if sampling:
                params = [q.sampling for q in sampling]
                gens = [self._generator(q.request_id, q.sampling.seed) for q in sampling]
                for q, tok in zip(sampling, sample(logits.cpu(), params, gens)):
                    result.sampled[q.request_id] = tok
        result.elapsed = time.perf_counter() - start
        return result

    def _generator(self, request_id: str, seed: int | None) -> torch.Generator:
        if seed is None:
            return self.default_generator
        if request_id not in self.generators:
            # torch takes a seed as 64 bits, wrapping negatives: the same wrap for any int never raises
            self.generators[request_id] = torch.Generator().manual_seed(seed & 0xFFFF_FFFF_FFFF_FFFF)
        return self.generators[request_id]

    def probe(self) -> None:
        """A tiny matmul on the model's device, waited for: a device in a sticky
        error state (as CUDA is after an illegal access) raises here."""
        x = torch.ones(2, 2, dtype=self.model.dtype, device=self.model.device)
        (x @ x).sum().item()

    def release(self, request_ids: list[str]) -> None:
        for rid in request_ids:
            self.generators.pop(rid, None)
