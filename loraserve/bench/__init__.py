"""The benchmark harness: replay a workload against an OpenAI-compatible server,
summarize latencies against an SLO, search for the serviceable rate, plot.

`plots` (matplotlib) and `cli` are imported on their own, not from here.
"""

from loraserve.bench.client import BenchResult, run_workload, run_workload_sync
from loraserve.bench.metrics import SLO, RequestRecord, percentile, serviceable_rate, summarize

__all__ = ["SLO", "BenchResult", "RequestRecord", "percentile", "run_workload", "run_workload_sync",
           "serviceable_rate", "summarize"]
