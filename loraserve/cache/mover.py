"""Moving blocks between tiers, behind one small interface.

The cache manager decides what moves and hands the mover `CopyJob`s; it learns
that a job is done by polling. The real engine's mover copies tensors on a
worker thread (`engine/torch_mover.py`); `LinkMover` here completes jobs after
the time a link of given bandwidth would take, on whatever clock it is given,
which is what the simulator and the policy tests need.
"""

from __future__ import annotations

import heapq
from dataclasses import dataclass
from typing import Callable, Protocol

from loraserve.clock import Clock, ManualClock


@dataclass(frozen=True)
class CopyJob:
    id: int
    src_tier: str
    """"device", "host", or "disk" (an adapter read from its directory)."""

    dst_tier: str
    src_blocks: tuple[int, ...]
    dst_blocks: tuple[int, ...]
    num_bytes: int
    adapter: str | None = None
    """Adapter id when the job moves adapter weights (needed to read from disk)."""


class Mover(Protocol):
    def submit(self, job: CopyJob) -> None:
        """Start the copy; returns at once."""
        ...

    def poll(self) -> list[int]:
        """Ids of jobs finished since the last poll, in completion order."""
        ...

    def wait(self, job_id: int) -> None:
        """Block until the job has finished (it is then reported by the next poll)."""
        ...


class LinkMover:
    """Jobs go one after another over one link: a job takes latency +
    bytes / bandwidth (or what `duration` says, e.g. a hardware model that
    knows disk reads are slower), starting when the previous one ends."""

    def __init__(self, clock: Clock, bytes_per_s: float = 16e9, latency: float = 0.0,
                 duration: Callable[[CopyJob], float] | None = None) -> None:
        self.clock = clock
        self.duration = duration or (lambda job: latency + job.num_bytes / bytes_per_s)
        self._busy_until = 0.0
        self._finish: dict[int, float] = {}
        self._queue: list[tuple[float, int]] = []  # (finish time, job id), a heap
        self.num_bytes = {"in": 0, "out": 0}
        self.loads_done_at = 0.0
        """When the last adapter load submitted so far lands on the device (what an engine
        that loads a step's adapters inside the step, as vLLM does, waits for)."""

    def submit(self, job: CopyJob) -> None:
        start = max(self.clock.now(), self._busy_until)
        self._busy_until = start + self.duration(job)
        self._finish[job.id] = self._busy_until
        heapq.heappush(self._queue, (self._busy_until, job.id))
        if job.adapter is not None and job.dst_tier == "device":
            self.loads_done_at = self._busy_until
        self.num_bytes["in" if job.dst_tier == "device" else "out"] += job.num_bytes

    def poll(self) -> list[int]:
        now, done = self.clock.now(), []
        while self._queue and self._queue[0][0] <= now:
            done.append(heapq.heappop(self._queue)[1])
            del self._finish[done[-1]]
        return done

    def next_finish(self) -> float | None:
        """When the next job in flight ends (None: the link is idle)."""
        return self._queue[0][0] if self._queue else None

    def wait(self, job_id: int) -> None:
        """On a manual clock, waiting is time passing."""
        finish = self._finish.get(job_id)
        if finish is None:
            return
        if isinstance(self.clock, ManualClock):
            self.clock.advance(max(0.0, finish - self.clock.now()))
        elif finish > self.clock.now():
            raise RuntimeError("LinkMover.wait needs a ManualClock to move time forward")
