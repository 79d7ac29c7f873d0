"""Hardware profiles: the numbers a roofline needs, plus efficiency factors.

Peaks come from datasheets (dense bf16 tensor FLOP/s, HBM bandwidth, PCIe
and NVLink per GPU). What a real engine reaches is a fraction of them plus
fixed costs per step, per sequence and per token (kernel launches, Python,
sampling); those are the efficiency and overhead fields, which
`loraserve simulate calibrate` fits to step times measured on a real engine.
The defaults for GPUs are typical of vLLM-class engines, not measurements.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

GB = 1e9
GiB = 2**30


@dataclass(frozen=True)
class Hardware:
    name: str
    flops: float
    """Peak dense FLOP/s at the serving dtype."""

    mem_bw: float
    """Device memory bandwidth, bytes/s."""

    mem_bytes: float
    """Device memory per accelerator."""

    pcie_bw: float
    """Host ↔ device copy bandwidth, bytes/s (what swaps between tiers run at)."""

    pcie_latency: float = 10e-6
    interconnect_bw: float = 0.0
    """Per-accelerator bandwidth to its tensor-parallel peers (NVLink), bytes/s."""

    interconnect_latency: float = 5e-6
    disk_bw: float = 2 * GB
    """Reading an adapter that is on neither tier."""

    flops_eff: float = 0.6
    bw_eff: float = 0.8
    step_overhead: float = 1e-3
    seq_overhead: float = 10e-6
    token_overhead: float = 0.0

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(asdict(self), indent=2) + "\n")

    @classmethod
    def load(cls, path: str | Path) -> Hardware:
        return cls(**json.loads(Path(path).read_text()))


PROFILES: dict[str, Hardware] = {
    "a100-80g": Hardware("a100-80g", flops=312e12, mem_bw=2039 * GB, mem_bytes=80 * GiB, pcie_bw=25 * GB,
                         interconnect_bw=300 * GB),
    "h100": Hardware("h100", flops=989e12, mem_bw=3350 * GB, mem_bytes=80 * GiB, pcie_bw=50 * GB,
                     interconnect_bw=450 * GB),
    "h800": Hardware("h800", flops=989e12, mem_bw=3350 * GB, mem_bytes=80 * GiB, pcie_bw=50 * GB,
                     interconnect_bw=200 * GB),
    # the 96 GB Hopper of InfiniLoRA's 4 × 4-GPU cluster (papers.md 2.7 leaves the part unnamed; H20 is the
    # 96 GB Hopper sold where the authors work, with the paper's 900 GB/s NVLink; the cluster simulator takes
    # its links from sim/exchange.py's LINKS)
    "h20": Hardware("h20", flops=148e12, mem_bw=4000 * GB, mem_bytes=96 * GiB, pcie_bw=50 * GB,
                    interconnect_bw=450 * GB),
    # the 24 GB PCIe inference part fleets of small-model replicas run on (datasheet: 125 TFLOP/s dense
    # bf16 tensor, 600 GB/s GDDR6, PCIe 4 x16, no NVLink): an 8B model's weights leave it ~6.6 GiB of device tier
    "a10": Hardware("a10", flops=125e12, mem_bw=600 * GB, mem_bytes=24 * GiB, pcie_bw=25 * GB),
    # a 2-core CPU with torch (peaks from the team's environment notes; `calibrate` fits yours): the "device"
    # is an arena in RAM, so a swap is a memcpy; fp32 matmul peak, measured read bandwidth. A copy
    # job's latency is the mover thread's hand-off: it waits for the GIL, which the engine thread
    # gives up only every few ms (measured: 1-5 ms per job)
    "cpu": Hardware("cpu", flops=150e9, mem_bw=37 * GB, mem_bytes=24 * GiB, pcie_bw=17 * GB, pcie_latency=1e-3,
                    disk_bw=1 * GB, flops_eff=0.5, bw_eff=0.7, step_overhead=5e-3, seq_overhead=200e-6,
                    token_overhead=50e-6),
}


def hardware(name_or_path: str) -> Hardware:
    """A profile by name, or a JSON file written by `calibrate`."""
    if name_or_path in PROFILES:
        return PROFILES[name_or_path]
    path = Path(name_or_path)
    if path.is_file():
        return Hardware.load(path)
    raise ValueError(f"unknown hardware {name_or_path!r}: one of {', '.join(PROFILES)} or a profile JSON file")

