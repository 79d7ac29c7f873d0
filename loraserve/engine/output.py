"""Turning sampled tokens into text, and stop strings into finishes."""

from __future__ import annotations

from dataclasses import dataclass, field

from loraserve.request import FinishReason, Request
from loraserve.tokenizer import Tokenizer


@dataclass
class RequestOutput:
    request_id: str
    prompt_token_ids: list[int]
    token_ids: list[int]
    text: str
    delta: str
    """Text not reported before (for streaming)."""
    finished: bool
    finish_reason: str | None = None
    logprobs: list[float] = field(default_factory=list)
    top_logprobs: list[dict[int, float]] = field(default_factory=list)
    adapter: str | None = None
    error: str | None = None
    """Set when finish_reason is "error": what failed (the HTTP layer sends it
    as an OpenAI-style error, a 500 or a stream's error event)."""


class Detokenizer:
    """Per-request text so far; finds stop strings and holds back text that
    might still become one (or an incomplete UTF-8 character)."""

    def __init__(self, tokenizer: Tokenizer) -> None:
        self.tokenizer = tokenizer
        self.sent: dict[str, int] = {}

    def update(self, req: Request) -> tuple[str, str, bool]:
        """Returns (text, delta, stop string hit)."""
        text = self.tokenizer.decode(req.output_token_ids)
        stops = req.sampling.stop
        hit = False
        if stops:
            cut = min((i for i in (text.find(s) for s in stops) if i >= 0), default=-1)
            if cut >= 0:
                text, hit = text[:cut], True
        done = hit or req.is_finished
        visible = len(text)
        if not done:
            if text.endswith("\ufffd"):
                visible = len(text.rstrip("\ufffd"))
            if stops:
                visible = min(visible, max(0, len(text) - max(len(s) for s in stops) + 1))
        sent = self.sent.get(req.request_id, 0)
        delta = text[sent:visible] if visible > sent else ""
        self.sent[req.request_id] = max(sent, visible)
        return text, delta, hit

    def forget(self, request_id: str) -> None:
        self.sent.pop(request_id, None)


def make_output(req: Request, text: str, delta: str) -> RequestOutput:
    return RequestOutput(
        request_id=req.request_id,
        prompt_token_ids=req.prompt_token_ids,
        token_ids=list(req.output_token_ids),
        text=text,
        delta=delta,
        finished=req.is_finished,
        finish_reason=req.finish_reason.value if isinstance(req.finish_reason, FinishReason) else None,
        logprobs=list(req.output_logprobs),
        top_logprobs=list(req.output_top_logprobs),
        adapter=req.adapter_name,
        error=req.error,
    )
