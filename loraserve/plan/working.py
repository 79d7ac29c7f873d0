"""Adapters in flight: a request holds its adapter on the server's GPUs from
arrival until its last token, so besides the resident set the server needs
slots for the misses being served at once (the working slots).

With n requests in flight (Little's law), adapter i is among them with
probability b_i = 1 - (1 - p_i)^n. The count of distinct non-resident
adapters in flight is a sum of independent Bernoullis (Poisson-binomial);
the plan gives it the SLO's quantile of slots.

A hot adapter is in flight nearly always, so its slot is taken anyway:
making it resident costs (almost) no memory and saves every load of it.
`absorb_hot` does that while the total does not grow.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np


def presence(probs: list[float], in_flight: float) -> list[float]:
    """b_i: P(adapter i has a request among `in_flight` independent ones)."""
    return [-math.expm1(in_flight * math.log1p(-min(p, 1 - 1e-15))) for p in probs]


def quantile_count(chances: list[float], q: float) -> int:
    """The q-quantile of how many independent events happen, event i with
    probability chances[i] (a Poisson-binomial distribution, built exactly)."""
    dist = np.ones(1)
    for b in chances:
        if b > 1e-12:
            dist = np.append(dist * (1 - b), 0.0) + np.append(0.0, dist * b)
    return int(np.searchsorted(np.cumsum(dist), q - 1e-12))


@dataclass(frozen=True)
class Memory:
    resident_bytes: int
    working: int
    """Working slots: the q-quantile of non-resident adapters in flight."""

    working_bytes: int
    """Working slots of the largest non-resident adapter's size."""

    @property
    def total(self) -> int:
        return self.resident_bytes + self.working_bytes


def memory(residency: list[float], sizes: list[int], present: list[float], q: float) -> Memory:
    working = quantile_count([(1 - r) * b for r, b in zip(residency, present)], q)
    largest = max((s for s, r in zip(sizes, residency) if r < 1), default=0)
    return Memory(round(sum(r * s for r, s in zip(residency, sizes))), working, working * largest)


def absorb_hot(residency: list[float], sizes: list[int], present: list[float], q: float) -> list[float]:
    """The resident set grown by the non-resident adapters most often in
    flight, as many as keep the total memory from growing (a bisection: each
    one moved from a Bernoulli to a sure slot can only raise the quantile)."""
    order = sorted((i for i, r in enumerate(residency) if r < 1), key=lambda i: -present[i])

    def grown(k: int) -> list[float]:
        out = list(residency)
        for i in order[:k]:
            out[i] = 1.0
        return out

    base = memory(residency, sizes, present, q).total
    lo, hi = 0, len(order) + 1  # grown(lo) fits; grown(hi) does not (or is past the end)
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if memory(grown(mid), sizes, present, q).total <= base else (lo, mid)
    return grown(lo)
