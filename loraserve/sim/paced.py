"""Executors and movers that keep virtual time.

`PacedExecutor` wraps any executor and advances a ManualClock by the cost
model's time for each step; `PacedMover` wraps any mover and reports a copy
done only when the modelled link would have finished it. Wrapping the real
engine's TorchExecutor and TorchMover this way gives a real engine whose
decisions depend on modelled times only: it must decide exactly as the
simulator does, which `tests/test_sim.py` checks. `NullExecutor` is the
simulator's model: it computes nothing and samples a fixed token.
"""

from __future__ import annotations

from loraserve.cache.mover import CopyJob, LinkMover, Mover
from loraserve.clock import ManualClock
from loraserve.engine.plan import SampledToken, StepPlan, StepResult
from loraserve.sim.cost import StepCost, StepWork

SIM_TOKEN = 1000
"""What the simulated model says, every time. Only lengths matter to the policies."""


class NullExecutor:
    def execute(self, plan: StepPlan) -> StepResult:
        return StepResult({q.request_id: SampledToken(SIM_TOKEN) for q in plan.seqs if q.samples})

    def probe(self) -> None:
        pass

    def release(self, request_ids: list[str]) -> None:
        pass


class PacedExecutor:
    def __init__(self, inner, cost: StepCost, clock: ManualClock) -> None:
        """cost: what prices a step (`step_time(plan)`): a StepCost, or a SimEngine (which adds
        the stall of a load the step must wait for)."""
        self.inner = inner
        self.cost = cost
        self.clock = clock

    def execute(self, plan: StepPlan) -> StepResult:
        seconds = self.cost.step_time(plan)  # before the step: it reads num_computed_tokens
        result = self.inner.execute(plan)
        self.clock.advance(seconds)
        result.elapsed = seconds
        return result

    def __getattr__(self, name: str):  # the rest of the inner executor's interface (release, tiers, ...)
        return getattr(self.inner, name)


class RecordingExecutor:
    """Keeps the work of every step (empty ones too): calibration pairs it with
    the step's measured time."""

    def __init__(self, inner, cost: StepCost) -> None:
        self.inner = inner
        self.cost = cost
        self.works: list[StepWork] = []

    def execute(self, plan: StepPlan) -> StepResult:
        self.works.append(self.cost.work(plan))
        return self.inner.execute(plan)

    def __getattr__(self, name: str):
        return getattr(self.inner, name)


class PacedMover:
    """Done when both the real copy and the modelled link are done (the simulator,
    having no real copies, uses the LinkMover alone)."""

    def __init__(self, inner: Mover, link: LinkMover) -> None:
        self.inner = inner
        self.link = link
        self._real_done: set[int] = set()
        """Jobs the inner mover reported finished that the link has not yet released."""

    def submit(self, job: CopyJob) -> None:
        self.link.submit(job)
        self.inner.submit(job)

    def _await_real(self, job_id: int) -> None:
        self._real_done.update(self.inner.poll())
        if job_id not in self._real_done:
            self.inner.wait(job_id)
            self._real_done.update(self.inner.poll())

    def poll(self) -> list[int]:
        done = self.link.poll()
        for job_id in done:
            self._await_real(job_id)
            self._real_done.discard(job_id)
        return done

    def wait(self, job_id: int) -> None:
        self.link.wait(job_id)
        self._await_real(job_id)

    def next_finish(self) -> float | None:
        return self.link.next_finish()

    def close(self) -> None:
        self.inner.close()


def pace_engine(engine, cost: StepCost) -> None:
    """Put a real LLMEngine on virtual time: its steps advance its ManualClock by
    the modelled time and its copies finish when the modelled link says. What
    it computes is unchanged; only when things happen is modelled."""
    if not isinstance(engine.clock, ManualClock):
        raise ValueError("pace_engine needs an engine built with a ManualClock")
    engine.executor = PacedExecutor(engine.executor, cost, engine.clock)
    engine.mover = engine.cache.mover = PacedMover(engine.mover, LinkMover(engine.clock, duration=cost.copy_time))
