"""The loop every engine shares: schedule → execute → update.

`EngineCore` wires the scheduler and the tiered cache to an `Executor` (the
model, or a cost model), a `Mover` (real copies, or a modelled link), an
adapter budget (the LoRA backend's) and a `Clock`. The real engine
(`LLMEngine`) builds on it with a tokenizer, a detokenizer, an adapter
registry and validation; the simulator (`SimEngine`) with its cost model.
Policy and mechanism meet only here and in the plan and result records.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from loraserve.cache.mover import Mover
from loraserve.cache.tiered import TieredCacheManager
from loraserve.clock import Clock
from loraserve.config import CacheConfig, SchedulerConfig
from loraserve.engine.executor import Executor
from loraserve.engine.isolation import execute_isolated
from loraserve.engine.plan import StepPlan
from loraserve.engine.scheduler import AdapterBudget, Scheduler
from loraserve.request import Request


@dataclass
class StepOutcome:
    plan: StepPlan
    touched: list[Request] = field(default_factory=list)
    """Requests that got a token this step (some of them now finished)."""

    failed: list[Request] = field(default_factory=list)
    """Requests that failed this step, in planning or in the executor (finish reason ERROR)."""


class EngineCore:
    def __init__(self, cache_config: CacheConfig, scheduler_config: SchedulerConfig, num_blocks: int,
                 num_host_blocks: int, block_bytes: int, max_model_len: int, clock: Clock, mover: Mover,
                 executor: Executor, adapter_budget: AdapterBudget) -> None:
        self.clock = clock
        self.max_model_len = max_model_len
        self.block_bytes = block_bytes
        self.executor = executor
        self.mover = mover
        self.cache = TieredCacheManager(cache_config, num_blocks, num_host_blocks, block_bytes, clock, mover)
        self.scheduler = Scheduler(scheduler_config, self.cache, adapter_budget, clock, max_model_len)

    def has_unfinished(self) -> bool:
        return self.scheduler.has_unfinished()

    def idle_tick(self) -> None:
        """Let the swapper run while no request is in flight (idle prefetch)."""
        self.cache.tick(0)

    def run_step(self) -> StepOutcome:
        """One step. A request whose planning or computation raises fails alone
        (`engine/isolation.py`); an exception from here means the engine is broken."""
        plan = self.scheduler.schedule()
        result = execute_isolated(self.executor, plan)
        for request_id, error in result.failed.items():
            self.scheduler.fail(request_id, error)
        touched = self.scheduler.update(plan, result)
        failed = [self.scheduler.requests[rid] for rid in (*plan.failed, *result.failed)]
        return StepOutcome(plan, touched, failed)

    def abort(self, request_id: str) -> None:
        req = self.scheduler.abort(request_id)
        if req is not None:
            self.forget(req)

    def forget(self, req: Request) -> None:
        """Drop a finished request's state once its last output is out."""
        self.executor.release([req.request_id])
        self.scheduler.forget(req.request_id)
