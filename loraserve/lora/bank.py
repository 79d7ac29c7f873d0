"""Device-side LoRA slots: every resident adapter's weights, stacked.

For each (layer, target) the bank holds A [S, in, width × R] and B [S, R, out],
where S is the number of slots and R the bank's rank, in the layout of
`targets.out_edges` (width 3 for q|k|v, 2 for gate|up, else 1): slice j's rank
columns of A are [j R, j R + r) for an adapter of rank r, and B's rows [0, r).
`ranks` says each slot's r per target (0: the slot's adapter has none), so a
kernel reads only an adapter's own rank rows. Stacking lets one segmented
matmul serve every adapter of a step. Expert targets add an expert axis and
one always-zero group for base-model tokens, first in each expert:
A [E * (S + 1), in, width × R], group index =
expert * (S + 1) + (0 for the base model, else slot + 1). Base rows come first
in a step, so rows sorted by expert alone are sorted by group too.

The rank grows to the largest adapter loaded so far (the bank is reallocated
then), so a fleet of rank-16 adapters pays for rank 16, not max_lora_rank.
Expert targets (E times the size of the others) are allocated only once an
adapter with expert LoRA is loaded: attention-only adapters of an MoE model
pay nothing for them.

A bank may hold a shard (a LoRA server rank under expert or pipeline
parallelism): only the (layer, target)s in `keys`, and `num_experts` experts
per expert target.
"""

from __future__ import annotations

import torch

from loraserve.dtypes import native_bf16_cpu, torch_dtype
from loraserve.lora.adapter import LoraAdapter
from loraserve.model.spec import ModelSpec
from loraserve.model.targets import Target, in_dim, layer_targets, out_dim, out_edges

Key = tuple[int, Target]


def lora_dtype(model_dtype: torch.dtype, device: torch.device, requested: str = "auto") -> torch.dtype:
    """What adapter weights are stored in (in the bank, in the cache's blocks, in transit):
    `requested` (`--lora-dtype`), or with `auto` the model's, as vLLM stores them (PEFT
    upcasts bf16 adapters to fp32 by default); fp16 on a CPU is stored as fp32 (no CPU path
    computes from fp16). Another dtype than the model's is for CPUs: a bf16 copy of an fp32
    model's adapters halves the bytes a decode step reads and doubles the adapters a cache
    holds, at the cost of rounding their weights; on a GPU the LoRA kernels take the model's dtype."""
    if requested != "auto":
        chosen = torch_dtype(requested)
        if chosen != model_dtype and device.type != "cpu":
            model = str(model_dtype).removeprefix("torch.")
            raise ValueError(f"lora_dtype {requested} differs from the model's {model}: on {device.type} LoRA is "
                             f"stored in the model's dtype (use auto)")
        if chosen == torch.float16 and device.type == "cpu":
            raise ValueError("lora_dtype float16 is not supported on CPU: use float32 or bfloat16")
        return chosen
    return torch.float32 if device.type == "cpu" and model_dtype == torch.float16 else model_dtype


def compute_dtype(storage: torch.dtype, device: torch.device, model_dtype: torch.dtype) -> torch.dtype:
    """What torch's LoRA matmuls run in for weights stored in `storage` under a model computing in
    `model_dtype`: on a CPU fp32 unless both are bf16 and the CPU has bf16 dot products (an
    fp32 model's activations are not rounded for its adapters' sake, and small bf16 matmuls
    are slow where bf16 is emulated); on a GPU the storage dtype (the model's). (On a CPU the
    steps of few rows per adapter take the compiled kernel instead, which sums in fp32.)"""
    if device.type != "cpu":
        return storage
    native = storage == model_dtype == torch.bfloat16 and native_bf16_cpu()
    return torch.bfloat16 if native else torch.float32


class LoraBank:
    def __init__(self, spec: ModelSpec, num_slots: int, dtype: torch.dtype, device: torch.device,
                 keys: list[Key] | None = None, num_experts: int | None = None,
                 model_dtype: torch.dtype | None = None) -> None:
        """`dtype`: what the weights are stored in; `model_dtype`: what the model computes in
        (None: the same), which with it decides the LoRA math's dtype (`compute_dtype`)."""
        self.spec = spec
        self.keys = keys if keys is not None else [(layer, t) for layer in range(spec.num_layers)
                                                    for t in layer_targets(spec, layer)]
        self.edges = {key: list(out_edges(spec, key[1])) for key in self.keys}
        """Each key's output slice edges (`targets.out_edges`), looked up once."""
        self.num_experts = spec.num_experts if num_experts is None else num_experts
        self.num_slots = num_slots
        self.dtype = dtype
        """What the weights are stored in (`lora_dtype`)."""
        self.compute_dtype = compute_dtype(dtype, device, dtype if model_dtype is None else model_dtype)
        """What the deltas are computed in."""
        self.device = device
        self.rank = 0
        self.experts = False
        """Whether the expert targets are allocated (some adapter loaded so far has them)."""
        self.slots: list[LoraAdapter | None] = [None] * num_slots
        self.a: dict[Key, torch.Tensor] = {}
        self.b: dict[Key, torch.Tensor] = {}
        self.ranks: dict[Key, torch.Tensor] = {}
        """Per key, int32 [S] on the host: each slot's adapter rank for it (0: none)."""
        self._views: dict[Key, tuple[tuple, tuple]] = {}
        """Per key, `view`'s last answer and the range it was for, until the next write."""

    def _allocate(self, rank: int, experts: bool) -> None:
        """Swap in zeroed tensors of a larger rank (or with the expert targets),
        all built before any is replaced: an out-of-memory midway leaves the bank as it was."""
        s, e = self.spec, self.num_experts
        a, b = {}, {}
        for layer, target in self.keys:
            if target.is_expert and not experts:
                continue
            lead = (e * (self.num_slots + 1),) if target.is_expert else (self.num_slots,)
            kw = dict(dtype=self.dtype, device=self.device)
            a[(layer, target)] = torch.zeros(*lead, in_dim(s, target), target.width * rank, **kw)
            b[(layer, target)] = torch.zeros(*lead, rank, out_dim(s, target), **kw)
        self.a, self.b, self.rank, self.experts = a, b, rank, experts
        self.ranks = {key: torch.zeros(self.num_slots, dtype=torch.int32) for key in a}
        self._views.clear()

    def group_ranks(self, key: Key) -> torch.Tensor:
        """int32 on the host: each bank group's rank for `key`, as `a[key]` lays groups out
        (a slot each; for an expert key, expert * (S + 1) + slot + 1, 0 for the base model's)."""
        if not key[1].is_expert:
            return self.ranks[key]
        return torch.cat([self.ranks[key].new_zeros(1), self.ranks[key]]).repeat(self.num_experts)

    def view(self, key: Key, groups: slice) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, list[int]]:
        """(A, B, group ranks, slice edges) of `key` over a range of its groups. The last one of
        each key is kept until the bank is next written: a projection's LoRA runs after a large
        matmul has pushed the interpreter's own data out of the CPU's caches, so each Python
        step there costs several times its usual time, and a decode step asks for the same
        views as the step before."""
        span = (groups.start, groups.stop, groups.step)
        cached = self._views.get(key)
        if cached is None or cached[0] != span:
            cached = self._views[key] = (span, (self.a[key][groups], self.b[key][groups],
                                                self.group_ranks(key)[groups], self.edges[key]))
        return cached[1]

    @property
    def num_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for d in (self.a, self.b) for t in d.values())

    def load(self, slot: int, adapter: LoraAdapter, layers: range | None = None) -> None:
        """Copy an adapter's weights into a slot (host → device): all of them,
        or only those of `layers` (the LoRA server loads layer by layer)."""
        experts = self.experts or any(t.is_expert for _, t in adapter.weights)
        if adapter.rank > self.rank or experts != self.experts:
            resident = [(i, a) for i, a in enumerate(self.slots) if a is not None and i != slot]
            rank = max(self.rank, -(-adapter.rank // 4) * 4)  # multiple of 4: aligned rows for grouped matmuls
            self._allocate(rank, experts)
            for i, a in resident:
                self._write(i, a)
        self._write(slot, adapter, layers)

    def _write(self, slot: int, adapter: LoraAdapter, layers: range | None = None) -> None:
        stride, rank = self.num_slots + 1, self.rank
        self._views.clear()  # an expert key's group ranks are a copy
        for key, a_bank in self.a.items():
            if layers is not None and key[0] not in layers:
                continue
            # views of the slot: [in, W R] / [R, out], or [E, in, W R] / [E, R, out] for experts
            rows = slice(slot + 1, None, stride) if key[1].is_expert else slot
            a_slot, b_slot = a_bank[rows], self.b[key][rows]
            a_slot.zero_()
            b_slot.zero_()
            r = 0
            if key in adapter.weights:
                a, b = adapter.weights[key]
                r = b.shape[-2]
                for j in range(key[1].width):  # slice j's rank columns: [j r, (j+1) r) there, [j R, j R + r) here
                    a_slot[..., j * rank:j * rank + r].copy_(a[..., j * r:(j + 1) * r])
                b_slot[..., :r, :].copy_(b)
            self.ranks[key][slot] = r
        self.slots[slot] = adapter

    def clear(self, slot: int) -> None:
        self.slots[slot] = None
