"""What a benchmark run measured: per-request timelines, their summary, and
the serviceable rate (the highest load that still meets an SLO).

Pure functions over plain records, no I/O, so the same numbers come out of a
real run, a simulator run or a test's hand-made timeline. Times are seconds
from the start of the run.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

ADAPTER_GOAL = 0.9
"""An adapter counts as served within SLO when more than this share of its requests are."""


@dataclass
class RequestRecord:
    id: str
    session: int
    turn: int
    adapter: str | None
    arrival: float
    """When the request was sent."""

    first_token: float | None
    finish: float | None
    token_times: list[float] = field(default_factory=list)
    """Arrival of each output chunk that carried text."""

    input_len: int = 0
    output_len: int = 0
    """Tokens actually produced (the server's usage count, else the chunk count)."""

    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.error is None and self.finish is not None and self.first_token is not None

    @property
    def ttft(self) -> float | None:
        return None if self.first_token is None else self.first_token - self.arrival

    @property
    def tpot(self) -> float | None:
        """Mean time per output token after the first; None with fewer than two tokens."""
        if self.first_token is None or self.finish is None or self.output_len < 2:
            return None
        return (self.finish - self.first_token) / (self.output_len - 1)


@dataclass(frozen=True)
class SLO:
    ttft: float
    """Seconds to the first token."""

    tpot: float
    """Seconds per output token after the first."""

    ttft_percentile: float = 95
    """The percentile of TTFT that `meets` holds to `ttft` (InfiniLoRA uses P95)."""


def percentile(values: list[float], q: float) -> float | None:
    """The q-th percentile (0..100) by linear interpolation between closest ranks,
    numpy's default; None for no values."""
    if not values:
        return None
    xs = sorted(values)
    pos = (len(xs) - 1) * q / 100
    lo = math.floor(pos)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


def mean(values: list[float]) -> float | None:
    return sum(values) / len(values) if values else None


def _stats(values: list[float], extra: float | None = None) -> dict[str, float | None]:
    qs = [50, 95, 99] + ([extra] if extra is not None and extra not in (50, 95, 99) else [])
    return {"mean": mean(values), **{f"p{q:g}": percentile(values, q) for q in qs}}


def within(rec: RequestRecord, slo: SLO) -> bool:
    """One request met the SLO: it succeeded, and its TTFT and TPOT are within bounds
    (a reply of one token has no TPOT and so meets that half)."""
    tpot = rec.tpot
    return rec.ok and rec.ttft <= slo.ttft and (tpot is None or tpot <= slo.tpot)


def meets(summary: dict, slo: SLO) -> bool:
    """InfiniLoRA's serviceable criterion on a summary: P{ttft_percentile} TTFT
    within the TTFT bound, mean TPOT within the TPOT bound, and no failures."""
    if summary["failed"] or not summary["completed"]:
        return False
    ttft = summary["ttft_s"][f"p{slo.ttft_percentile:g}"]
    tpot = summary["tpot_s"]["mean"]
    return ttft is not None and ttft <= slo.ttft and (tpot is None or tpot <= slo.tpot)


def summarize(records: list[RequestRecord], slo: SLO | None = None, duration: float | None = None) -> dict:
    """Counts, latency statistics (seconds), throughput and SLO attainment of one run.

    Latencies are over successful requests. Throughput counts their output
    tokens and themselves over `duration`, by default first arrival to last
    finish. Attainment is over all requests: a failed one is a miss.
    """
    done = [r for r in records if r.ok]
    if duration is None and done:
        duration = max(r.finish for r in done) - min(r.arrival for r in records)
    rate_of = (lambda n: n / duration) if duration else (lambda n: None)
    tokens = sum(r.output_len for r in done)
    out = {
        "requests": len(records),
        "completed": len(done),
        "failed": len(records) - len(done),
        "duration_s": duration,
        "output_tokens": tokens,
        "output_throughput_tok_s": rate_of(tokens),
        "request_throughput_rps": rate_of(len(done)),
        "ttft_s": _stats([r.ttft for r in done], slo.ttft_percentile if slo else None),
        "tpot_s": _stats([r.tpot for r in done if r.tpot is not None]),
        "slo": None, "slo_attainment": None, "adapter_slo_attainment": None, "meets_slo": None,
    }
    if slo is not None:
        out["slo"] = {"ttft_s": slo.ttft, "tpot_s": slo.tpot, "ttft_percentile": slo.ttft_percentile}
        out["slo_attainment"] = mean([float(within(r, slo)) for r in records])
        out["adapter_slo_attainment"] = adapter_attainment(records, slo)
        out["meets_slo"] = meets(out, slo)
    return out


def adapter_attainment(records: list[RequestRecord], slo: SLO, goal: float = ADAPTER_GOAL) -> float | None:
    """Share of adapters (the base model counts as one) with more than `goal` of
    their requests within SLO: whether every tenant is served, not just the busy ones."""
    by: dict[str | None, list[bool]] = {}
    for r in records:
        by.setdefault(r.adapter, []).append(within(r, slo))
    return mean([float(sum(hits) / len(hits) > goal) for hits in by.values()])


def serviceable_rate(measure: Callable[[float], dict], slo: SLO, lo: float, hi: float,
                     iters: int = 6) -> tuple[float, list[tuple[float, dict]]]:
    """The highest rate in [lo, hi] whose summary `meets` the SLO, and every
    (rate, summary) measured on the way.

    Assumes goodput is monotone in rate (meeting the SLO at r means meeting it
    below r), so it checks lo and hi, then bisects `iters` times: the answer is
    within (hi - lo) / 2**iters below the true threshold. Returns 0.0 when even
    lo misses the SLO and hi when hi meets it.
    """
    if not 0 < lo <= hi:
        raise ValueError(f"serviceable_rate needs 0 < lo <= hi, got lo={lo}, hi={hi}")
    history: list[tuple[float, dict]] = []

    def ok(rate: float) -> bool:
        summary = measure(rate)
        history.append((rate, summary))
        return meets(summary, slo)

    if not ok(lo):
        return 0.0, history
    if hi == lo or ok(hi):
        return hi, history
    return bisect_rate(ok, lo, hi, iters), history


def bracket_rate(ok: Callable[[float], bool], start: float, steps: int = 8, iters: int = 2,
                 factor: float = 2.0) -> float:
    """The highest rate `ok` accepts, when no range is known to hold it: from `start`,
    step up by `factor` while rates are accepted (down while they are not) until one
    of each is found, `steps` tries at most, then bisect `iters` times between them.
    0.0 if even start / factor**(steps - 1) is refused; the highest rate tried if
    every one was accepted (the search's ceiling, a lower bound, not a measurement).
    Assumes, as serviceable_rate does, that accepting r means accepting below r."""
    good = bad = None
    rate = start
    for _ in range(steps):
        if ok(rate):
            good = rate
            if bad is not None:
                break
            rate *= factor
        else:
            bad = rate
            if good is not None:
                break
            rate /= factor
    if good is None:
        return 0.0
    if bad is None:
        return good
    return bisect_rate(ok, good, bad, iters)


def bisect_rate(ok: Callable[[float], bool], good: float, bad: float, iters: int) -> float:
    """Halve [good, bad] `iters` times (`ok(good)` held, `ok(bad)` did not); the last good rate."""
    for _ in range(iters):
        mid = (good + bad) / 2
        if ok(mid):
            good = mid
        else:
            bad = mid
    return good
