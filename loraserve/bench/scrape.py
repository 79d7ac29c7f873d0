"""Server state over time: a Prometheus /metrics endpoint polled during a run.

Each sample is a flat dict `{"t": seconds, "<name>{<labels>}": value, ...}`,
labels sorted, histogram buckets left out, so any exporter works and a run
against a server without /metrics just has an empty series.
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import Callable

import httpx

_SAMPLE = re.compile(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{[^}]*\})?\s+(\S+)")
_LABEL = re.compile(r'([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\]|\\.)*)"')
CACHE_BYTES = "loraserve_cache_bytes"


def parse_prometheus(text: str) -> dict[str, float]:
    """Samples of the text exposition format, keyed `name{k="v",...}` (labels sorted)."""
    out: dict[str, float] = {}
    for line in text.splitlines():
        m = _SAMPLE.match(line)
        if not m or m.group(1).endswith(("_bucket", "_created")):
            continue
        try:
            value = float(m.group(3))
        except ValueError:
            continue
        labels = sorted(_LABEL.findall(m.group(2) or ""))
        key = m.group(1) + ("{" + ",".join(f'{k}="{v}"' for k, v in labels) + "}" if labels else "")
        out[key] = value
    return out


def labels_of(key: str) -> tuple[str, dict[str, str]]:
    """The name and labels of a sample key."""
    name, _, rest = key.partition("{")
    return name, dict(_LABEL.findall(rest))


def memory_by_kind(series: list[dict], tier: str = "device") -> list[dict]:
    """`{"t", <kind>: bytes}` rows from scraped `loraserve_cache_bytes{tier,kind}`
    gauges (other scraped samples are dropped); a row with no labelled key is
    taken to be by kind already and passes through."""
    rows = []
    for sample in series:
        if not any("{" in key for key in sample):
            rows.append(dict(sample))
            continue
        row = {"t": sample["t"]}
        for key, value in sample.items():
            name, labels = labels_of(key)
            if name == CACHE_BYTES and labels.get("tier") == tier:
                row[labels.get("kind", "?")] = value
        rows.append(row)
    return rows


async def scrape(http: httpx.AsyncClient, url: str, clock: Callable[[], float], interval: float,
                 stop: asyncio.Event, series: list[dict]) -> None:
    """Append one sample to `series` every `interval` seconds until `stop` is set.
    A scrape that fails (no endpoint, not Prometheus text) is skipped."""
    while not stop.is_set():
        try:
            resp = await http.get(url, timeout=max(interval, 1.0))
            sample = parse_prometheus(resp.text) if resp.status_code == 200 else {}
        except httpx.HTTPError:
            sample = {}
        if sample:
            series.append({"t": clock(), **sample})
        try:
            await asyncio.wait_for(stop.wait(), interval)
        except TimeoutError:
            pass
