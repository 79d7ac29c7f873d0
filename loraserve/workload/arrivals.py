"""When sessions start: Poisson, Gamma (bursty) and on-off processes.

Each process yields absolute start times (seconds from 0) at a given mean
rate, so a serviceable-rate search can regenerate the same shape at another
rate. Burstiness is the coefficient of variation of the gaps: 1 is Poisson,
above 1 clusters arrivals the way real traffic does.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

ARRIVALS = ("poisson", "gamma", "onoff")


@dataclass(frozen=True)
class ArrivalConfig:
    kind: str = "poisson"
    rate: float = 1.0
    """Mean sessions started per second, over the whole run."""

    cv: float = 2.0
    """gamma: coefficient of variation of the gaps (1 = Poisson)."""

    on_s: float = 5.0
    off_s: float = 5.0
    """onoff: Poisson at rate·(on+off)/on during `on_s`, silence during `off_s`."""

    def validate(self) -> None:
        if self.kind not in ARRIVALS:
            raise ValueError(f"unknown arrival process {self.kind!r}; choose from {', '.join(ARRIVALS)}")
        if self.rate <= 0:
            raise ValueError(f"arrival rate must be positive, got {self.rate}")
        if self.kind == "gamma" and self.cv <= 0:
            raise ValueError(f"gamma arrivals need cv > 0, got {self.cv}")
        if self.kind == "onoff" and (self.on_s <= 0 or self.off_s < 0):
            raise ValueError("onoff arrivals need on_s > 0 and off_s >= 0")


def arrival_times(cfg: ArrivalConfig, n: int, rng: random.Random) -> list[float]:
    """The first n start times of the process."""
    cfg.validate()
    times, t = [], 0.0
    if cfg.kind == "poisson":
        for _ in range(n):
            t += rng.expovariate(cfg.rate)
            times.append(t)
    elif cfg.kind == "gamma":
        shape = 1.0 / cfg.cv**2  # mean gap 1/rate, variance (cv/rate)^2
        for _ in range(n):
            t += rng.gammavariate(shape, 1.0 / (cfg.rate * shape))
            times.append(t)
    else:  # onoff: time runs only during on-periods, then jumps over the off-period
        period = cfg.on_s + cfg.off_s
        busy_rate = cfg.rate * period / cfg.on_s
        on_time = 0.0
        for _ in range(n):
            on_time += rng.expovariate(busy_rate)
            cycles, within = divmod(on_time, cfg.on_s)
            times.append(cycles * period + within)
    return times
