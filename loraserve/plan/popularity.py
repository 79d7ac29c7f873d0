"""Adapter popularity for the planner: given (Zipf s over N adapters) or read
from a workload or trace file (requests counted per adapter), optionally
fitted to a Zipf law by maximum likelihood.

The planner wants a probability per adapter, most popular first: that order
is the one a static cache fills in (uniform sizes) and the one the ranks of a
Zipf fit are counted in.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

from loraserve.workload import Popularity, PopularityConfig, Workload, from_trace


@dataclass(frozen=True)
class Demand:
    """Who asks for what: adapter names with their request probabilities
    (most popular first, summing to 1), and what the source said of lengths
    and rate (None when the popularity was given rather than read)."""

    names: list[str]
    probs: list[float]
    zipf_s: float | None = None
    """The Zipf exponent the probabilities follow (given or fitted); None: empirical shares."""

    request_rate: float | None = None
    """Requests per second in the source file (turns, not sessions)."""

    mean_input: float | None = None
    mean_output: float | None = None


def zipf(n: int, s: float, prefix: str = "lora-") -> Demand:
    """Zipf(s) over n adapters named like the workload generator names them, so
    the planner's residency set names the adapters a generated workload uses."""
    if n < 1 or s < 0:
        raise ValueError(f"Zipf popularity needs adapters >= 1 and s >= 0, got {n} and {s}")
    probs = Popularity(PopularityConfig("zipf", s), n).probs
    return Demand([f"{prefix}{i}" for i in range(n)], probs, zipf_s=s)


def read_workload(path: str | Path) -> Workload:
    """A loraserve workload file, or a CSV/JSONL trace (converted the way
    `loraserve workload --trace` converts it)."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"{path}: no such workload or trace file")
    try:
        head = json.loads(path.read_text().split("\n", 1)[0])
    except json.JSONDecodeError:
        head = None
    return Workload.load(path) if isinstance(head, dict) and "format" in head else from_trace(path)


def request_counts(wl: Workload) -> dict[str, int]:
    """Requests (turns) per adapter, every adapter the workload lists included
    (with 0 when unused); base-model requests are not counted: they need no
    adapter."""
    counts = dict.fromkeys(wl.adapters, 0)
    for t in wl.turns:
        if t.adapter is not None:
            counts[t.adapter] = counts.get(t.adapter, 0) + 1
    return counts


def from_workload(wl: Workload, fit: bool = False, num_adapters: int | None = None) -> Demand:
    """The workload's popularity: empirical request shares, or (`fit`) the
    Zipf law fitted to them over `num_adapters` (default: the workload's)."""
    counts = request_counts(wl)
    total = sum(counts.values())
    if total == 0:
        raise ValueError("the workload has no adapter requests: nothing to provision")
    ranked = sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))
    n = num_adapters or len(ranked)
    if n < len(ranked):
        raise ValueError(f"the workload uses {len(ranked)} adapters, more than --adapters {n}")
    names = [name for name, _ in ranked] + [f"unseen-{i}" for i in range(n - len(ranked))]
    sessions = len({t.session for t in wl.turns})
    lengths = dict(request_rate=wl.rate * wl.num_requests / max(1, sessions),
                   mean_input=sum(t.input_len for t in wl.turns) / wl.num_requests,
                   mean_output=sum(t.output_len for t in wl.turns) / wl.num_requests)
    if fit:
        s = fit_zipf([c for _, c in ranked], n)
        return Demand(names, Popularity(PopularityConfig("zipf", s), n).probs, zipf_s=s, **lengths)
    return Demand(names, [c / total for _, c in ranked] + [0.0] * (n - len(ranked)), **lengths)


def fit_zipf(counts: list[int], n: int | None = None) -> float:
    """Maximum-likelihood Zipf exponent of request counts, ranked by count.

    log L(s) = -s Σ c_r ln r - C ln H(n, s) is concave in s (ln H is a
    log-sum-exp), and its derivative is zero where the model's mean ln r
    equals the sample's, a quantity that falls monotonically with s: so a
    bisection finds the maximum. Ranking by observed count biases s upward
    a little when the tail is sparsely sampled (ties and noise reorder it)."""
    ranked = sorted((c for c in counts if c > 0), reverse=True)
    n = max(n or len(counts), len(ranked))
    total = sum(ranked)
    if total == 0:
        raise ValueError("no requests to fit a Zipf law to")
    logs = [math.log(r) for r in range(1, n + 1)]
    target = sum(c * lg for c, lg in zip(ranked, logs)) / total

    def mean_log(s: float) -> float:
        w = [math.exp(-s * lg) for lg in logs]
        return sum(wi * lg for wi, lg in zip(w, logs)) / sum(w)

    lo, hi = 0.0, 20.0
    if target >= mean_log(lo):
        return 0.0
    if target <= mean_log(hi):
        return hi
    for _ in range(60):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if mean_log(mid) > target else (lo, mid)
    return (lo + hi) / 2
