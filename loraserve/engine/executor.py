"""The mechanism side of a step, behind one small interface.

The real engine plugs in `TorchExecutor`; the simulator plugs in a cost model.
The scheduler never sees which. Block copies between tiers are the mover's
(`cache/mover.py`), not the executor's.
"""

from __future__ import annotations

from typing import Protocol

from loraserve.engine.plan import StepPlan, StepResult


class Executor(Protocol):
    def execute(self, plan: StepPlan) -> StepResult:
        """Load the plan's new adapters, run the step, sample."""
        ...

    def probe(self) -> None:
        """Raise if the executor itself is broken (not one request's fault)."""
        ...

    def release(self, request_ids: list[str]) -> None:
        """Forget per-request state (e.g. seeded generators) of finished requests."""
        ...
