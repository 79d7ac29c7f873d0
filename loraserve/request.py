"""A request's state and timestamps, as the scheduler sees it (no tensors)."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

from loraserve.sampling import SamplingParams


class RequestStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    PREEMPTED = "preempted"
    FINISHED = "finished"


class FinishReason(enum.Enum):
    LENGTH = "length"
    STOP = "stop"
    ABORT = "abort"
    ERROR = "error"
    """The engine failed on this request; the output's `error` says how."""


@dataclass
class Request:
    """Progress is counted in tokens, never in phases.

    `num_computed_tokens` catches up with `len(token_ids)`: while it is behind
    by more than one the request is prefilling (perhaps in chunks, perhaps again
    after preemption); when it is behind by exactly one it decodes.
    """

    request_id: str
    prompt_token_ids: list[int]
    sampling: SamplingParams
    adapter: str | None = None
    """Content hash of the adapter (None: base model)."""

    adapter_name: str | None = None
    """The name the request asked for (reported back; identity is `adapter`)."""

    arrival_time: float = 0.0
    output_token_ids: list[int] = field(default_factory=list)
    output_logprobs: list[float] = field(default_factory=list)
    output_top_logprobs: list[dict[int, float]] = field(default_factory=list)
    num_computed_tokens: int = 0
    num_cached_tokens: int | None = None
    """Prompt tokens served from cached KV on its first admission (OpenAI's
    usage.prompt_tokens_details.cached_tokens); a recompute after preemption does not change it."""

    block_ids: list[int] = field(default_factory=list)
    status: RequestStatus = RequestStatus.WAITING
    finish_reason: FinishReason | None = None
    num_preemptions: int = 0
    first_scheduled_time: float | None = None
    pending_since: float = 0.0
    lora_wait: float = 0.0
    """Seconds spent pending on the adapter's copy to the device (its cold start)."""

    kv_wait: float = 0.0
    """Seconds spent pending on history KV copies to the device."""

    first_token_time: float | None = None
    finish_time: float | None = None
    error: str | None = None
    """Why the engine failed this request (finish reason ERROR)."""

    error_status: int = 500
    """The HTTP status of that failure: 503 when a service it needs (the LoRA server) is down."""

    stop_token_ids: frozenset[int] = frozenset()
    """EOS ids (unless ignore_eos) plus the request's own stop ids; set on admission."""

    @property
    def token_ids(self) -> list[int]:
        return self.prompt_token_ids + self.output_token_ids

    def token_slice(self, start: int, end: int) -> list[int]:
        """token_ids[start:end] without concatenating prompt and output (hot path)."""
        n = len(self.prompt_token_ids)
        if start >= n:
            return self.output_token_ids[start - n:end - n]
        return self.prompt_token_ids[start:end] + self.output_token_ids[:max(0, end - n)]

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_token_ids) + len(self.output_token_ids)

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.output_token_ids)

    @property
    def is_finished(self) -> bool:
        return self.status == RequestStatus.FINISHED
