"""Which adapter a session uses: uniform, Zipf, Gaussian-skewed, or a hot set
that rotates over time.

Popularity is a weight per adapter rank at time t. The shifting kind moves
the whole ranking along by `shift` adapters every `period` seconds, which is
what defeats a cache that only remembers the past (the case ELORA's
prefetching is for).
"""

from __future__ import annotations

import bisect
import itertools
import math
import random
from dataclasses import dataclass

POPULARITY = ("uniform", "zipf", "gaussian", "shifting")


@dataclass(frozen=True)
class PopularityConfig:
    kind: str = "zipf"
    s: float = 1.0
    """zipf and shifting: weight of the adapter of rank i is 1 / (i+1)^s."""

    sigma: float = 0.15
    """gaussian: spread as a fraction of the number of adapters, centred on the middle one."""

    period: float = 30.0
    shift: int = 0
    """shifting: every `period` seconds the ranking rotates by `shift` adapters (0: a tenth of them)."""

    def validate(self) -> None:
        if self.kind not in POPULARITY:
            raise ValueError(f"unknown popularity {self.kind!r}; choose from {', '.join(POPULARITY)}")
        if self.s < 0 or self.sigma <= 0 or self.period <= 0 or self.shift < 0:
            raise ValueError("popularity needs s >= 0, sigma > 0, period > 0, shift >= 0")


class Popularity:
    def __init__(self, cfg: PopularityConfig, n: int) -> None:
        cfg.validate()
        if n < 1:
            raise ValueError("popularity needs at least one adapter")
        self.cfg = cfg
        self.n = n
        if cfg.kind == "uniform":
            w = [1.0] * n
        elif cfg.kind == "gaussian":
            mid, spread = (n - 1) / 2, cfg.sigma * n
            w = [math.exp(-0.5 * ((i - mid) / spread) ** 2) for i in range(n)]
        else:
            w = [1.0 / (i + 1) ** cfg.s for i in range(n)]
        total = sum(w)
        self.probs = [x / total for x in w]
        self._cum = list(itertools.accumulate(self.probs))
        self.shift = (cfg.shift or max(1, n // 10)) if cfg.kind == "shifting" else 0

    def offset(self, t: float) -> int:
        """How far the ranking has rotated at time t."""
        return 0 if not self.shift else (int(t // self.cfg.period) * self.shift) % self.n

    def prob(self, adapter: int, t: float = 0.0) -> float:
        return self.probs[(adapter - self.offset(t)) % self.n]

    def sample(self, rng: random.Random, t: float = 0.0) -> int:
        rank = min(bisect.bisect_left(self._cum, rng.random() * self._cum[-1]), self.n - 1)
        return (rank + self.offset(t)) % self.n
