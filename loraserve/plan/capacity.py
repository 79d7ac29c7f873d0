"""The smallest cache that holds enough of the demand: a knapsack over adapter
sizes (InfiniLoRA says its provisioning is a dynamic program; this is ours).

best[b] is the largest request share a static cache of b size units can
hold. Adapters of one size are interchangeable but for their popularity, so
a cache takes the k most popular of each size class: the DP runs over size
classes with a count per class, exact, and cheap while the classes are few
(ranks 8/16/32/64 make four). With one size it is the closed form: the top C.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import numpy as np

MAX_UNITS = 100_000
"""Budget cells of the DP table; past it sizes are rounded up to a coarser unit
(so a plan may hold a little more than the exact minimum, never less)."""


@dataclass
class Knapsack:
    """best[b] and the counts per class that reach it, for every budget b."""

    unit: int
    """Bytes per budget cell: the sizes' greatest common divisor, or coarser."""

    classes: list[tuple[int, list[int]]]
    """(size in units, adapter indices most popular first) per size class."""

    best: np.ndarray
    choice: np.ndarray
    """choice[c, b]: how many adapters of class c the best cache of b units takes."""

    @classmethod
    def build(cls, probs: list[float], sizes: list[int]) -> Knapsack:
        if any(s <= 0 for s in sizes):
            raise ValueError("adapter sizes must be positive")
        unit = math.gcd(*sizes)
        if sum(sizes) // unit > MAX_UNITS:
            unit = -(-sum(sizes) // MAX_UNITS)
        by_size: dict[int, list[int]] = {}
        for i in sorted(range(len(sizes)), key=lambda i: -probs[i]):
            by_size.setdefault(-(-sizes[i] // unit), []).append(i)
        classes = sorted(by_size.items())
        total = sum(w * len(members) for w, members in classes)
        best = np.zeros(total + 1)
        choice = np.zeros((len(classes), total + 1), dtype=np.int32)
        for c, (w, members) in enumerate(classes):
            gain = np.cumsum([0.0] + [probs[i] for i in members])
            new = best.copy()
            for k in range(1, len(members) + 1):
                cand = np.full(total + 1, -1.0)
                cand[k * w:] = best[:total + 1 - k * w] + gain[k]
                better = cand > new + 1e-15
                new[better] = cand[better]
                choice[c, better] = k
            best = new
        return cls(unit, classes, best, choice)

    @property
    def max_units(self) -> int:
        return len(self.best) - 1

    def members(self, units: int) -> list[int]:
        """Adapter indices of the best cache of `units` budget cells."""
        units = min(units, self.max_units)
        out = []
        for c in range(len(self.classes) - 1, -1, -1):
            w, members = self.classes[c]
            k = int(self.choice[c, units])
            out += members[:k]
            units -= k * w
        return sorted(out)


def smallest(knapsack: Knapsack, enough: Callable[[list[int]], bool]) -> list[int] | None:
    """The resident set of the smallest budget whose best cache is `enough`
    (None: not even all of them). A bisection over budgets: the best share
    only grows with the budget, and so does the IAR a cache gives."""
    if not enough(knapsack.members(knapsack.max_units)):
        return None
    lo, hi = -1, knapsack.max_units  # enough(hi), not enough(lo) (or lo = -1)
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (lo, mid) if enough(knapsack.members(mid)) else (mid, hi)
    return knapsack.members(hi)


def smallest_lru(total_bytes: int, enough: Callable[[float], bool], unit: int) -> int | None:
    """The smallest LRU capacity in bytes (a multiple of `unit`) that is `enough`."""
    if not enough(total_bytes):
        return None
    lo, hi = -1, -(-total_bytes // unit)
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (lo, mid) if enough(mid * unit) else (mid, hi)
    return hi * unit
