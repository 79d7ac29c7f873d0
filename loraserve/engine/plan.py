"""What the scheduler hands the executor, and what comes back.

The only contract between policy (scheduler) and mechanism (executor): both
sides can be swapped (real model or simulated cost model) without the other
noticing.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from loraserve.request import Request


@dataclass
class ScheduledSeq:
    request: Request
    num_new_tokens: int
    """Tokens computed this step, starting at ``request.num_computed_tokens``."""


    @property
    def adapter(self) -> str | None:
        """The request's adapter id (None: base model)."""
        return self.request.adapter

    @property
    def samples(self) -> bool:
        """Whether this step reaches the request's last token, so it yields a new token."""
        return self.request.num_computed_tokens + self.num_new_tokens == self.request.num_tokens


@dataclass
class StepPlan:
    seqs: list[ScheduledSeq] = field(default_factory=list)
    lora_loads: list[tuple[str, list[int]]] = field(default_factory=list)
    """(adapter id, its device blocks) of adapters admitted this step that the
    LoRA backend does not hold: it loads them before the step runs."""

    preempted: list[str] = field(default_factory=list)
    """Request ids preempted while planning (their blocks were freed)."""

    failed: dict[str, str] = field(default_factory=dict)
    """Request id → error, for requests whose planning raised (not in `seqs`)."""

    @property
    def num_tokens(self) -> int:
        return sum(s.num_new_tokens for s in self.seqs)

    @property
    def is_empty(self) -> bool:
        return not self.seqs


@dataclass
class SampledToken:
    token_id: int
    logprob: float | None = None
    top_logprobs: dict[int, float] | None = None


@dataclass
class StepResult:
    sampled: dict[str, SampledToken] = field(default_factory=dict)
    """One entry per request whose ScheduledSeq.samples was true."""

    elapsed: float = 0.0
    """Seconds the step took (measured or simulated)."""

    failed: dict[str, str] = field(default_factory=dict)
    """Request id → error, for scheduled requests the step could not compute
    (see `engine/isolation.py`); they get no token and no committed KV."""
