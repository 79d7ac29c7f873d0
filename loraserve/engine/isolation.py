"""Running a step so that a failure fails only the requests that cause it.

A step batches many requests into one forward pass, so an exception from it (a
kernel error, an out-of-memory, a corrupt adapter slot) does not say whose row
caused it. But a step is safe to run again on part of its sequences: the
executor writes each sequence's KV at positions nobody else owns, the LoRA
backend loads its slots from device blocks, and sampling comes only after
the forward, and none of it
counts as done until the scheduler commits the result. So a failed step runs
again in halves, and a half that fails again is halved in turn: a single
sequence that still fails is the culprit. The others get their tokens as if
nothing had happened, after O(k log n) extra passes for k culprits; a fault
that depends on the batch (an out-of-memory) goes away in the smaller parts
and fails nobody.

When every sequence fails, the executor's `probe` tells a broken engine (a
sticky device error: it raises, and the engine stops to be restarted) from a
step of bad requests (it passes, and they alone fail).

Not undone on a rerun: a seeded row's generator that had already drawn when
sampling raised draws again (sampling itself does not raise on degenerate
distributions, so only a bug gets there).
"""

from __future__ import annotations

import logging

from loraserve.engine.executor import Executor
from loraserve.engine.plan import ScheduledSeq, StepPlan, StepResult
from loraserve.errors import Unavailable

log = logging.getLogger(__name__)


def execute_isolated(executor: Executor, plan: StepPlan) -> StepResult:
    """`executor.execute(plan)`, with the sequences it cannot compute in
    `result.failed` instead of an exception. Raises only if a plan with no
    sequences (LoRA loads alone) fails: then there is no one to blame."""
    try:
        return executor.execute(plan)
    except Unavailable as error:  # the LoRA server is down: every adapter row would fail alike
        log.error("the LoRA server is unavailable: failing the step's adapter requests (%s)", error)
        return _without_adapters(executor, plan, error)
    except Exception as error:
        if not plan.seqs:
            raise
        log.error("a step of %d requests failed; rerunning it in parts to find the requests that fail it",
                  len(plan.seqs), exc_info=error)
        result = StepResult()
        _split(executor, plan, plan.seqs, error, result)
        for request_id, why in result.failed.items():
            log.error("request %s failed: %s", request_id, why)
        if len(result.failed) == len(plan.seqs):
            executor.probe()  # nothing ran: if the device itself is broken, this raises and the engine stops
        return result


def _without_adapters(executor: Executor, plan: StepPlan, error: Unavailable) -> StepResult:
    """Fail the sequences that need an adapter, and run the base-model ones
    (isolated in turn): halving would only wait for the server again and again."""
    result = StepResult(failed={q.request_id: error for q in plan.seqs if q.adapter is not None})
    base = [q for q in plan.seqs if q.adapter is None]
    if base:
        done = execute_isolated(executor, StepPlan(seqs=base))
        result.sampled.update(done.sampled)
        result.failed.update(done.failed)
        result.elapsed += done.elapsed
    return result


def _split(executor: Executor, plan: StepPlan, seqs: list[ScheduledSeq], error: Exception,
           result: StepResult) -> None:
    """`seqs` failed together with `error`: run each half alone, recursing into
    a half that fails again."""
    if len(seqs) == 1:
        result.failed[seqs[0].request_id] = error
        return
    half = len(seqs) // 2
    for part in (seqs[:half], seqs[half:]):
        adapters = {q.adapter for q in part}
        sub = StepPlan(seqs=part, lora_loads=[load for load in plan.lora_loads if load[0] in adapters])
        try:
            done = executor.execute(sub)
        except Exception as e:
            _split(executor, plan, part, e, result)
            continue
        result.sampled.update(done.sampled)
        result.failed.update(done.failed)
        result.elapsed += done.elapsed
