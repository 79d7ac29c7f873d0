"""PNG figures of benchmark results: latency against load, latency CDFs, memory over time.

Built on `matplotlib.figure.Figure` (rendered by Agg) rather than pyplot, so
plotting sets no global backend and holds no figure open after it returns.
Latencies are drawn in milliseconds, memory in MiB.
"""

from __future__ import annotations

from pathlib import Path

from matplotlib.figure import Figure

from loraserve.bench.metrics import RequestRecord
from loraserve.bench.scrape import memory_by_kind

MS = 1000.0
MIB = float(1 << 20)


def _save(fig: Figure, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    return path


def latency_vs_rate(systems: dict[str, list[tuple[float, dict]]], path: str | Path) -> Path:
    """TTFT and TPOT (mean solid, P95 dashed) against request rate, one colour per
    system; input: {system: [(rate, summary), ...]} as `summarize` returns them."""
    fig = Figure(figsize=(10, 4), layout="constrained")
    axes = fig.subplots(1, 2)
    for ax, metric, title in zip(axes, ("ttft_s", "tpot_s"), ("Time to first token", "Time per output token")):
        for i, (system, points) in enumerate(systems.items()):
            points = sorted(points, key=lambda p: p[0])
            for stat, style in (("mean", "-"), ("p95", "--")):
                xy = [(r, s[metric][stat] * MS) for r, s in points if s[metric][stat] is not None]
                if xy:
                    ax.plot(*zip(*xy), style, marker="o", color=f"C{i}", label=f"{system} {stat}")
        ax.set(title=title, xlabel="rate (sessions/s)", ylabel=f"{metric[:4].upper()} (ms)")
        ax.grid(alpha=0.3)
        if ax.has_data():
            ax.legend(fontsize="small")
    return _save(fig, path)


def _cdf(ax, values: list[float], label: str, color: str) -> None:
    xs = sorted(v * MS for v in values)
    if xs:
        ax.step(xs, [(i + 1) / len(xs) for i in range(len(xs))], where="post", label=label, color=color)


def latency_cdfs(systems: dict[str, list[RequestRecord]], path: str | Path) -> Path:
    """Empirical CDFs of TTFT and TPOT over successful requests, one line per system."""
    fig = Figure(figsize=(10, 4), layout="constrained")
    axes = fig.subplots(1, 2)
    for i, (system, records) in enumerate(systems.items()):
        done = [r for r in records if r.ok]
        _cdf(axes[0], [r.ttft for r in done], system, f"C{i}")
        _cdf(axes[1], [r.tpot for r in done if r.tpot is not None], system, f"C{i}")
    for ax, name in zip(axes, ("TTFT", "TPOT")):
        ax.set(title=f"{name} CDF", xlabel=f"{name} (ms)", ylabel="fraction of requests", ylim=(0, 1.02))
        ax.grid(alpha=0.3)
        if ax.has_data():
            ax.legend(fontsize="small")
    return _save(fig, path)


def memory_over_time(series: list[dict], path: str | Path, tier: str = "device") -> Path:
    """Bytes by kind over time, stacked: scraped /metrics samples (the
    `loraserve_cache_bytes` gauges of `tier`) or rows of {"t": s, "<kind>": bytes}.
    A `free` kind is not stacked (it would dwarf the rest); the capacity goes in the title."""
    rows = memory_by_kind(series, tier)
    kinds = sorted({k for row in rows for k in row if k not in ("t", "free")})
    fig = Figure(figsize=(8, 4), layout="constrained")
    ax = fig.subplots()
    if rows and kinds:
        ts = [row["t"] for row in rows]
        used = [[row.get(k, 0.0) / MIB for row in rows] for k in kinds]
        ax.stackplot(ts, *used, labels=kinds, alpha=0.8)
        ax.legend(fontsize="small", loc="upper left")
    title = f"{tier} memory by kind"
    if any("free" in row for row in rows):
        capacity = max(sum(row.get(k, 0.0) for k in kinds) + row.get("free", 0.0) for row in rows) / MIB
        title += f" (capacity {capacity:.0f} MiB)"
    ax.set(title=title, xlabel="time (s)", ylabel="memory (MiB)")
    ax.grid(alpha=0.3)
    return _save(fig, path)


def grouped_bars(groups: dict[str, dict[str, float | None]], path: str | Path, ylabel: str, title: str,
                 log: bool = False) -> Path:
    """One cluster of bars per group (e.g. a model), one colour per series (e.g. a
    deployment): {group: {series: value}}; a missing or None value leaves a gap."""
    series = list(dict.fromkeys(s for g in groups.values() for s in g))
    fig = Figure(figsize=(max(6, 1.6 * len(groups) + 2), 4), layout="constrained")
    ax = fig.subplots()
    width = 0.8 / max(1, len(series))
    for j, s in enumerate(series):
        xs = [i + (j - (len(series) - 1) / 2) * width for i in range(len(groups))]
        ys = [g.get(s) for g in groups.values()]
        ax.bar([x for x, y in zip(xs, ys) if y is not None], [y for y in ys if y is not None], width,
               label=s, color=f"C{j}")
    ax.set_xticks(range(len(groups)), list(groups), fontsize="small")
    ax.set(ylabel=ylabel, title=title)
    if log:
        ax.set_yscale("log")
    ax.grid(alpha=0.3, axis="y")
    if ax.has_data():
        ax.legend(fontsize="small")
    return _save(fig, path)
