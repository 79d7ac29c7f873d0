"""The benchmark harness: replay a workload against an OpenAI-compatible server,
summarize latencies against an SLO, search for the serviceable rate, plot.

Names load lazily: the simulator uses `metrics` without the HTTP client's
dependencies (httpx) installed. `plots` (matplotlib) and `cli` are imported on
their own, not from here.
"""

from __future__ import annotations

import importlib

_WHERE = {"BenchResult": "client", "run_workload": "client", "run_workload_sync": "client",
          "SLO": "metrics", "RequestRecord": "metrics", "percentile": "metrics", "serviceable_rate": "metrics",
          "summarize": "metrics"}
__all__ = sorted(_WHERE)


def __getattr__(name: str):
    if name in _WHERE:
        return getattr(importlib.import_module(f"loraserve.bench.{_WHERE[name]}"), name)
    raise AttributeError(f"module 'loraserve.bench' has no attribute {name!r}")
