"""Turning sampled tokens into text, and stop strings into finishes.

Outputs are deltas: each carries what is new since the request's previous
output (tokens, logprobs, text), so a long generation costs the same per step
at token 4,000 as at token 4; only the final output carries the whole (the
request's own lists, not copies). Text is decoded incrementally from a window
of the last few tokens.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from loraserve.request import FinishReason, Request

if TYPE_CHECKING:  # a type only: the simulator makes outputs without a tokenizer (or jinja2) installed
    from loraserve.tokenizer import Tokenizer


@dataclass
class RequestOutput:
    request_id: str
    prompt_token_ids: list[int]
    new_token_ids: list[int]
    """Tokens sampled since the previous output."""

    delta: str
    """Text not reported before (for streaming)."""

    finished: bool
    finish_reason: str | None = None
    new_logprobs: list[float] = field(default_factory=list)
    new_top_logprobs: list[dict[int, float]] = field(default_factory=list)
    num_output_tokens: int = 0
    """Tokens sampled so far, these included."""

    text: str = ""
    """The whole text: on the final output only."""

    token_ids: list[int] = field(default_factory=list)
    """Every sampled token: on the final output only (so are `logprobs` and `top_logprobs`)."""

    logprobs: list[float] = field(default_factory=list)
    top_logprobs: list[dict[int, float]] = field(default_factory=list)
    adapter: str | None = None
    error: str | None = None
    """Set when finish_reason is "error": what failed (the HTTP layer sends it
    as an OpenAI-style error, a 500 or a stream's error event)."""

    error_status: int = 500
    """503 when what failed was a service the request needs (the LoRA server)."""

    num_cached_tokens: int = 0
    """Prompt tokens served from cached KV (0 until admitted)."""


@dataclass
class _Text:
    """One request's text: what was released, and the decode window."""

    released: list[str] = field(default_factory=list)
    held: str = ""
    """Decoded, not yet released: it may still turn out to start a stop string."""

    prefix: int = 0
    """Output tokens before this one are decoded and in `released` or `held`..."""

    read: int = 0
    """...and [prefix, read) were the last decoded: decoding [prefix, end) and
    dropping their text gives the new text, with the right spacing."""

    sent_tokens: int = 0


class Detokenizer:
    """Per-request text; finds stop strings and holds back text that might
    still become one (or an incomplete UTF-8 character)."""

    def __init__(self, tokenizer: Tokenizer) -> None:
        self.tokenizer = tokenizer
        self.texts: dict[str, _Text] = {}

    def update(self, req: Request) -> tuple[str, bool]:
        """Decode the request's new tokens; returns (text to release, whether a
        stop string was hit: the text ends before it)."""
        st = self.texts.setdefault(req.request_id, _Text())
        ids = req.output_token_ids
        done = req.is_finished
        if st.read < len(ids):
            before = self.tokenizer.decode(ids[st.prefix:st.read])
            after = self.tokenizer.decode(ids[st.prefix:])
            if len(after) > len(before) and (done or not after.endswith("\ufffd")):
                st.held += after[len(before):]
                st.prefix, st.read = st.read, len(ids)
        stops = req.sampling.stop
        hit = False
        if stops:
            cut = min((i for i in (st.held.find(s) for s in stops) if i >= 0), default=-1)
            if cut >= 0:
                st.held, hit = st.held[:cut], True
        keep = 0 if (hit or done or not stops) else max(len(s) for s in stops) - 1
        delta = st.held[:max(0, len(st.held) - keep)]
        st.held = st.held[len(delta):]
        st.released.append(delta)
        return delta, hit

    def text(self, request_id: str) -> str:
        """Everything released so far (the whole text, once the request is done)."""
        st = self.texts.get(request_id)
        return "".join(st.released) if st else ""

    def mark_sent(self, request_id: str, num_tokens: int) -> int:
        """Record that the request's first `num_tokens` output tokens are
        reported; returns how many were before (where the new ones start)."""
        st = self.texts.setdefault(request_id, _Text())
        before, st.sent_tokens = st.sent_tokens, num_tokens
        return before

    def forget(self, request_id: str) -> None:
        self.texts.pop(request_id, None)


def make_output(req: Request, delta: str, since: int, text: str = "") -> RequestOutput:
    """The request's output: what is new from output token `since` on, and the
    whole (`text`, every token) if it has finished."""
    done = req.is_finished
    return RequestOutput(
        request_id=req.request_id,
        prompt_token_ids=req.prompt_token_ids,
        new_token_ids=req.output_token_ids[since:],
        delta=delta,
        finished=done,
        finish_reason=req.finish_reason.value if isinstance(req.finish_reason, FinishReason) else None,
        new_logprobs=req.output_logprobs[since:],
        new_top_logprobs=req.output_top_logprobs[since:],
        num_output_tokens=req.num_output_tokens,
        text=text if done else "",
        token_ids=req.output_token_ids if done else [],
        logprobs=req.output_logprobs if done else [],
        top_logprobs=req.output_top_logprobs if done else [],
        adapter=req.adapter_name,
        error=req.error,
        error_status=req.error_status,
        num_cached_tokens=req.num_cached_tokens or 0,
    )
