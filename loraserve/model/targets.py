"""The projections a LoRA adapter can adapt, and their shapes: one vocabulary
for adapter parsing, the LoRA bank, the model, the simulator and (soon) the
wire to a LoRA server, so a target is spelled one way everywhere.

Targets follow the engine's fused projections: q|k|v is one matmul, so one
target; gate|up likewise. An adapter's LoRA on a fused target is laid out
compactly (`out_edges`): one shrink for all its slices, then each output slice
expanded from its own rank columns, so no zero block is stored or read. Plain
data: no torch, so the simulator and the policies can size LoRA work from it.
"""

from __future__ import annotations

import enum

from loraserve.model.spec import ModelSpec


class Target(enum.StrEnum):
    QKV = "qkv"
    O = "o"  # noqa: E741 (the projection's name)
    GATE_UP = "gate_up"
    DOWN = "down"
    SHARED_GATE_UP = "shared_gate_up"
    """Qwen2-MoE's shared expert."""
    SHARED_DOWN = "shared_down"
    EXPERTS_GATE_UP = "experts_gate_up"
    """Per-expert LoRA: weights carry an expert axis; rows are routed."""
    EXPERTS_DOWN = "experts_down"

    @property
    def is_expert(self) -> bool:
        return self in (Target.EXPERTS_GATE_UP, Target.EXPERTS_DOWN)

    @property
    def width(self) -> int:
        """Sub-projections fused into it (q|k|v: 3, gate|up: 2): its LoRA rank
        is this many adapter ranks stacked."""
        return 3 if self is Target.QKV else 2 if self.value.endswith("gate_up") else 1

    @property
    def group(self) -> str:
        """The fused projection without its shared_/experts_ prefix."""
        return self.value.split("_", 1)[1] if self.value.startswith(("shared_", "experts_")) else self.value


SUBMODULES = {
    Target.QKV: ("q_proj", "k_proj", "v_proj"),
    Target.O: ("o_proj",),
    Target.GATE_UP: ("gate_proj", "up_proj"),
    Target.DOWN: ("down_proj",),
}
"""PEFT module names of the sub-projections each dense target fuses."""

SUB_TO_TARGET = {sub: target for target, subs in SUBMODULES.items() for sub in subs}


def layer_targets(spec: ModelSpec, layer: int) -> list[Target]:
    """The targets a layer of this model has."""
    if not spec.is_moe_layer(layer):
        return [Target.QKV, Target.O, Target.GATE_UP, Target.DOWN]
    shared = [Target.SHARED_GATE_UP, Target.SHARED_DOWN] if spec.shared_expert_intermediate_size else []
    return [Target.QKV, Target.O, Target.EXPERTS_GATE_UP, Target.EXPERTS_DOWN, *shared]


def _intermediate(spec: ModelSpec, target: Target) -> int:
    if target.value.startswith("shared_"):
        return spec.shared_expert_intermediate_size
    return spec.moe_intermediate_size if target.is_expert else spec.intermediate_size


def in_dim(spec: ModelSpec, target: Target) -> int:
    """Input features of the (fused) projection."""
    if target is Target.O:
        return spec.q_size
    return _intermediate(spec, target) if target.group == "down" else spec.hidden_size


def out_dim(spec: ModelSpec, target: Target) -> int:
    """Output features of the (fused) projection."""
    if target is Target.QKV:
        return spec.q_size + 2 * spec.kv_size
    return 2 * _intermediate(spec, target) if target.group == "gate_up" else spec.hidden_size


def out_edges(spec: ModelSpec, target: Target) -> tuple[int, ...]:
    """Column edges of the fused output's slices (q, k, v; gate, up; or the one slice):
    `width` + 1 of them, from 0 to `out_dim`.

    The LoRA layout every part of the engine shares: at rank r, A is [in, width * r] and
    B is [r, out_dim]; slice j of the output is x @ A[:, j*r:(j+1)*r] @ B[:, edges[j]:edges[j+1]].
    (A block-diagonal B of [width * r, out_dim] would be the same delta with (width - 1) / width
    of it zeros.) Per-expert targets add a leading expert axis to both."""
    out = out_dim(spec, target)
    if target is Target.QKV:
        return 0, spec.q_size, spec.q_size + spec.kv_size, out
    return (0, out // 2, out) if target.width == 2 else (0, out)
