"""Runs a StepPlan on the PyTorch model: the real engine's mechanism."""

from __future__ import annotations

import time

import torch

from loraserve.engine.plan import StepPlan, StepResult
from loraserve.engine.sampler import sample
from loraserve.engine.tier_memory import TierMemory
from loraserve.gpu.segments import upload
from loraserve.lora.backend import LocalLoraBackend
from loraserve.model import cpu_kernels
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
        self.default_generator = torch.Generator(model.device).manual_seed(seed)
        """Unseeded rows draw from it; a seeded request has its own (`_generator`),
        on the model's device, where sampling runs."""
        self.generators: dict[str, torch.Generator] = {}
        if model.device.type == "cpu" and model.dtype in (torch.float32, torch.bfloat16):
            cpu_kernels.kernels()  # built (or found built) now, not in the first step

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
            ids_t, rows_t = self._inputs(ids, sample_rows, dev)
            logits = self.model.forward(ids_t, meta, self.memory.kv_cache, self.lora if self.lora.active else None,
                                        rows_t)
            if sampling:
                params = [q.sampling for q in sampling]
                gens = [self._generator(q.request_id, q.sampling.seed) for q in sampling]
                for q, tok in zip(sampling, sample(logits, params, gens)):
                    result.sampled[q.request_id] = tok
        result.elapsed = time.perf_counter() - start
        return result

    @staticmethod
    def _inputs(ids: list[int], sample_rows: list[int], dev: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """Token ids and sampled rows on the device: on a GPU in one asynchronous
        copy (a pageable copy would wait for the stream)."""
        if dev.type == "cuda":
            return tuple(upload([ids, sample_rows], dev))
        return torch.tensor(ids, device=dev), torch.tensor(sample_rows, dtype=torch.long, device=dev)

    def _generator(self, request_id: str, seed: int | None) -> torch.Generator:
        if seed is None:
            return self.default_generator
        if request_id not in self.generators:
            # torch takes a seed as 64 bits, wrapping negatives: the same wrap for any int never raises
            self.generators[request_id] = torch.Generator(self.model.device).manual_seed(seed & 0xFFFF_FFFF_FFFF_FFFF)
        return self.generators[request_id]

    def probe(self) -> None:
        """A tiny matmul on the model's device, waited for: a device in a sticky
        error state (as CUDA is after an illegal access) raises here."""
        x = torch.ones(2, 2, dtype=self.model.dtype, device=self.model.device)
        (x @ x).sum().item()

    def release(self, request_ids: list[str]) -> None:
        for rid in request_ids:
            self.generators.pop(rid, None)
