"""Answering a completion request: submit its choices, then either stream
server-sent events or wait for the whole response. Every ending is counted
in the metrics, and every request is aborted when its client goes away."""

from __future__ import annotations

import time
import uuid
from typing import AsyncIterator

from fastapi.responses import StreamingResponse

from loraserve.engine.async_engine import AsyncEngine
from loraserve.engine.output import RequestOutput
from loraserve.server import openai_format as fmt
from loraserve.server.errors import APIError, api_error, error_event
from loraserve.server.metrics import Metrics

DEFAULT_MAX_TOKENS = 16


async def respond(client: AsyncEngine, metrics: Metrics, body, adapter: str | None, prompts: list,
                  logprobs: int | None, chat: bool, session: str | None = None):
    """The response to a completion or chat request over `prompts` (n choices each);
    `session` keys a multi-turn conversation (a scaled-out endpoint routes by it)."""
    rid = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex
    ids = [f"{rid}-{i}" for i in range(len(prompts) * body.n)]
    start = time.monotonic()
    # every choice is validated, then all are queued together, so they batch from the first step
    specs = [(prompt, body.sampling(DEFAULT_MAX_TOKENS, logprobs, i % body.n), adapter, ids[i])
             for i, prompt in enumerate(p for p in prompts for _ in range(body.n))]
    raw = await client.submit(specs, session)
    streams = [_timed(s, metrics, adapter or "base", start) for s in raw]
    if body.stream:
        usage = bool((body.stream_options or {}).get("include_usage"))
        return EventStream(_sse(rid, body.model, streams, ids, chat, client, usage, body.n), client, ids)
    try:
        finals = []
        for s in streams:
            async for out in s:
                pass
            finals.append(out)
    finally:  # also when the client disconnects while we wait
        for request_id in ids:
            client.abort(request_id)
        for s in streams:
            await s.aclose()
    failed = next((o for o in finals if o.error is not None), None)
    if failed is not None:
        raise failure(failed)
    return fmt.completion(rid, body.model, finals, body.n, chat, client.token_text)



def failure(out: RequestOutput) -> APIError:
    """The error a failed request is answered with: a 500, or a 503 when a
    service it needs (the LoRA server) is down and a retry may succeed."""
    if out.error_status == 503:
        return APIError(503, f"a service this request needs is unavailable: {out.error}", kind="server_error")
    return APIError(500, f"the engine failed on this request: {out.error}", kind="server_error")

class EventStream(StreamingResponse):
    """Server-sent events whose requests are aborted however the response ends,
    also when the client is gone before the body starts (then `_sse`, never
    started, cannot clean up itself)."""

    def __init__(self, content, client: AsyncEngine, request_ids: list[str]) -> None:
        super().__init__(content, media_type="text/event-stream")
        self.client, self.request_ids = client, request_ids

    async def __call__(self, scope, receive, send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            for request_id in self.request_ids:
                self.client.abort(request_id)


async def _timed(stream, metrics: Metrics, label: str, start: float):
    """Pass outputs through, recording TTFT, TPOT, latency and token counts,
    and every ending in `loraserve_requests_total`: its finish reason, "error"
    when it could not be completed, "abort" when the client went away."""
    first = None
    ended = False
    metrics.in_flight.inc()
    try:
        async for out in stream:
            now = time.monotonic()
            if first is None and out.new_token_ids:
                first = now
                metrics.ttft.labels(label).observe(now - start)
            if out.finished:
                ended = True
                n = out.num_output_tokens
                metrics.requests.labels(label, out.finish_reason or "none").inc()
                metrics.e2e.labels(label).observe(now - start)
                metrics.tokens_in.inc(len(out.prompt_token_ids))
                metrics.tokens_out.inc(n)
                if n > 1 and first is not None:
                    metrics.tpot.labels(label).observe((now - first) / (n - 1))
            yield out
    except Exception:
        ended = True
        metrics.requests.labels(label, "error").inc()
        raise
    finally:
        if not ended:
            metrics.requests.labels(label, "abort").inc()
        metrics.in_flight.dec()
        await stream.aclose()


async def _sse(rid: str, model: str, streams, ids: list[str], chat: bool, client: AsyncEngine, usage: bool,
               n: int) -> AsyncIterator[str]:
    """One event per new text per choice, then (if asked) one with the usage and
    no choices, then [DONE]; or, if a choice cannot be completed, an error event."""
    created = int(time.time())
    pending = dict(enumerate(streams))
    last: dict[int, RequestOutput] = {}
    try:
        while pending:  # choices advance in the same engine steps; read them round robin
            for i, s in list(pending.items()):
                try:
                    out = await anext(s)
                except StopAsyncIteration:
                    pending.pop(i)
                    continue
                except Exception as e:  # adapter unloaded after validation, engine stopped
                    yield error_event(api_error(e))
                    return
                if out.error is not None:
                    yield error_event(failure(out))
                    return
                last[i] = out
                yield fmt.chunk(rid, model, created, i, out, chat, client.token_text)
                if out.finished:
                    pending.pop(i)
        if usage:
            yield fmt.usage_chunk(rid, model, created, [last[i] for i in sorted(last)], n, chat)
        yield "data: [DONE]\n\n"
    finally:  # on disconnect: abort what still runs, started or not
        for request_id in ids:
            client.abort(request_id)
        for s in streams:
            await s.aclose()
