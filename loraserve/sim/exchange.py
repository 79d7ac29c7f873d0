"""What a disaggregated LoRA delta costs: the per-layer exchange between an
instance and the LoRA server, and the server's batched shrink/expand.

A layer's adapted projections are dependent round trips (q|k|v, then o, then
the experts' gate|up, then down): each sends the projection's input rows and
gets back its delta. A row of hidden size crosses once per token, not once
per routed expert: gate|up's input is the token's hidden state, sent once
with its k expert ids (the server fans it out), and down's k hidden-size
deltas are combined on the server with the router weights (they travel with
the ids, a few bytes) into one row, as the MoE combine is linear. Only the
expert-sized rows (gate|up's deltas, down's inputs) cross k times.

The real wire (`remote/backend.py`, protocol version 3) is the same:
gate|up's input goes once per token with a gather index, and down's rows
go with their routing weights and come back combined, one row per token,
which the model adds after its own combine.

A trip costs link latency + (bytes in + bytes out) / bandwidth of the link
the placement implies (NVLink inside a node, InfiniBand across nodes): push
is one message each way, pull a request then a response (one more latency).
The two directions add although IB and NVLink are full duplex: within a
trip they are dependent (the server computes on the whole message, then
replies; the real server does not stream rows through in chunks), so only
different trips could overlap, which this conservative charge leaves out.
With overlap the trip runs beside the projection's base GEMM and the layer
waits for the longer of the two; without it ("naive" disaggregation) it adds.

The server's compute is a roofline of the batched kernels per (layer,
projection): 2 FLOPs per LoRA weight per routed row, reading each distinct
(adapter, expert) slice touched once, on the x GPUs of an EPx stage (experts
split x ways, dense projections on the stage's leader). `kernel_eff` scales
the hardware's achieved efficiency: it is how the paper's Hopper-specialised
kernels (the "+kernel" rung) are modelled, as an efficiency factor, not a
kernel.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from loraserve.model.spec import ModelSpec
from loraserve.model.targets import Target, in_dim, layer_targets, out_dim
from loraserve.sim.hardware import GB, Hardware


@dataclass(frozen=True)
class Link:
    name: str
    bandwidth: float
    """Bytes/s of one GPU's link."""

    latency: float
    """One message, one way (GPU-initiated: no host on the path)."""


LINKS: dict[str, Link] = {
    "nvlink": Link("nvlink", 900 * GB, 2e-6),  # the paper's 900 GB/s inside a node
    "ib": Link("ib", 400e9 / 8, 5e-6),  # the paper's 400 Gb/s InfiniBand across nodes
}


@dataclass(frozen=True)
class Trip:
    """One dependent round trip of a layer: a projection's rows out, its delta back."""

    target: Target
    in_bytes: float
    out_bytes: float
    params: float
    """LoRA parameters of one adapter for it (all experts)."""

    share: float
    """Its share of the layer's base time (its GEMM)."""

    expert: bool = False
    """Per-expert LoRA: rows routed to top-k experts, weights split over the EP GPUs."""


@dataclass(frozen=True)
class ExchangeModel:
    spec: ModelSpec
    rank: int
    link: Link
    hw: Hardware
    instance_gpus: int = 1
    """Each GPU of an instance has its own link (one NIC per GPU, as Hopper nodes have)."""

    ep: int = 4
    pp: int = 2
    push: bool = True
    overlap: bool = True
    kernel_eff: float = 1.0
    dtype_bytes: int = 2
    """Bytes per activation element on the wire."""

    lora_dtype_bytes: int | None = None
    """Bytes per adapter weight the server's kernels read; None: dtype_bytes."""

    kernel_overhead: float = 5e-6
    """Launch and synchronisation per batched kernel (and per EP all-gather)."""

    _trips_by_layer: dict[int, list[Trip]] = field(default_factory=dict, init=False, repr=False, compare=False)
    """Sizing a layer's trips walks the model's targets, which a long run would do per delta. (Kept
    here: a module-level cache keyed by id(spec) handed one model's trips to another model whose
    spec reused a freed spec's id, so a run's results depended on what ran before it.)"""

    def trips(self, layer: int = 0) -> list[Trip]:
        """Per token, the layer's dependent round trips (q|k|v folded into one)."""
        if layer not in self._trips_by_layer:
            self._trips_by_layer[layer] = self._trips(layer)
        return self._trips_by_layer[layer]

    def _trips(self, layer: int) -> list[Trip]:
        s, d, out = self.spec, self.dtype_bytes, []
        k = s.num_experts_per_tok if s.num_experts else 1
        base = {t: in_dim(s, t) * out_dim(s, t) * (k if t.is_expert else 1) for t in layer_targets(s, layer)}
        total = sum(base.values())
        for t in layer_targets(s, layer):
            rin = k if t.is_expert and in_dim(s, t) != s.hidden_size else 1  # the hidden state once, with ids
            rout = k if t.is_expert and out_dim(s, t) != s.hidden_size else 1  # down's deltas combined on the server
            copies = s.num_experts if t.is_expert else 1
            out.append(Trip(t, rin * in_dim(s, t) * d, rout * out_dim(s, t) * d,
                            copies * self.rank * (t.width * in_dim(s, t) + out_dim(s, t)), base[t] / total,
                            t.is_expert))
        return out

    def trip_time(self, trip: Trip, tokens: int) -> float:
        """Network time of one trip for `tokens` rows: push = one message each
        way; pull = the rows, then a request for the result, then the result."""
        messages = 2 if self.push else 3
        bw = self.link.bandwidth * self.instance_gpus
        return messages * self.link.latency + tokens * (trip.in_bytes + trip.out_bytes) / bw

    def compute_time(self, trip: Trip, tokens: int, adapters: int) -> float:
        """The server's batched kernel for one (layer, projection): `tokens` rows
        over `adapters` distinct adapters, on an EP stage."""
        s, hw = self.spec, self.hw
        if trip.expert:
            gpus, rows, per = self.ep, tokens * s.num_experts_per_tok, trip.params / s.num_experts
            touched = adapters * per * _distinct(s.num_experts, rows / max(adapters, 1))
        else:
            gpus, rows, per = 1, tokens, trip.params
            touched = adapters * per
        flops = 2.0 * rows * per
        nbytes = touched * (self.lora_dtype_bytes or self.dtype_bytes) + tokens * (trip.in_bytes + trip.out_bytes)
        eff = self.kernel_eff
        roof = max(flops / (gpus * hw.flops * hw.flops_eff * eff), nbytes / (gpus * hw.mem_bw * hw.bw_eff * eff))
        return roof + self.kernel_overhead * (2 if gpus > 1 else 1)

    def layer(self, tokens: int, batch_tokens: int, batch_adapters: int, base_layer_s: float) -> LayerCost:
        """One layer's cost to an instance with `tokens` rows in a server batch of
        `batch_tokens` rows over `batch_adapters` adapters (server waits excluded)."""
        key = (tokens, batch_tokens, batch_adapters)
        parts = self._memo.get(key)
        if parts is None:
            trips = self.trips()
            cs = [self.compute_time(t, batch_tokens, batch_adapters) for t in trips]
            parts = self._memo[key] = ([(t.share, self.trip_time(t, tokens) + c) for t, c in zip(trips, cs)], sum(cs))
        trips, busy = parts
        remote = sum(r for _, r in trips)
        if self.overlap:
            wall = sum(max(base_layer_s * share, r) for share, r in trips)
        else:
            wall = base_layer_s + remote
        return LayerCost(wall, remote, busy)

    @property
    def _memo(self) -> dict:
        """Per-trip costs by (tokens, batch tokens, batch adapters): a run asks for the same few many times."""
        memo = self.__dict__.get("_memo_dict")
        if memo is None:
            memo = {}
            object.__setattr__(self, "_memo_dict", memo)
        return memo


@dataclass(frozen=True)
class LayerCost:
    wall: float
    """The instance's time for the layer: base GEMMs and round trips, overlapped or added."""

    remote: float
    """The round trips alone (network and server compute), on the critical path once the server starts."""

    busy: float
    """The server stage's compute time for the layer's batched kernels."""


def _distinct(experts: int, rows: float) -> float:
    """Expected distinct experts touched by `rows` uniformly routed rows."""
    if experts <= 1:
        return 1.0
    return experts * (1 - (1 - 1 / experts) ** rows)
