"""Continuous batching over token budgets (policy: no torch, time from a Clock).

Each step: running requests first, oldest first (decodes cost one token, an
unfinished chunked prefill its next chunk); then waiting requests are admitted
in arrival order while the token budget, the seat limit, KV blocks and the
adapter budget allow. Admission asks the cache manager to match the request's
adapter and cached prefix: a request whose adapter or history KV must first be
copied to the device goes to the pending set until the copies land, and one
whose adapter is over budget or has no room is skipped; neither blocks the
queue. When a
running request cannot grow, the most recently admitted running request is
preempted: it lets go of its blocks (what it cached stays cached) and is
recomputed later from its tokens, mostly from cache.

A request whose planning raises fails alone (`plan.failed`) and planning goes
on with the others; see also `engine/isolation.py` for failures in a step.
"""

from __future__ import annotations

import logging
from collections import deque
from typing import Protocol

from loraserve.cache.manager import CacheManager
from loraserve.cache.tiered import Readiness
from loraserve.clock import Clock
from loraserve.config import SchedulerConfig
from loraserve.engine.plan import SampledToken, ScheduledSeq, StepPlan, StepResult
from loraserve.errors import Unavailable
from loraserve.request import FinishReason, Request, RequestStatus

log = logging.getLogger(__name__)

_SKIP, _FULL = object(), object()
"""Admission outcomes besides a token count (see Scheduler._admit_one)."""


class AdapterBudget(Protocol):
    """Distinct adapters that running requests may use at once (each step
    batches only those). `LoraSlots` is the local backend's; the scheduler
    never learns where an adapter's weights sit."""

    def can_acquire(self, adapter: str) -> bool: ...

    def acquire(self, adapter: str) -> bool:
        """Count a running request of the adapter; True if its weights must be loaded."""
        ...

    def release(self, adapter: str) -> None: ...


class Scheduler:
    def __init__(
        self,
        config: SchedulerConfig,
        cache: CacheManager,
        adapters: AdapterBudget,
        clock: Clock,
        max_model_len: int,
    ) -> None:
        self.config = config
        self.cache = cache
        self.adapters = adapters
        """How many distinct adapters running requests may use (the LoRA backend's answer)."""
        self.clock = clock
        self.max_model_len = max_model_len
        self.waiting: deque[Request] = deque()
        self.pending: list[Request] = []
        """Admitted in principle, waiting for their adapter or KV to reach the device."""
        self.running: list[Request] = []
        self.requests: dict[str, Request] = {}
        self.num_preemptions = 0
        self.num_lora_hits = 0
        """Admissions whose adapter the LoRA backend already held."""
        self.num_lora_loads = 0
        """Admissions whose adapter the LoRA backend had to load."""
        self.log: list[tuple] | None = None
        """When a list: (time, event, request id) for every admit, pend and preempt."""

    def _note(self, event: str, req: Request) -> None:
        if self.log is not None:
            self.log.append((self.clock.now(), event, req.request_id))

    # -- queue -------------------------------------------------------------

    def add(self, request: Request) -> None:
        if request.request_id in self.requests:
            raise ValueError(f"request id {request.request_id!r} is already in use")
        self.requests[request.request_id] = request
        self.waiting.append(request)

    def abort(self, request_id: str) -> Request | None:
        req = self.requests.get(request_id)
        if req is not None and not req.is_finished:
            self._finish(req, FinishReason.ABORT)
        return req

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.pending or self.running)

    # -- planning ----------------------------------------------------------

    def schedule(self) -> StepPlan:
        self.cache.tick(len(self.running))
        self._wake_pending()
        plan = StepPlan()
        budget = self.config.max_num_batched_tokens
        for req in list(self.running):
            if req.status != RequestStatus.RUNNING:
                continue  # preempted earlier in this loop
            try:
                budget -= self._schedule_running(req, budget, plan)
            except Exception as e:
                self._planning_failed(req, e, plan)
        if not plan.preempted:  # memory is short: admitting now would only churn
            if self.config.order == "sjf":
                self.waiting = deque(sorted(self.waiting, key=_job_size))
            self._admit(plan, budget)
        return plan

    def _schedule_running(self, req: Request, budget: int, plan: StepPlan) -> int:
        """Plan a running request's next tokens; returns how many."""
        num_new = min(req.num_tokens - req.num_computed_tokens, budget)
        if num_new <= 0 or not self._make_room(req, num_new, plan):
            return 0
        self.cache.allocate(req, num_new)
        plan.seqs.append(ScheduledSeq.of(req, num_new))
        return num_new

    def _planning_failed(self, req: Request, error: Exception, plan: StepPlan) -> None:
        log.error("planning request %s failed", req.request_id, exc_info=error)
        plan.seqs = [q for q in plan.seqs if q.request_id != req.request_id]
        plan.failed[req.request_id] = error
        self.fail(req.request_id, error)

    def _make_room(self, req: Request, num_new: int, plan: StepPlan) -> bool:
        """Preempt from the back of the running list until `req` fits; False if
        `req` itself had to go."""
        while not self.cache.can_allocate(req, num_new):
            victim = self.running[-1]
            self._preempt(victim)
            plan.preempted.append(victim.request_id)
            if victim is req:
                return False
        return True

    def _wake_pending(self) -> None:
        """Requests whose copies have landed go back to the head of the queue."""
        now = self.clock.now()
        woken, still = [], []
        for req in self.pending:
            if not self.cache.copies_done(req):
                still.append(req)
                continue
            waited = now - req.pending_since
            adapter, _ = self.cache.waited_for(req)
            if adapter:
                req.lora_wait += waited
            else:
                req.kv_wait += waited
            woken.append(req)
        self.pending = still
        self.waiting.extendleft(reversed(woken))

    def _admit(self, plan: StepPlan, budget: int) -> None:
        skipped: list[Request] = []
        while self.waiting and budget > 0 and len(self.running) < self.config.max_num_seqs:
            req = self.waiting.popleft()
            try:
                outcome = self._admit_one(req, budget, plan)
            except Exception as e:
                self._planning_failed(req, e, plan)
                continue
            if outcome is _SKIP:
                skipped.append(req)
            elif outcome is _FULL:
                break
            else:
                budget -= outcome
        self.waiting.extendleft(reversed(skipped))

    def _admit_one(self, req: Request, budget: int, plan: StepPlan) -> int | object:
        """Admit the request at the head of the queue. Returns the tokens it was
        scheduled for (0: it went pending), _SKIP (it waits, the queue goes on)
        or _FULL (it waits at the head, admission stops)."""
        if req.adapter is not None and not self.adapters.can_acquire(req.adapter):
            return _SKIP
        state = self.cache.prepare(req)
        if state is Readiness.WAITING:
            req.pending_since = self.clock.now()
            self.pending.append(req)
            self._note("pend", req)
            return 0
        if state is Readiness.NO_ROOM:
            return _SKIP
        num_new = min(req.num_tokens - req.num_computed_tokens, budget)
        if not self.cache.can_allocate(req, num_new):
            # memory is short: wait at the head of the queue, pinning nothing
            self.cache.free(req)
            req.num_computed_tokens = 0
            self.waiting.appendleft(req)
            return _FULL
        self.cache.allocate(req, num_new)
        blocks = self.cache.adapter_blocks(req.adapter) if req.adapter is not None else []
        # from here on nothing raises before the request is running, so a failure releases what it holds
        if req.adapter is not None and self.adapters.acquire(req.adapter):
            plan.lora_loads.append((req.adapter, blocks))
            self.num_lora_loads += 1
        elif req.adapter is not None:
            self.num_lora_hits += 1
        req.status = RequestStatus.RUNNING
        self.running.append(req)
        self._note("admit", req)
        if req.first_scheduled_time is None:
            req.first_scheduled_time = self.clock.now()
        plan.seqs.append(ScheduledSeq.of(req, num_new))
        return num_new

    def _preempt(self, req: Request) -> None:
        self._note("preempt", req)
        self.running.remove(req)
        self.cache.free(req)
        if req.adapter is not None:
            self.adapters.release(req.adapter)
        req.status = RequestStatus.PREEMPTED
        req.num_computed_tokens = 0
        req.num_preemptions += 1
        self.num_preemptions += 1
        self.waiting.appendleft(req)

    # -- results -----------------------------------------------------------

    def update(self, plan: StepPlan, result: StepResult) -> list[Request]:
        """Advance every scheduled request; returns those that got a token."""
        now = self.clock.now()
        touched = []
        for seq in plan.seqs:
            req = self.requests.get(seq.request_id)
            if req is None or req.is_finished:  # aborted while the step ran
                continue
            req.num_computed_tokens += seq.num_new_tokens
            self.cache.commit(req)
            token = result.sampled.get(req.request_id)
            if token is None:
                continue
            self._append(req, token, now)
            touched.append(req)
        return touched

    def _append(self, req: Request, token: SampledToken, now: float) -> None:
        req.output_token_ids.append(token.token_id)
        if token.logprob is not None:
            req.output_logprobs.append(token.logprob)
        if token.top_logprobs is not None:
            req.output_top_logprobs.append(token.top_logprobs)
        if req.first_token_time is None:
            req.first_token_time = now
        if token.token_id in req.stop_token_ids:
            self._finish(req, FinishReason.STOP)
        elif req.num_output_tokens >= req.sampling.max_tokens or req.num_tokens >= self.max_model_len:
            self._finish(req, FinishReason.LENGTH)

    def fail(self, request_id: str, error: str | Exception) -> None:
        """Finish a request the engine could not serve; `error` says why (an
        `Unavailable` one makes it a 503: retry later)."""
        req = self.requests[request_id]
        req.error = error if isinstance(error, str) else f"{type(error).__name__}: {error}"
        req.error_status = 503 if isinstance(error, Unavailable) else 500
        if req.is_finished:  # e.g. its last output could not be detokenized: its blocks are already free
            req.finish_reason = FinishReason.ERROR
        else:
            self._finish(req, FinishReason.ERROR)

    def finish(self, request_id: str, reason: FinishReason) -> None:
        """Finish a request for a reason found outside the scheduler (a stop string)."""
        req = self.requests[request_id]
        if not req.is_finished:
            self._finish(req, reason)

    def _finish(self, req: Request, reason: FinishReason) -> None:
        if req in self.running:
            self.running.remove(req)
            self.cache.free(req)
            if req.adapter is not None:
                self.adapters.release(req.adapter)
        else:  # waiting or pending: it may hold a matched prefix
            if req in self.waiting:
                self.waiting.remove(req)
            elif req in self.pending:
                self.pending.remove(req)
            self.cache.free(req)
        req.status = RequestStatus.FINISHED
        req.finish_reason = reason
        req.finish_time = self.clock.now()

    def forget(self, request_id: str) -> None:
        """Drop a finished request from the index once its output was delivered."""
        req = self.requests.get(request_id)
        if req is not None and req.is_finished:
            del self.requests[request_id]


def _job_size(req: Request) -> int:
    """Tokens left to compute: the rest of the prompt and of max_tokens (stable sort keeps arrival order on ties)."""
    return req.num_tokens - req.num_computed_tokens + req.sampling.max_tokens - req.num_output_tokens
