"""Workloads: arrivals, adapter popularity, multi-turn sessions, traces."""

from loraserve.workload.arrivals import ArrivalConfig, arrival_times
from loraserve.workload.content import input_ids, input_text
from loraserve.workload.popularity import Popularity, PopularityConfig
from loraserve.workload.workload import Lengths, Turn, Workload, WorkloadConfig, from_trace, generate

__all__ = ["ArrivalConfig", "arrival_times", "input_ids", "input_text", "Popularity", "PopularityConfig",
           "Lengths", "Turn", "Workload", "WorkloadConfig", "from_trace", "generate"]
