"""Engine outputs in the OpenAI API's response shapes (completions and chat,
whole or as stream chunks). Pure functions of the outputs."""

from __future__ import annotations

import json
import math
import time
from typing import Callable

from loraserve.engine.output import RequestOutput

TokenText = Callable[[int], str]
"""A token id's text (special tokens spelled out)."""


def completion(rid: str, model: str, outs: list[RequestOutput], n: int, chat: bool, token_text: TokenText) -> dict:
    """The whole response, from each choice's final output."""
    choices = []
    for i, o in enumerate(outs):
        lp = logprobs(o.token_ids, o.logprobs, o.top_logprobs, chat, token_text) if o.logprobs else None
        if chat:
            choices.append({"index": i, "message": {"role": "assistant", "content": o.text},
                            "logprobs": lp, "finish_reason": o.finish_reason})
        else:
            choices.append({"index": i, "text": o.text, "logprobs": lp, "finish_reason": o.finish_reason})
    return {"id": rid, "object": "chat.completion" if chat else "text_completion", "created": int(time.time()),
            "model": model, "choices": choices, "usage": usage(outs, n)}


def chunk(rid: str, model: str, created: int, i: int, out: RequestOutput, chat: bool, token_text: TokenText) -> str:
    """One stream event: choice i's new text (and logprobs) since its last output."""
    lp = None
    if out.new_logprobs:
        lp = logprobs(out.new_token_ids, out.new_logprobs, out.new_top_logprobs, chat, token_text)
    if chat:
        choice = {"index": i, "delta": {"role": "assistant", "content": out.delta}, "logprobs": lp,
                  "finish_reason": out.finish_reason}
    else:
        choice = {"index": i, "text": out.delta, "logprobs": lp, "finish_reason": out.finish_reason}
    return event({"id": rid, "object": _kind(chat), "created": created, "model": model, "choices": [choice]})


def usage_chunk(rid: str, model: str, created: int, outs: list[RequestOutput], n: int, chat: bool) -> str:
    """The last event when the client asked for usage: the counts and no choices."""
    return event({"id": rid, "object": _kind(chat), "created": created, "model": model, "choices": [],
                  "usage": usage(outs, n)})


def event(data: dict) -> str:
    return "data: " + json.dumps(data) + "\n\n"


def usage(outs: list[RequestOutput], n: int) -> dict:
    """Token counts; `cached_tokens` are the prompt tokens whose KV came from the
    cache (prefix or history), as OpenAI and vLLM report them."""
    prompt_tokens = sum(len(o.prompt_token_ids) for o in outs[::n])  # outs are prompt-major, n per prompt
    completion_tokens = sum(o.num_output_tokens for o in outs)
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens,
            "prompt_tokens_details": {"cached_tokens": sum(o.num_cached_tokens for o in outs[::n])}}


def logprobs(ids: list[int], lps: list[float], tops: list[dict[int, float]], chat: bool,
             token_text: TokenText) -> dict:
    """The logprobs object of some tokens (a whole choice, or a chunk's new ones)."""
    lps = [_finite(v) for v in lps]
    tops = [{t: _finite(v) for t, v in top.items()} for top in tops] or [{}] * len(ids)
    texts = [token_text(t) for t in ids]
    if chat:
        return {"content": [{"token": s, "logprob": lp, "top_logprobs": [
            {"token": token_text(t), "logprob": v} for t, v in top.items()]}
            for s, lp, top in zip(texts, lps, tops)]}
    return {"tokens": texts, "token_logprobs": lps,
            "top_logprobs": [{token_text(t): v for t, v in top.items()} for top in tops]}


def _finite(logprob: float) -> float:
    """JSON has no -inf or NaN: a token the model gave no mass reports -9999.0, as vLLM does."""
    return logprob if math.isfinite(logprob) else -9999.0


def _kind(chat: bool) -> str:
    return "chat.completion.chunk" if chat else "text_completion"
