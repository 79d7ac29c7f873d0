"""What the scheduler hands the executor, and what comes back.

The only contract between policy (scheduler) and mechanism (executor): both
sides can be swapped (real model, simulated cost model, an executor in another
process) without the other noticing. Both are plain data: no live requests.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from loraserve.request import Request
from loraserve.sampling import SamplingParams


@dataclass
class ScheduledSeq:
    """One request's share of a step, as plain data: what an executor in
    another process would need, and nothing it could change."""

    request_id: str
    token_ids: list[int]
    """The tokens computed this step, at positions start, start + 1, ..."""

    start: int
    """Tokens of the request already in its KV (its num_computed_tokens)."""

    block_ids: list[int]
    """Its block table: where positions 0 .. start + len(token_ids) - 1 live."""

    adapter: str | None
    """Adapter id (None: base model)."""

    sampling: SamplingParams | None
    """Set when this step reaches the request's last token, so it samples the next one."""

    @classmethod
    def of(cls, req: Request, num_new_tokens: int) -> ScheduledSeq:
        """The next `num_new_tokens` of a request whose blocks are allocated."""
        start = req.num_computed_tokens
        samples = start + num_new_tokens == req.num_tokens
        return cls(req.request_id, req.token_slice(start, start + num_new_tokens), start, list(req.block_ids),
                   req.adapter, req.sampling if samples else None)

    @property
    def num_new_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def samples(self) -> bool:
        return self.sampling is not None


@dataclass
class StepPlan:
    seqs: list[ScheduledSeq] = field(default_factory=list)
    lora_loads: list[tuple[str, list[int]]] = field(default_factory=list)
    """(adapter id, its device blocks) of adapters admitted this step that the
    LoRA backend does not hold: it loads them before the step runs."""

    preempted: list[str] = field(default_factory=list)
    """Request ids preempted while planning (their blocks were freed)."""

    failed: dict[str, str | Exception] = field(default_factory=dict)
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

    failed: dict[str, str | Exception] = field(default_factory=dict)
    """Request id → error, for scheduled requests the step could not compute
    (see `engine/isolation.py`); they get no token and no committed KV."""
