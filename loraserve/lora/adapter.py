"""PEFT LoRA adapters: read, validate, and lay out for the engine.

An adapter is identified by a content hash of its weights and config, never by
its name: two names for the same bytes are one adapter, and a reloaded adapter
with new weights is a new one (so KV computed under the old one can never be
reused for it).

Layout. The engine fuses projections that share an input (q|k|v, gate|up), so
an adapter's per-module A and B are fused the same way (`targets.out_edges`):
at the target's rank r (the largest of its modules), A [in, width * r] holds
each slice's A side by side, and B [r, out] each slice's B in that slice's
output columns. One shrink then serves the fused projection, and each slice's
expand reads only its own B: none of the zeros a block-diagonal B would hold
(two thirds of a q|k|v B). The scaling (alpha / r, or alpha / sqrt(r) for
rsLoRA) is folded into B. Untargeted sub-projections and a module's rank rows
below r stay zero.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import torch

from loraserve.lora.files import AdapterError, read_adapter_files
from loraserve.model.spec import ModelSpec
from loraserve.model.targets import SUB_TO_TARGET, SUBMODULES, Target, in_dim, out_dim, out_edges


MIXTRAL_EXPERT = {"w1": "gate_proj", "w3": "up_proj", "w2": "down_proj"}
SUPPORTED_TARGETS = set(SUB_TO_TARGET) | set(MIXTRAL_EXPERT)

_KEY = re.compile(r"layers\.(\d+)\.(.+)\.lora_([AB])(?:\.[^.]+)?\.weight$")
_EXPERT = re.compile(r"experts\.(\d+)\.(\w+)$")


@dataclass
class LoraAdapter:
    id: str
    """Content hash (hex) of weights and config."""
    name: str
    path: str
    rank: int
    """Largest rank of any module."""
    alpha: float
    use_rslora: bool
    target_modules: tuple[str, ...]
    weights: dict[tuple[int, Target], tuple[torch.Tensor, torch.Tensor]] = field(repr=False, default_factory=dict)
    """(layer, target) → (A, B), fused as the engine's projections are (`targets.out_edges`).
    Dense targets (qkv, o, gate_up, down, shared_gate_up, shared_down): A [in, W * r],
    B [r, out]. Expert targets (experts_gate_up, experts_down): A [E, in, W * r],
    B [E, r, out]. W is the target's width, r the largest rank of its modules;
    scaling is in B."""

    layout: tuple[tuple[tuple[int, str], tuple[int, ...], tuple[int, ...]], ...] = ()
    """((layer, target), A shape, B shape) per projection: enough to rebuild the
    weights from their packed bytes once `weights` has been let go."""

    num_bytes: int = 0
    """Bytes of the weights (packed, as stored in cache blocks)."""


def content_hash(path: Path) -> str:
    return read_adapter_files(Path(path)).id


@dataclass
class _Unit:
    """One LoRA (A, B) pair covering rows [offset, offset + B rows) of a fused output."""
    a: torch.Tensor  # [r, in] or [E, r, in]
    b: torch.Tensor  # [out, r] or [E, out, r]
    offset: int
    module: str


def load_adapter(path: str | Path, spec: ModelSpec, max_rank: int, name: str | None = None,
                 dtype: torch.dtype = torch.float32, within: Sequence[Path] = ()) -> LoraAdapter:
    """`within`: resolved directories the adapter's files must lie in (a runtime
    load's --lora-dir; none for the operator's own paths)."""
    path = Path(path)
    try:
        files = read_adapter_files(path, within)
    except OSError as e:
        raise AdapterError(f"adapter {path}: unreadable ({e})") from e
    config = files.config
    raw = {k: t.float() for k, t in files.tensors.items()}
    _check_config(path, config)
    alpha = float(config.get("lora_alpha", config.get("r", 8)))
    rslora = bool(config.get("use_rslora", False))
    units = _units(path, spec, raw, config)
    adapter = LoraAdapter(
        id=files.id, name=name or path.name, path=str(path), rank=0, alpha=alpha,
        use_rslora=rslora, target_modules=tuple(sorted({u.module.split(".")[-1] for us in units.values() for u in us})),
    )
    for (layer, target), us in sorted(units.items()):
        for u in us:
            r = u.a.shape[-2]
            where = f"layer {layer} {u.module}"
            if r > max_rank:
                raise AdapterError(f"adapter {path}: rank {r} of {where} exceeds max_lora_rank {max_rank}")
            if not (torch.isfinite(u.a).all() and torch.isfinite(u.b).all()):
                raise AdapterError(f"adapter {path}: NaN or Inf in the weights of {where}")
            mod_alpha = _pattern_value(config.get("alpha_pattern") or {}, u.module, alpha)
            u.b = u.b * (mod_alpha / (math.sqrt(r) if rslora else r))
            adapter.rank = max(adapter.rank, r)
        adapter.weights[(layer, target)] = _fuse(path, layer, us, out_edges(spec, target), dtype)
    if not adapter.weights:
        raise AdapterError(f"adapter {path}: no LoRA weights found")
    adapter.layout = tuple((key, tuple(a.shape), tuple(b.shape)) for key, (a, b) in adapter.weights.items())
    adapter.num_bytes = sum(a.numel() * a.element_size() + b.numel() * b.element_size()
                            for a, b in adapter.weights.values())
    return adapter


def _check_config(path: Path, config: dict) -> None:
    if config.get("peft_type", "LORA") != "LORA":
        raise AdapterError(f"adapter {path}: peft_type {config.get('peft_type')!r} is not LORA")
    for flag, why in (("use_dora", "DoRA"), ("fan_in_fan_out", "fan_in_fan_out layers")):
        if config.get(flag):
            raise AdapterError(f"adapter {path}: {why} is not supported")
    if config.get("bias", "none") != "none" or config.get("lora_bias"):
        raise AdapterError(f"adapter {path}: LoRA bias terms are not supported")
    if config.get("modules_to_save"):
        raise AdapterError(f"adapter {path}: modules_to_save {config['modules_to_save']} is not supported")
    targets = config.get("target_modules") or []
    if isinstance(targets, list):
        unknown = sorted(set(targets) - SUPPORTED_TARGETS)
        if unknown:
            raise AdapterError(f"adapter {path}: unknown target modules {unknown}; "
                               f"supported: {sorted(SUPPORTED_TARGETS)}")


def _units(path: Path, spec: ModelSpec, raw: dict[str, torch.Tensor], config: dict
           ) -> dict[tuple[int, Target], list[_Unit]]:
    halves: dict[tuple[int, str], dict[str, torch.Tensor]] = {}
    for key, t in raw.items():
        m = _KEY.search(key)
        if m is None:
            raise AdapterError(f"adapter {path}: unsupported tensor {key!r} (only LoRA A/B of decoder layers)")
        halves.setdefault((int(m.group(1)), m.group(2)), {})[m.group(3)] = t
        if m.group(3) == "A":
            module = key[:m.start(3) - len(".lora_")].removeprefix("base_model.model.")
            _check_rank(path, config, module, t.shape[0], spec.num_experts if _fused_param(module) else 1)
    units: dict[tuple[int, Target], list[_Unit]] = {}
    experts: dict[tuple[int, str], dict[int, tuple[torch.Tensor, torch.Tensor]]] = {}
    for (layer, module), ab in sorted(halves.items()):
        if set(ab) != {"A", "B"}:
            raise AdapterError(f"adapter {path}: layer {layer} {module} lacks lora_A or lora_B")
        if layer >= spec.num_layers:
            raise AdapterError(f"adapter {path}: layer {layer} but the model has {spec.num_layers} layers")
        a, b = ab["A"], ab["B"]
        parts = module.split(".")
        em = _EXPERT.search(module)
        if em:  # experts.{e}.gate_proj / experts.{e}.w1: one module per expert
            sub = MIXTRAL_EXPERT.get(em.group(2), em.group(2))
            if sub not in ("gate_proj", "up_proj", "down_proj") or not spec.is_moe_layer(layer):
                raise AdapterError(f"adapter {path}: unknown target module {module!r} in layer {layer}")
            experts.setdefault((layer, sub), {})[int(em.group(1))] = (a, b)
        elif _fused_param(module):
            target, unit = _fused_param_unit(path, spec, layer, module, a, b)
            units.setdefault((layer, target), []).append(unit)
        elif parts[-1] in SUB_TO_TARGET:
            sub = parts[-1]
            shared = "shared_expert" in parts
            if spec.is_moe_layer(layer) and SUB_TO_TARGET[sub].group in ("gate_up", "down") and not shared:
                raise AdapterError(f"adapter {path}: {module} in layer {layer} targets a dense MLP, "
                                   f"but that layer is MoE")
            target = _target(SUB_TO_TARGET[sub], "shared_" if shared else "")
            units.setdefault((layer, target), []).append(_dense_unit(path, spec, layer, module, sub, a, b))
        else:
            raise AdapterError(f"adapter {path}: unknown target module {module!r} in layer {layer}")
    for (layer, sub), per_expert in experts.items():
        units.setdefault((layer, _target(SUB_TO_TARGET[sub], "experts_")), []).append(
            _stack_experts(path, spec, layer, sub, per_expert))
    return units


def _fused_param(module: str) -> bool:
    """A PEFT `target_parameters` LoRA on the fused 3D expert weights (the first
    of two parameters on one module nests under `base_layer`)."""
    parts = module.split(".")
    return parts[-1] in ("experts", "base_layer") and "experts" in parts


def _check_rank(path: Path, config: dict, module: str, rows: int, num_experts: int) -> None:
    """The config's rank for a module (`rank_pattern`, else `r`) must be the
    tensors' rank, as PEFT requires when it loads the adapter. A fused expert
    parameter (`target_parameters`) holds `num_experts` rank slices."""
    r = int(_pattern_value(config.get("rank_pattern") or {}, module, config.get("r", 8)))
    if rows != r * num_experts:
        per = f" ({num_experts} experts)" if num_experts > 1 else ""
        raise AdapterError(f"adapter {path}: adapter_config.json says rank {r} for {module}, but its lora_A has "
                           f"{rows} rows{per}: rank {rows // num_experts}")


def _target(dense: Target, prefix: str) -> Target:
    """The shared-expert or per-expert target of a dense one ("shared_", "experts_")."""
    return Target(prefix + dense.value)


def _sub_slice(spec: ModelSpec, target: Target, sub: str) -> tuple[int, int]:
    """(offset, size) of a sub-projection inside its fused output: its slice of `out_edges`."""
    edges = out_edges(spec, target)
    j = SUBMODULES[Target(target.group)].index(sub)
    return edges[j], edges[j + 1] - edges[j]


def _check(path, where, a, b, in_dim, out_dim) -> None:
    if a.shape[-1] != in_dim or b.shape[-2] != out_dim or a.shape[-2] != b.shape[-1]:
        raise AdapterError(
            f"adapter {path}: {where} has lora_A {tuple(a.shape)} and lora_B {tuple(b.shape)}, "
            f"but the base model wants in={in_dim}, out={out_dim} (wrong base model?)")


def _dense_unit(path, spec, layer, module, sub, a, b) -> _Unit:
    target = _target(SUB_TO_TARGET[sub], "shared_" if "shared_expert" in module else "")
    offset, size = _sub_slice(spec, target, sub)
    _check(path, f"layer {layer} {module}", a, b, in_dim(spec, target), size)
    return _Unit(a, b, offset, module)


def _stack_experts(path, spec, layer, sub, per_expert) -> _Unit:
    target = _target(SUB_TO_TARGET[sub], "experts_")
    offset, size = _sub_slice(spec, target, sub)
    for e, (a, b) in per_expert.items():
        if e >= spec.num_experts:
            raise AdapterError(f"adapter {path}: expert {e} in layer {layer}, the model has {spec.num_experts}")
        _check(path, f"layer {layer} expert {e} {sub}", a, b, in_dim(spec, target), size)
    r = next(iter(per_expert.values()))[0].shape[0]
    a = torch.zeros(spec.num_experts, r, in_dim(spec, target))
    b = torch.zeros(spec.num_experts, size, r)
    for e, (ae, be) in per_expert.items():
        if ae.shape[0] != r:
            raise AdapterError(f"adapter {path}: experts of layer {layer} {sub} have different ranks")
        a[e], b[e] = ae, be
    return _Unit(a, b, offset, f"experts.{sub}")


def _fused_param_unit(path, spec, layer, module, a, b) -> tuple[str, _Unit]:
    """PEFT `target_parameters` LoRA on a fused 3D expert weight.

    PEFT stores A [E*r, in] with expert-major rows and B [out, E*r] whose
    columns are rank-major (column k*E + e); see peft's ParamWrapper. Which of
    gate_up_proj / down_proj it is follows from the shapes (two parameters on
    one module nest the first under `base_layer`).
    """
    num_experts = spec.num_experts
    if not spec.is_moe_layer(layer) or a.shape[0] % num_experts:
        raise AdapterError(f"adapter {path}: {module} in layer {layer} has lora_A {tuple(a.shape)}, "
                           f"not a LoRA over {num_experts} experts")
    r = a.shape[0] // num_experts
    for target in (Target.EXPERTS_GATE_UP, Target.EXPERTS_DOWN):
        if a.shape[1] == in_dim(spec, target) and b.shape[0] == out_dim(spec, target):
            a3 = a.reshape(num_experts, r, -1)  # [E, r, in]
            b3 = b.reshape(b.shape[0], r, num_experts).permute(2, 0, 1)  # [E, out, r]
            return target, _Unit(a3, b3, 0, module + "." + target.group + "_proj")
    raise AdapterError(f"adapter {path}: {module} in layer {layer} has lora_A {tuple(a.shape)} and "
                       f"lora_B {tuple(b.shape)}, matching neither expert gate_up_proj nor down_proj")


def _fuse(path: Path, layer: int, units: list[_Unit], edges: tuple[int, ...], dtype: torch.dtype
          ) -> tuple[torch.Tensor, torch.Tensor]:
    """Lay the units out as `targets.out_edges` says: each output slice a unit covers gets the
    unit's A in its rank columns and its B in its output columns. A plain module covers one
    slice; a LoRA over a fused expert weight (`target_parameters`) covers them all, its A
    repeated for each."""
    lead = units[0].a.shape[:-2]
    width, r = len(edges) - 1, max(u.a.shape[-2] for u in units)
    a = torch.zeros(*lead, units[0].a.shape[-1], width * r)
    b = torch.zeros(*lead, r, edges[-1])
    taken: set[int] = set()
    for u in units:
        ru, lo, hi = u.a.shape[-2], u.offset, u.offset + u.b.shape[-2]
        covered = [j for j in range(width) if lo <= edges[j] and edges[j + 1] <= hi]
        if taken & set(covered):
            raise AdapterError(f"adapter {path}: layer {layer} {u.module} adapts an output another module "
                               f"of the adapter adapts too")
        taken.update(covered)
        bt = u.b.transpose(-1, -2)  # [.., ru, hi - lo]
        for j in covered:
            a[..., j * r:j * r + ru] = u.a.transpose(-1, -2)
            b[..., :ru, edges[j]:edges[j + 1]] = bt[..., edges[j] - lo:edges[j + 1] - lo]
    return a.to(dtype), b.to(dtype)


def _pattern_value(patterns: dict, module: str, default: float) -> float:
    for pattern, value in patterns.items():
        if re.fullmatch(rf"(.*\.)?{pattern}", module):
            return float(value)
    return default
