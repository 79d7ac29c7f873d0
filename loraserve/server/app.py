"""The OpenAI-compatible HTTP API over an AsyncEngine.

Every failure is an OpenAI-style JSON error with a 4xx status and a message
naming the field or the adapter; nothing accepted before is lost.
"""

from __future__ import annotations

import asyncio
import json
import secrets
import threading
import time
import uuid
from pathlib import Path
from typing import AsyncIterator

import uvicorn
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse

from loraserve.engine.async_engine import AsyncEngine
from loraserve.engine.output import RequestOutput
from loraserve.lora.adapter import AdapterError
from loraserve.server.metrics import Metrics
from loraserve.server.protocol import (ChatCompletionRequest, CompletionRequest, LoadLoraRequest,
                                       UnloadLoraRequest)

DEFAULT_MAX_TOKENS = 16


class APIError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None, kind: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.param, self.kind = status, message, param, kind


def error_response(status: int, message: str, param: str | None = None, kind: str = "invalid_request_error"):
    return JSONResponse(status_code=status,
                        content={"error": {"message": message, "type": kind, "param": param, "code": status}})


def build_app(engine: AsyncEngine, model_name: str, api_key: str | None = None,
              lora_dirs: list[str] | None = None, max_waiting: int = 1024) -> FastAPI:
    """`lora_dirs`: the only directories runtime-loaded adapters may come from
    (none: runtime loading is off). `max_waiting`: queue length past which new
    requests get 429."""
    app = FastAPI(title="loraserve", version="0.1.0")
    llm = engine.engine
    metrics = Metrics(llm)
    app.state.metrics = metrics
    allowed = [Path(d).resolve() for d in lora_dirs or []]

    @app.exception_handler(APIError)
    async def _api_error(_: Request, e: APIError):
        metrics.errors.labels(str(e.status)).inc()
        headers = {"Retry-After": "1"} if e.status == 429 else None
        response = error_response(e.status, e.message, e.param, e.kind)
        if headers:
            response.headers.update(headers)
        return response

    @app.exception_handler(RequestValidationError)
    async def _validation_error(_: Request, e: RequestValidationError):
        metrics.errors.labels("400").inc()
        err = e.errors()[0]
        field = ".".join(str(x) for x in err.get("loc", ())[1:]) or None
        return error_response(400, f"{field or 'body'}: {err.get('msg')}", field)

    @app.get("/metrics")
    async def prometheus():
        return Response(metrics.render(), media_type="text/plain; version=0.0.4")

    @app.post("/v1/load_lora_adapter")
    async def load_lora(body: LoadLoraRequest):
        if not allowed:
            raise APIError(403, "runtime adapter loading is off; start the server with --lora-dir", "lora_path",
                           "permission_error")
        try:
            path = Path(body.lora_path).resolve()
        except (ValueError, OSError) as e:  # e.g. an embedded NUL byte
            raise APIError(400, f"lora_path: {e}", "lora_path") from e
        if not any(path.is_relative_to(d) for d in allowed):
            raise APIError(403, f"lora_path {body.lora_path!r} is outside the allowed --lora-dir directories",
                           "lora_path", "permission_error")
        if body.lora_name == model_name or body.lora_name in llm.adapters.by_name:
            raise APIError(400, f"an adapter named {body.lora_name!r} is already loaded", "lora_name")
        start = time.monotonic()
        try:
            adapter = await asyncio.to_thread(llm.adapters.load, body.lora_name, path)
            await engine.call(llm.register_adapter, body.lora_name, adapter)
        except (AdapterError, ValueError) as e:  # ValueError: too big for the device pool
            raise APIError(400, str(e), "lora_path") from e
        metrics.adapter_load.observe(time.monotonic() - start)
        return {"status": "ok", "lora_name": body.lora_name, "id": adapter.id, "rank": adapter.rank}

    @app.post("/v1/unload_lora_adapter")
    async def unload_lora(body: UnloadLoraRequest):
        adapter = llm.adapters.by_name.get(body.lora_name)
        if adapter is None:
            raise APIError(404, f"no adapter named {body.lora_name!r}", "lora_name", "not_found_error")
        await engine.call(llm.remove_adapter, body.lora_name)
        while llm.adapter_loaded(adapter.id) and not llm.adapters.is_named(adapter.id):
            await asyncio.sleep(0.05)  # its running requests finish first
        return {"status": "ok", "lora_name": body.lora_name}

    @app.middleware("http")
    async def _auth(request: Request, call_next):
        if api_key and request.url.path.startswith("/v1/"):
            given = request.headers.get("authorization", "")
            if not secrets.compare_digest(given, f"Bearer {api_key}"):
                return error_response(401, "invalid or missing API key", kind="authentication_error")
        return await call_next(request)

    @app.get("/health")
    async def health():
        return {"status": "draining" if engine.draining else "ok"}

    @app.get("/v1/models")
    async def models():
        now = int(time.time())
        data = [{"id": model_name, "object": "model", "created": now, "owned_by": "loraserve", "parent": None,
                 "root": llm.config.model}]
        for name, adapter in llm.adapters.by_name.items():
            data.append({"id": name, "object": "model", "created": now, "owned_by": "loraserve",
                         "parent": model_name, "root": adapter.path})
        return {"object": "list", "data": data}

    def admit() -> None:
        if engine.draining:
            raise APIError(503, "the server is shutting down", kind="server_error")
        if len(llm.scheduler.waiting) >= max_waiting:
            raise APIError(429, f"too many waiting requests (--max-waiting {max_waiting}); retry later",
                           kind="rate_limit_error")

    def adapter_for(model: str) -> str | None:
        admit()
        if model == model_name:
            return None
        if model not in llm.adapters.by_name:
            raise APIError(404, f"the model {model!r} does not exist; see GET /v1/models", "model",
                           "not_found_error")
        return model

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest):
        adapter = adapter_for(body.model)
        prompts = _prompts(body.prompt)
        logprobs = body.logprobs
        return await _respond(engine, metrics, body, adapter, prompts, logprobs, chat=False)

    @app.post("/v1/chat/completions")
    async def chat(body: ChatCompletionRequest):
        adapter = adapter_for(body.model)
        messages = [{"role": m.role, "content": m.text()} for m in body.messages]
        try:
            prompt = llm.tokenizer.apply_chat_template(messages)
        except Exception as e:  # template errors are the request's fault (e.g. bad roles)
            raise APIError(400, f"messages: {e}", "messages") from e
        if body.max_completion_tokens:
            body.max_tokens = body.max_completion_tokens
        logprobs = (body.top_logprobs or 0) if body.logprobs else None
        return await _respond(engine, metrics, body, adapter, [prompt], logprobs, chat=True)

    return app


def _prompts(prompt) -> list[str | list[int]]:
    if isinstance(prompt, str):
        return [prompt]
    if prompt and isinstance(prompt[0], int):
        return [prompt]
    if not prompt:
        raise APIError(400, "prompt: must not be empty", "prompt")
    return list(prompt)


async def _respond(engine: AsyncEngine, metrics: Metrics, body, adapter, prompts, logprobs, chat: bool):
    rid = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex
    ids, streams = [], []
    try:  # submit every choice before awaiting any, so they batch from the first step
        for i, prompt in enumerate(p for p in prompts for _ in range(body.n)):
            sampling = body.sampling(DEFAULT_MAX_TOKENS, logprobs, i % body.n)
            request_id = f"{rid}-{i}"
            stream = engine.submit(prompt, sampling, adapter, request_id)
            ids.append(request_id)
            streams.append(_timed(stream, metrics, adapter or "base", time.monotonic()))
    except (ValueError, TypeError, KeyError, RuntimeError) as e:
        for request_id in ids:
            engine.abort(request_id)
        if isinstance(e, KeyError):
            raise APIError(404, str(e.args[0] if e.args else e), "model", "not_found_error") from e
        if isinstance(e, RuntimeError):
            raise APIError(503, str(e), kind="server_error") from e
        raise APIError(400, str(e)) from e
    if body.stream:
        usage = bool((body.stream_options or {}).get("include_usage"))
        return StreamingResponse(_sse(rid, body.model, streams, ids, chat, engine, usage, body.n),
                                 media_type="text/event-stream")
    try:
        finals = []
        for s in streams:
            async for out in s:
                pass
            finals.append(out)
    except KeyError as e:  # its adapter was unloaded between validation and admission
        raise APIError(404, str(e.args[0]), "model", "not_found_error") from e
    finally:  # also when the client disconnects while we wait
        for request_id in ids:
            engine.abort(request_id)
    return _final(rid, body.model, finals, body.n, chat, engine)


async def _timed(stream, metrics: Metrics, label: str, start: float):
    """Pass outputs through, recording TTFT, TPOT, latency and token counts."""
    first = None
    metrics.in_flight.inc()
    try:
        async for out in stream:
            now = time.monotonic()
            if first is None and out.token_ids:
                first = now
                metrics.ttft.labels(label).observe(now - start)
            if out.finished:
                n = len(out.token_ids)
                metrics.requests.labels(label, out.finish_reason or "none").inc()
                metrics.e2e.labels(label).observe(now - start)
                metrics.tokens_in.inc(len(out.prompt_token_ids))
                metrics.tokens_out.inc(n)
                if n > 1 and first is not None:
                    metrics.tpot.labels(label).observe((now - first) / (n - 1))
            yield out
    finally:
        metrics.in_flight.dec()
        await stream.aclose()


def _final(rid: str, model: str, outs: list[RequestOutput], n: int, chat: bool, engine: AsyncEngine) -> dict:
    choices = []
    for i, o in enumerate(outs):
        lp = _logprobs(o, 0, chat, engine) if o.logprobs else None
        if chat:
            choices.append({"index": i, "message": {"role": "assistant", "content": o.text},
                            "logprobs": lp, "finish_reason": o.finish_reason})
        else:
            choices.append({"index": i, "text": o.text, "logprobs": lp, "finish_reason": o.finish_reason})
    return {"id": rid, "object": "chat.completion" if chat else "text_completion", "created": int(time.time()),
            "model": model, "choices": choices, "usage": _usage(outs, n)}


def _usage(outs: list[RequestOutput], n: int) -> dict:
    prompt_tokens = sum(len(o.prompt_token_ids) for o in outs[::n])  # outs are prompt-major, n per prompt
    completion_tokens = sum(len(o.token_ids) for o in outs)
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def _logprobs(o: RequestOutput, start: int, chat: bool, engine: AsyncEngine) -> dict:
    tok = engine.engine.tokenizer
    ids, lps = o.token_ids[start:], o.logprobs[start:]
    tops = o.top_logprobs[start:] or [{}] * len(ids)
    texts = [tok.decode([t], skip_special_tokens=False) for t in ids]
    if chat:
        return {"content": [{"token": s, "logprob": lp, "top_logprobs": [
            {"token": tok.decode([t], skip_special_tokens=False), "logprob": v} for t, v in top.items()]}
            for s, lp, top in zip(texts, lps, tops)]}
    return {"tokens": texts, "token_logprobs": lps,
            "top_logprobs": [{tok.decode([t], skip_special_tokens=False): v for t, v in top.items()} for top in tops]}


async def _sse(rid, model, streams, ids, chat, engine, usage: bool = False, n: int = 1) -> AsyncIterator[str]:
    """Server-sent events: one chunk per new text per choice, then (if asked) one
    with the usage and no choices, then [DONE]."""
    created = int(time.time())
    kind = "chat.completion.chunk" if chat else "text_completion"
    sent = [0] * len(streams)

    def chunk(i: int, out: RequestOutput) -> str:
        lp = _logprobs(out, sent[i], chat, engine) if out.logprobs else None
        sent[i] = len(out.token_ids)
        if chat:
            choice = {"index": i, "delta": {"role": "assistant", "content": out.delta}, "logprobs": lp,
                      "finish_reason": out.finish_reason}
        else:
            choice = {"index": i, "text": out.delta, "logprobs": lp, "finish_reason": out.finish_reason}
        return "data: " + json.dumps({"id": rid, "object": kind, "created": created, "model": model,
                                      "choices": [choice]}) + "\n\n"

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
                last[i] = out
                yield chunk(i, out)
                if out.finished:
                    pending.pop(i)
        if usage:
            yield "data: " + json.dumps({"id": rid, "object": kind, "created": created, "model": model, "choices": [],
                                          "usage": _usage([last[i] for i in sorted(last)], n)}) + "\n\n"
        yield "data: [DONE]\n\n"
    finally:  # on disconnect: abort what still runs, started or not
        for request_id in ids:
            engine.abort(request_id)
        await _close(streams)


async def _close(streams) -> None:
    for s in streams:
        await s.aclose()


class DrainingServer(uvicorn.Server):
    """uvicorn whose first SIGTERM/SIGINT drains: requests in flight finish,
    new ones get 503, then it exits. A second signal exits at once."""

    def __init__(self, config: uvicorn.Config, engine: AsyncEngine) -> None:
        super().__init__(config)
        self.engine = engine

    def handle_exit(self, sig, frame) -> None:
        if self.engine.draining:
            return super().handle_exit(sig, frame)
        self.engine.draining = True

        def exit_when_idle() -> None:
            while self.engine.num_unfinished():
                time.sleep(0.05)
            super(DrainingServer, self).handle_exit(sig, frame)

        threading.Thread(target=exit_when_idle, name="loraserve-drain", daemon=True).start()
