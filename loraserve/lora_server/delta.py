"""A delta request: one instance's rows of one (layer, projection), parsed
and checked against the model and the adapters before the server queues it,
so nothing malformed ever reaches a kernel."""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from loraserve.lora_server.store import AdapterStore
from loraserve.model.spec import ModelSpec
from loraserve.model.targets import Target, in_dim, layer_targets
from loraserve.remote.protocol import DTYPES, MAX_ROWS, Message, ProtocolError, field, position


@dataclass
class Delta:
    """One instance's rows of one (layer, target), parsed and checked."""

    peer: bytes
    id: int
    layer: int
    target: Target
    dtype: torch.dtype
    push: bool
    x: torch.Tensor
    """[N, in] the projection's input rows (only rows under some adapter)."""

    adapters: list[str]
    """Adapter ids the rows refer to."""

    row_adapter: torch.Tensor
    """[N] each row's index into `adapters`."""

    expert: torch.Tensor | None
    """[N] each row's expert (expert targets only)."""

    arrived: float

    position: int = 0
    """Where (layer, target) comes in a forward pass: deltas of one step arrive in this order."""

    at: int | None = None
    """NIXL push: where in the instance's registered arena the result is to be written."""

    combine: int | None = None
    """experts_down: reply one row per token, of this many (see `combine_rows`)."""

    weight: torch.Tensor | None = None
    """[N] each row's routing weight (with `combine`)."""

    scatter: torch.Tensor | None = None
    """[N] each row's token in [0, combine) (with `combine`)."""


def parse_delta(peer: bytes, msg: Message, spec: ModelSpec, store: AdapterStore, max_loras: int,
                now: float | None = None) -> Delta:
    """Check a delta message against the model and the store; raises ProtocolError saying what is wrong.
    `now`: its arrival time on the server's clock (default: time.monotonic())."""
    h, s = msg.header, spec
    msg_id = field(h, "id", int)
    layer = field(h, "layer", int)
    if not 0 <= layer < s.num_layers:
        raise ProtocolError(f"layer {layer} is outside [0, {s.num_layers})")
    try:
        target = Target(field(h, "target", str))
    except ValueError:
        raise ProtocolError(f"unknown target {h['target']!r}") from None
    if target not in layer_targets(s, layer):
        raise ProtocolError(f"layer {layer} has no {target} projection")
    if h.get("dtype") not in DTYPES or DTYPES[h["dtype"]] == torch.int32:
        raise ProtocolError(f"dtype {h.get('dtype')!r} is not a float type")
    rows = field(h, "rows", int)
    if not 0 < rows <= MAX_ROWS:
        raise ProtocolError(f"rows {rows} is outside (0, {MAX_ROWS}]")
    unique = _count(h, "unique", rows, target.is_expert, "a row count", "an expert target's delta")
    combine = _count(h, "combine", rows, target is Target.EXPERTS_DOWN, "a token count", "an experts_down delta")
    want = (2 if target.is_expert else 1) + (unique is not None) + 2 * (combine is not None)
    if len(msg.tensors) != 1 + want:
        raise ProtocolError(f"a {target} delta carries {1 + want} tensors, got {len(msg.tensors)}")
    x, x_rows = msg.tensors[0], rows if unique is None else unique
    if x.dtype != DTYPES[h["dtype"]] or list(x.shape) != [x_rows, in_dim(s, target)]:
        raise ProtocolError(f"x must be {h['dtype']}[{x_rows}, {in_dim(s, target)}], "
                            f"got {str(x.dtype).removeprefix('torch.')}{list(x.shape)}")
    adapters = field(h, "adapters", list)
    if not adapters or not all(isinstance(a, str) for a in adapters):
        raise ProtocolError("'adapters' must be a non-empty list of adapter ids")
    unknown = [a for a in adapters if not store.registry.has(a)]
    if unknown:
        raise ProtocolError(f"unknown adapter {unknown[0]!r}", 404)
    if len(set(adapters)) > max_loras:
        raise ProtocolError(f"{len(set(adapters))} adapters in one delta; this server has "
                            f"{max_loras} slots", 503)
    row_adapter, expert = msg.tensors[1], None
    check_index(row_adapter, rows, len(adapters), "adapter")
    if target.is_expert:
        expert = msg.tensors[2]
        check_index(expert, rows, s.num_experts, "expert")
        expert = expert.long()
    if unique is not None:  # each row's input sent once per token: gather them back, one per (token, expert)
        check_index(msg.tensors[3], rows, unique, "gather")
        x = x[msg.tensors[3].long()]
    weight = scatter = None
    if combine is not None:
        weight, scatter = msg.tensors[-2:]
        if weight.dtype != x.dtype or list(weight.shape) != [rows] or not bool(torch.isfinite(weight).all()):
            raise ProtocolError(f"routing weights must be finite {h['dtype']}[{rows}]")
        check_index(scatter, rows, combine, "scatter")
        scatter = scatter.long()
    at = h.get("at")
    if at is not None and (not isinstance(at, int) or isinstance(at, bool) or at < 0):
        raise ProtocolError(f"'at' must be an offset >= 0 in the instance's NIXL arena, got {at!r}")
    return Delta(peer, msg_id, layer, target, x.dtype, bool(h.get("push", True)), x, adapters,
                 row_adapter.long(), expert, time.monotonic() if now is None else now, position(s, layer, target), at,
                 combine, weight, scatter)


def _count(h: dict, name: str, rows: int, allowed: bool, what: str, where: str) -> int | None:
    """An optional count field in (0, rows], only where `allowed` (the target takes it)."""
    value = h.get(name)
    if value is not None and (not allowed or not isinstance(value, int) or isinstance(value, bool)
                              or not 0 < value <= rows):
        raise ProtocolError(f"'{name}' must be {what} in (0, {rows}] of {where}, got {value!r}")
    return value


def check_index(t: torch.Tensor, rows: int, bound: int, what: str) -> None:
    if t.dtype != torch.int32 or list(t.shape) != [rows]:
        raise ProtocolError(f"{what} ids must be int32[{rows}]")
    if rows and (int(t.min()) < 0 or int(t.max()) >= bound):
        raise ProtocolError(f"{what} ids must be in [0, {bound})")
