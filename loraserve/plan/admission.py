"""Immediate admissibility: is a request's adapter there when its first layer
needs it? A reconstruction of InfiniLoRA's IAR model (the paper's formulas are
not published); README "Provisioning" writes it out.

A request for adapter i is immediately admissible when the adapter is
resident on arrival (probability r_i: 1 or 0 for a static cache, Che's
approximation for LRU) or, on a miss, when layer-wise loading delivers every
layer before the request's forward pass reaches it, within the TTFT budget.
With p_i the share of requests for i and a_i the chance a miss of i is still
on time:

    IAR = Σ_i p_i (r_i + (1 - r_i) a_i)

Times are seconds, sizes bytes; nothing here knows what a model is.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Loading:
    """How a missing adapter reaches the server's GPUs, layer by layer."""

    layers: int
    bandwidth: float
    """Host → device bytes/s of one link."""

    latency_s: float
    """Fixed cost of starting a load (the first layer's copy waits this long)."""

    layer_compute_s: float
    """τ: the base model's time per layer of a request's first forward (its
    prefill); layer l of the adapter is needed l·τ after layer 0."""

    links: int = 1
    """Links a load is spread over (server GPUs each loading their shard)."""

    def transfer_s(self, size: float) -> float:
        """The whole adapter's time on the links."""
        return size / (self.bandwidth * self.links)

    def miss_delay(self, size: float) -> float:
        """Δ: how much later the first token comes when the adapter is loaded
        layer-wise on arrival over a free link.

        Layer l arrives at t_l = lat + (l+1)·β (β: one layer's transfer); the
        forward reaches layer l at Δ + l·τ, so Δ = max_l (t_l - l·τ) =
        lat + β + (L-1)·max(0, β - τ): one layer's load when the pipeline
        keeps ahead of compute (β ≤ τ), else what the compute cannot hide."""
        beta = self.transfer_s(size) / self.layers
        return self.latency_s + beta + (self.layers - 1) * max(0.0, beta - self.layer_compute_s)


@dataclass(frozen=True)
class LoadQueue:
    """Misses queue for the load links: an M/G/1 queue (Poisson misses, each
    holding the links for its transfer), its waiting time W taken as an atom
    at 0 (1 - ρ) plus an exponential tail with the Pollaczek-Khinchine mean:
    P(W > t) = ρ·exp(-ρ t / E[W])."""

    rho: float
    mean_wait_s: float

    @classmethod
    def of(cls, probs: list[float], sizes: list[float], residency: list[float], rate: float,
           load: Loading) -> LoadQueue:
        miss = [(p * (1 - r), load.transfer_s(s)) for p, s, r in zip(probs, sizes, residency)]
        lam = rate * sum(m for m, _ in miss)
        rho = rate * sum(m * t for m, t in miss)
        if lam == 0:
            return cls(0.0, 0.0)
        if rho >= 1:
            return cls(rho, math.inf)
        second = sum(m * t * t for m, t in miss) / sum(m for m, _ in miss)
        return cls(rho, lam * second / (2 * (1 - rho)))

    def p_wait_within(self, t: float) -> float:
        if t < 0 or self.rho >= 1:
            return 0.0
        if self.rho == 0 or self.mean_wait_s == 0:
            return 1.0
        return 1.0 - self.rho * math.exp(-self.rho * t / self.mean_wait_s)


def on_time_on_miss(size: float, budget_s: float, load: Loading, queue: LoadQueue) -> float:
    """a_i: P(W + Δ_i ≤ budget), the chance a miss still meets the TTFT budget."""
    return queue.p_wait_within(budget_s - load.miss_delay(size))


def iar(probs: list[float], sizes: list[float], residency: list[float], rate: float, budget_s: float,
        load: Loading) -> float:
    """Σ p_i (r_i + (1 - r_i) a_i), the load queue priced from the misses."""
    queue = LoadQueue.of(probs, sizes, residency, rate, load)
    return sum(p * (r + (1 - r) * on_time_on_miss(s, budget_s, load, queue))
               for p, s, r in zip(probs, sizes, residency))


def che_residency(probs: list[float], sizes: list[float], capacity: float) -> list[float]:
    """LRU's stationary hit probability per adapter under independent requests
    (Che's approximation, sizes in bytes): h_i = 1 - exp(-p_i T) with the
    characteristic time T solving Σ_i s_i h_i = capacity (time counted in
    requests, so the rate drops out)."""
    p, s = np.asarray(probs, dtype=float), np.asarray(sizes, dtype=float)
    if capacity >= s[p > 0].sum():
        return [1.0 if x > 0 else 0.0 for x in probs]
    if capacity <= 0:
        return [0.0] * len(probs)

    def filled(t: float) -> float:
        return float((s * -np.expm1(-p * t)).sum())

    lo, hi = 0.0, 1.0
    while filled(hi) < capacity:
        hi *= 2
    for _ in range(60):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if filled(mid) < capacity else (lo, mid)
    return (-np.expm1(-p * hi)).tolist()


def erlang_c_wait_within(t: float, servers: int, rate: float, service_s: float) -> float:
    """P(W ≤ t) in an M/M/c queue: requests waiting for one of `servers`
    base-model instances, each busy `service_s` per request (Erlang C)."""
    a = rate * service_s
    if a >= servers:
        return 0.0
    b = 1.0
    for k in range(1, servers + 1):
        b = a * b / (k + a * b)
    wait = b / (1 - (a / servers) * (1 - b))
    return 1.0 - wait * math.exp(-(servers - a) * t / service_s) if t >= 0 else 0.0


def required_iar(quantile: float, hit_on_time: float) -> float:
    """The IAR a q-quantile TTFT SLO needs when a request that is not
    immediately admissible misses the SLO: q ≤ IAR · P(a hit is on time),
    so IAR ≥ q / P(hit on time); above 1, no cache meets the SLO."""
    if not 0 < quantile <= 1:
        raise ValueError(f"the SLO quantile must be in (0, 1], got {quantile}")
    return math.inf if hit_on_time <= 0 else quantile / hit_on_time
