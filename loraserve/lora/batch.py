"""One step's LoRA context: which rows belong to which slot.

The executor orders the step's tokens base-model first, then by LoRA slot, so
each slot's tokens are one contiguous segment. Two ways to apply the deltas,
picked once per step:

- segmented: two segmented matmuls per projection over the slots' segments
  (any segment sizes; what prefill-heavy steps use);
- padded: every slot's segment padded to the longest one, then two batched
  matmuls over the slots. On CPU this is 2-4x faster for decode-heavy steps
  (few tokens per adapter). Chosen where it wins (a microbenchmark of both at
  SmolLM2's shapes on AVX2 and AVX-512 CPUs): segments all of one length up
  to 128 rows (the expand adds into the output in place), or ragged ones of at
  most 8 rows whose padding at most doubles them. Ragged longer segments (a
  prefill beside a prefix-cache hit) pay for the padded copies in and out:
  3-9x slower than the segmented path at 16 + 512-row segments.

On a CPU, steps of few rows per adapter (decode, and prefills up to
`COMPILED_MAX_ROWS` rows an adapter) take neither: the compiled kernel
(`model/cpu_lora.py`) does a projection's whole update in one call, reading
each adapter's weights once (bf16 ones widened as they are read) and only its
own rank, summing in fp32 over fp32 or bf16 rows. On a CPU with native bf16 a
bf16 model's LoRA once ran as torch's bf16 matmuls: at a batch of 32 decodes
over 8 adapters that was 38 of a step's 180 ms, and about half of a batch-1
step (each projection two to four calls, padding and conversions). The torch
paths widen bf16 weights to the compute dtype first (a copy of the step's
slots: small beside a prefill's matmuls).

Either way only the slots from the first to the last one with rows take part
(a view of the bank, no copy), and only the projections one of their adapters
targets: decode is bound by reading adapter weights, and a step whose four
adapters sit in slots 0-3 of eight reads four adapters' weights, not eight.
"""

from __future__ import annotations

import torch

from loraserve.dtypes import cpu_class
from loraserve.kernels import lora_delta, padded_lora_delta
from loraserve.lora.bank import Key, LoraBank
from loraserve.model import cpu_kernels
from loraserve.model.lora import Routing
from loraserve.model.targets import Target

MAX_PADDING = 2.0
"""Ragged segments take the padded path while slots x longest segment <= this x adapter rows ..."""

MAX_RAGGED_PAD = 8
"""... and the longest segment has at most this many rows."""

MAX_EVEN_PAD = 128
"""Segments all of one length take the padded path up to this length."""

COMPILED_MAX_ROWS = 1024 if cpu_class() == "avx512" else 512
"""Segments of at most this many rows take the compiled kernel (CPU, sums in float32): it reads an
adapter's weights once per 4 rows, or 8 of a long segment on AVX-512. There, on SmolLM2's shapes, it
is the fastest path at every size measured, 1 to 1024 rows per adapter: 202 against 232 ms (padded)
and 280 (segmented) at 512 rows each (a 4096-token prefill over 8 adapters), 446 against 500 and
526 at 1024; longer segments, unmeasured, take torch's (`benchmarks/lora_paths.py`). With 4-row
tiles only (as AVX2 builds run; measured on AVX-512 before the 8-row ones) it was level with
torch's at 512 and 9% slower at 1024."""


def compiled(bank: LoraBank, rows: int | torch.Tensor) -> bool:
    """Whether a delta over segments of at most `rows` rows (or of `rows[g]` rows each, a
    tensor read only on the CPU: no sync on a device) takes the compiled CPU kernel."""
    if bank.device.type != "cpu" or cpu_kernels.kernels() is None:
        return False
    return int(rows.max()) <= COMPILED_MAX_ROWS if isinstance(rows, torch.Tensor) else rows <= COMPILED_MAX_ROWS


def segmented_delta(bank: LoraBank, key: Key, x: torch.Tensor, out: torch.Tensor, offs: torch.Tensor,
                    use_compiled: bool, slots: slice = slice(None)) -> None:
    """out += each row's LoRA update, in place: rows sorted by bank group (slot, or expert *
    (S + 1) + slot + 1 for an expert key), `offs` their cumulative ends, over the bank's
    groups (or its `slots` only). The compiled kernel if `use_compiled` (see `compiled`),
    else torch's segmented matmuls."""
    a, b, ranks, edges = bank.view(key, slots)
    if not use_compiled:
        a, b = a.to(bank.compute_dtype), b.to(bank.compute_dtype)  # bf16 weights widen where bf16 is emulated
        lora_delta(x.to(a.dtype), a, b, offs, out=out, edges=edges)
        return
    # the kernel computes in fp32 (from fp32 or bf16 weights) and takes fp32 or bf16 rows; fp16 ones (an fp16
    # model on a CPU) add through an fp32 temporary
    if x.dtype == out.dtype and out.dtype in (torch.float32, torch.bfloat16):
        cpu_kernels.kernels().lora_segments(x, a, b, offs, ranks, edges, out)
        return
    y = torch.zeros(out.shape, dtype=torch.float32)
    cpu_kernels.kernels().lora_segments(x.float(), a, b, offs, ranks, edges, y)
    out.add_(y.to(out.dtype))


class LoraBatch:
    def __init__(self, bank: LoraBank, slot_counts: list[int], num_base: int, token_group: torch.Tensor) -> None:
        self.bank = bank
        self.num_slots = bank.num_slots
        self.num_base = num_base
        """Leading rows that use no adapter."""
        self.token_group = token_group
        """[T] each row's group in an expert's bank rows: 0 for the base model, slot + 1 else."""
        self._routed: tuple[Routing, torch.Tensor, bool] | None = None
        """The last routing seen, its group offsets and whether they take the compiled kernel (see _group_offsets)."""
        num_rows = sum(slot_counts)
        device = token_group.device
        live = [s for s, c in enumerate(slot_counts) if c]
        self.slots = slice(live[0], live[-1] + 1) if live else slice(0, 0)
        """The slots that take part: the first to the last one with rows."""
        counts = slot_counts[self.slots]
        self.targets: set[tuple[int, Target]] = set().union(
            *(bank.slots[i].weights.keys() for i in live if bank.slots[i] is not None))
        """(layer, target) pairs that some adapter of the step has: the others would add
        zeros (the bank holds every target for every slot), so they are skipped; an
        attention-only adapter then costs nothing in the MLP or the experts."""
        self.offs = torch.tensor(counts, dtype=torch.int32, device=device).cumsum(0, dtype=torch.int32)
        """[S'] cumulative ends of each taking-part slot's segment, counted from row num_base."""
        self.pad = max(counts, default=0)
        ragged = any(c != self.pad for c in counts)
        self.padded = num_rows > 0 and (self.pad <= MAX_RAGGED_PAD and len(counts) * self.pad <= MAX_PADDING * num_rows
                                        if ragged else self.pad <= MAX_EVEN_PAD)
        self.compiled = compiled(bank, self.pad)
        """Whether the step's deltas take the compiled CPU kernel (few rows per adapter)."""
        self.pad_index: torch.Tensor | None = None
        """Where each adapter row sits in the [S' * pad] padded layout (None: rows already fill it)."""
        if self.padded and ragged:
            idx = [s * self.pad + i for s, c in enumerate(counts) for i in range(c)]
            self.pad_index = torch.tensor(idx, dtype=torch.long, device=device)

    def add(self, layer: int, target: Target, x: torch.Tensor, out: torch.Tensor) -> None:
        """out[t] += x[t] @ A[slot(t)] @ B[slot(t)] for every adapter row t."""
        key = (layer, target)
        if key not in self.targets:
            return
        if n := self.num_base:
            x, out = x[n:], out[n:]
        if self.padded and not self.compiled:
            a, b, _, edges = self.bank.view(key, self.slots)
            a, b = a.to(self.bank.compute_dtype), b.to(self.bank.compute_dtype)
            padded_lora_delta(x.to(a.dtype), a, b, self.pad, self.pad_index, out=out, edges=edges)
        else:
            segmented_delta(self.bank, key, x, out, self.offs, self.compiled, self.slots)

    def add_experts(self, layer: int, target: Target, x: torch.Tensor, out: torch.Tensor, routing: Routing) -> None:
        """Same for expert projections: rows sorted by expert, so by group
        (expert * (S + 1) + token group) too, since a step's rows come base
        model first, then by slot."""
        if (layer, target) in self.targets:
            offs, use_compiled = self._group_offsets(routing)
            segmented_delta(self.bank, (layer, target), x, out, offs, use_compiled)

    def _group_offsets(self, routing: Routing) -> tuple[torch.Tensor, bool]:
        """Cumulative row ends of every (expert, group), and whether they take the compiled
        kernel: once per layer's routing, which its gate|up and down projections share."""
        if self._routed is None or self._routed[0] is not routing:
            groups = self.bank.spec.num_experts * (self.num_slots + 1)
            keys = routing.expert * (self.num_slots + 1) + self.token_group[routing.token]
            counts = torch.bincount(keys, minlength=groups)
            self._routed = routing, counts.cumsum(0, dtype=torch.int32), compiled(self.bank, counts)
        return self._routed[1], self._routed[2]
