"""What the LoRA server's GPUs must do per second at a request rate: the
batched shrink/expand of every (layer, projection, expert) delta, the adapter
weights those kernels read, and the activations that cross the link.

A roofline, like the simulator's step cost: GPUs for compute are the larger
of FLOP time and weight-read time per second, over a utilisation ceiling
(a server run at 100% queues without bound).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from loraserve.model.spec import ModelSpec
from loraserve.model.targets import Target, in_dim, layer_targets, out_dim
from loraserve.sim.hardware import Hardware
from loraserve.sim.models import lora_params

EXPERT_TARGETS = frozenset(t for t in Target if t.is_expert)
DENSE_TARGETS = frozenset(Target) - EXPERT_TARGETS


@dataclass(frozen=True)
class Traffic:
    """The load the server sees, in requests and tokens."""

    rate: float
    """Requests per second."""

    mean_input: float
    mean_output: float
    tpot_s: float
    """Decode steps come this far apart (the SLO's pace: the least work that meets it)."""

    @property
    def tokens_per_s(self) -> float:
        return self.rate * (self.mean_input + self.mean_output)

    @property
    def decoding(self) -> float:
        """Requests decoding at once (Little's law at the SLO's pace)."""
        return self.rate * self.mean_output * self.tpot_s


def dense_share(spec: ModelSpec) -> float:
    """The share of an adapter's weights outside the experts (1 for a dense model)."""
    if not spec.num_experts:
        return 1.0
    d, e = lora_params(spec, 1, DENSE_TARGETS), lora_params(spec, 1, EXPERT_TARGETS)
    return d / (d + e)


def applied_params_per_token(spec: ModelSpec, params: float) -> float:
    """LoRA weights one token meets in an adapter of `params` weights: every
    dense projection's, and the routed k of E experts' share of the expert
    projections'."""
    share = dense_share(spec)
    k_over_e = spec.num_experts_per_tok / spec.num_experts if spec.num_experts else 0.0
    return params * (share + (1 - share) * k_over_e)


def link_bytes_per_token(spec: ModelSpec, dtype_bytes: int) -> float:
    """Activations in and deltas out per token: each adapted projection's input
    row goes to the server and its delta comes back. Expert rows of the
    expert's own width cross once per routed expert (k of them); hidden-size
    rows once: the gate|up input is one row for all k (the server routes it
    by the expert ids) and down's k deltas come back combined with the router
    weights (the rule of `sim/exchange.py`'s trips)."""
    total = 0
    for layer in range(spec.num_layers):
        for t in layer_targets(spec, layer):
            k = spec.num_experts_per_tok if t.is_expert else 1
            rin = k if in_dim(spec, t) != spec.hidden_size else 1
            rout = k if out_dim(spec, t) != spec.hidden_size else 1
            total += rin * in_dim(spec, t) + rout * out_dim(spec, t)
    return float(total * dtype_bytes)


def weight_bytes_per_s(spec: ModelSpec, probs: list[float], sizes: list[float], traffic: Traffic) -> float:
    """Adapter bytes the kernels read per second. Every decode step (one per
    `tpot_s`, the instances' steps batched together on the server) reads each
    adapter in the batch once: its dense projections whole, and of its
    experts those its m_i tokens touch, E(1 - (1 - k/E)^m_i). Adapter i is
    in a batch of n decoding requests with probability 1 - (1 - p_i)^n."""
    n = traffic.decoding
    share = dense_share(spec)
    k_over_e = spec.num_experts_per_tok / spec.num_experts if spec.num_experts else 0.0
    per_step = 0.0
    for p, size in zip(probs, sizes):
        present = -math.expm1(n * math.log1p(-p)) if p < 1 else 1.0
        if present <= 0:
            continue
        tokens = max(1.0, n * p / present)
        touched = -math.expm1(tokens * math.log1p(-k_over_e)) if k_over_e < 1 else 1.0
        per_step += present * size * (share + (1 - share) * touched)
    return per_step / traffic.tpot_s


@dataclass(frozen=True)
class ServerNeed:
    flops_per_s: float
    weight_bytes_per_s: float
    link_bytes_per_s: float
    gpus_for_compute: int
    gpus_for_bandwidth: int


def server_need(spec: ModelSpec, hw: Hardware, dtype_bytes: int, lora_dtype_bytes: int, probs: list[float],
                sizes: list[float], traffic: Traffic, link_bw: float, max_util: float) -> ServerNeed:
    """GPUs the deltas need at this traffic: compute (roofline of FLOPs and
    weight reads) and link (activations over each GPU's `link_bw`). A token's
    adapter is adapter i with probability p_i, so its weights are the
    popularity-weighted mean size."""
    params = sum(p * s for p, s in zip(probs, sizes)) / lora_dtype_bytes
    flops = 2.0 * applied_params_per_token(spec, params) * traffic.tokens_per_s  # shrink + expand
    weights = weight_bytes_per_s(spec, probs, sizes, traffic)
    link = link_bytes_per_token(spec, dtype_bytes) * traffic.tokens_per_s
    busy = max(flops / (hw.flops * hw.flops_eff), weights / (hw.mem_bw * hw.bw_eff))
    return ServerNeed(flops, weights, link, max(1, math.ceil(busy / max_util - 1e-9)),
                      max(1, math.ceil(link / (link_bw * max_util) - 1e-9)))
