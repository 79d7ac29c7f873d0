"""One simulated run: a workload through SimEngine, measured like a real one."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from loraserve.bench.metrics import SLO, RequestRecord, summarize
from loraserve.model.spec import ModelSpec
from loraserve.request import Request
from loraserve.sim.engine import SimConfig, SimEngine
from loraserve.sim.hardware import Hardware
from loraserve.sim.models import lora_params
from loraserve.sim.replay import replay
from loraserve.workload import Workload


def to_records(requests: list[Request], t0: float = 0.0) -> list[RequestRecord]:
    """Engine requests (ids `s{session}-t{turn}`) as the benchmark harness's records."""
    out = []
    for r in requests:
        session, turn = (int(x[1:]) for x in r.request_id.split("-"))
        out.append(RequestRecord(r.request_id, session, turn, r.adapter_name, r.arrival_time - t0,
                                 None if r.first_token_time is None else r.first_token_time - t0,
                                 None if r.finish_time is None else r.finish_time - t0,
                                 input_len=r.num_prompt_tokens, output_len=r.num_output_tokens))
    return out


def adapter_sizes(names: list[str], spec: ModelSpec, rank: int, dtype_bytes: int = 2) -> dict[str, int]:
    return {name: lora_params(spec, rank) * dtype_bytes for name in names}


@dataclass
class SimResult:
    records: list[RequestRecord]
    summary: dict
    stats: dict
    """The cache manager's cumulative stats at the end (hit rates, swap bytes, ...)."""

    memory: list[dict] = field(default_factory=list)
    """Device bytes by kind, about once per simulated second."""

    wall_s: float = 0.0


def simulate(workload: Workload, spec: ModelSpec, hw: Hardware, cfg: SimConfig, adapters: dict[str, int],
             slo: SLO | None = None, progress=None) -> SimResult:
    start = time.perf_counter()
    engine = SimEngine(spec, hw, cfg, adapters)
    memory: list[dict] = []

    def look(t: float) -> None:
        sizes = engine.cache.bytes_by_kind()
        memory.append({"t": t, **{k[len("device_bytes_"):]: v for k, v in sizes.items()
                                  if k.startswith("device_bytes_") and k != "device_bytes_total"}})

    requests = replay(engine, workload, progress=progress, monitor=look)
    records = to_records(requests)
    return SimResult(records, summarize(records, slo), engine.cache.stats(), memory, time.perf_counter() - start)

