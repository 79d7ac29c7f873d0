"""Which part of every adapter each server rank holds (`--ep X --pp Y`).

Pipeline stages own contiguous layer ranges (stage s of Y: layers
[s*L//Y, (s+1)*L//Y)); inside a stage, expert parallelism deals each MoE
layer's experts out to the X ranks (expert e lives on EP rank e % X, as local
expert e // X). Dense targets of a stage's layers (attention, dense MLP,
shared expert) live on its EP rank 0, the stage's leader.

Sharding is a transform of the adapter, not a branch in the kernels: a rank's
store keeps `Shard.apply(adapter)` (only its (layer, target)s, expert weights
sliced to its experts), and its `LoraBank` is sized by `Shard.keys` and
`Shard.num_experts`. The batched kernel then runs unchanged on rows whose
expert ids are already local (`Layout.owners` says which rows go where).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch

from loraserve.lora.adapter import LoraAdapter
from loraserve.model.spec import ModelSpec
from loraserve.model.targets import Target, layer_targets


@dataclass(frozen=True)
class Shard:
    layers: range
    """Layers of this rank's pipeline stage."""

    ep_rank: int = 0
    ep: int = 1

    def holds(self, layer: int, target: Target) -> bool:
        """Whether this rank computes (layer, target): its stage's layers;
        dense targets only on the stage leader (EP rank 0)."""
        return layer in self.layers and (target.is_expert or self.ep_rank == 0)

    def keys(self, spec: ModelSpec) -> list[tuple[int, Target]]:
        """The (layer, target)s this rank's bank holds."""
        return [(layer, t) for layer in self.layers for t in layer_targets(spec, layer) if self.holds(layer, t)]

    def num_experts(self, spec: ModelSpec) -> int:
        """Experts of each MoE layer that live here (e ≡ ep_rank mod ep)."""
        return len(range(self.ep_rank, spec.num_experts, self.ep))

    def apply(self, adapter: LoraAdapter) -> LoraAdapter:
        """The part of `adapter` this rank keeps: owned (layer, target)s only,
        expert weights [E, ...] sliced to [E_local, ...] (local index e // ep).
        May be empty (an attention-only adapter on an EP rank > 0): its rows
        then get zero deltas from an all-zero slot."""
        weights = {}
        for key, (a, b) in adapter.weights.items():
            if self.holds(*key):
                if key[1].is_expert:
                    a, b = a[self.ep_rank::self.ep].contiguous(), b[self.ep_rank::self.ep].contiguous()
                weights[key] = (a, b)
        layout = tuple((key, tuple(a.shape), tuple(b.shape)) for key, (a, b) in weights.items())
        num_bytes = sum(a.numel() * a.element_size() + b.numel() * b.element_size() for a, b in weights.values())
        return dataclasses.replace(adapter, weights=weights, layout=layout, num_bytes=num_bytes)


@dataclass(frozen=True)
class Layout:
    """The server's ranks: `pp` stages of `ep` ranks each; rank = stage * ep + ep_rank."""

    ep: int
    pp: int
    num_layers: int

    @classmethod
    def of(cls, ep: int, pp: int, spec: ModelSpec) -> Layout:
        """The layout for a model; ValueError if the model cannot be split so."""
        if ep > 1 and ep > spec.num_experts:
            raise ValueError(f"--ep {ep} needs a MoE model with at least {ep} experts; this one has "
                             f"{spec.num_experts}")
        if pp > spec.num_layers:
            raise ValueError(f"--pp {pp} is more stages than the model's {spec.num_layers} layers")
        return cls(ep, pp, spec.num_layers)

    @property
    def world(self) -> int:
        return self.ep * self.pp

    def stage_layers(self, stage: int) -> range:
        return range(stage * self.num_layers // self.pp, (stage + 1) * self.num_layers // self.pp)

    def stage_of(self, layer: int) -> int:
        return next(s for s in range(self.pp) if layer in self.stage_layers(s))

    def shard(self, rank: int) -> Shard:
        stage, ep_rank = divmod(rank, self.ep)
        return Shard(self.stage_layers(stage), ep_rank, self.ep)

    def owners(self, layer: int, target: Target, expert: torch.Tensor | None
               ) -> list[tuple[int, torch.Tensor | None]]:
        """(rank, rows) for each rank that computes part of a (layer, target)
        batch: all rows (None) to the stage leader for dense targets; for
        expert targets, the rows whose expert lives on each EP rank."""
        first = self.stage_of(layer) * self.ep
        if not target.is_expert or self.ep == 1:
            return [(first, None)]
        owner = expert % self.ep
        out = []
        for ep_rank in range(self.ep):
            rows = (owner == ep_rank).nonzero().flatten()
            if len(rows):
                out.append((first + ep_rank, rows))
        return out

    def local_expert(self, expert: torch.Tensor) -> torch.Tensor:
        """Global expert ids as their owner's local ids."""
        return expert // self.ep
