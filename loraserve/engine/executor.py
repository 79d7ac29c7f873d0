"""The mechanism side of a step, behind one small interface.

The real engine plugs in `TorchExecutor`; the simulator plugs in a cost model.
The scheduler never sees which.
"""

from __future__ import annotations

from typing import Protocol

from loraserve.engine.plan import StepPlan, StepResult


class Executor(Protocol):
    def execute(self, plan: StepPlan) -> StepResult:
        """Load the plan's adapters into their slots, run the step, sample."""
        ...

    def copy_blocks(self, src_tier: str, dst_tier: str, pairs: list[tuple[int, int]]) -> None:
        """Copy blocks (KV or adapter rank slices alike) between tiers ("device", "host"):
        (src block, dst block) pairs."""
        ...

    def release(self, request_ids: list[str]) -> None:
        """Forget per-request state (e.g. seeded generators) of finished requests."""
        ...
