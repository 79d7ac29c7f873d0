"""The OpenAI-compatible HTTP API over an AsyncEngine.

Every error the server returns is an OpenAI-style JSON error object
(`{"error": {"message", "type", "param", "code"}}`): a 4xx naming the field or
the adapter for bad input, a 500 for a request the engine failed on, a 503
once the engine has stopped. A stream that cannot be completed ends with an
error event carrying the same object. Nothing accepted before is lost.
"""

from __future__ import annotations

import asyncio
import json
import math
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
from starlette.exceptions import HTTPException

from loraserve.engine.async_engine import AsyncEngine, EngineDeadError
from loraserve.engine.output import RequestOutput
from loraserve.lora.adapter import AdapterError
from loraserve.lora.registry import check_name
from loraserve.server.metrics import Metrics
from loraserve.server.protocol import (ChatCompletionRequest, CompletionRequest, LoadLoraRequest,
                                       UnloadLoraRequest)

DEFAULT_MAX_TOKENS = 16
OPEN_PATHS = ("/health",)
"""What answers without the API key: the probe a supervisor or load balancer sends."""


class APIError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None, kind: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.param, self.kind = status, message, param, kind


def error_body(status: int, message: str, param: str | None = None, kind: str = "invalid_request_error") -> dict:
    return {"error": {"message": message, "type": kind, "param": param, "code": status}}


def error_response(status: int, message: str, param: str | None = None, kind: str = "invalid_request_error"):
    return JSONResponse(status_code=status, content=error_body(status, message, param, kind))


def refusal(e: Exception) -> APIError:
    """The API error for an exception raised while validating or serving a request."""
    if isinstance(e, APIError):
        return e
    if isinstance(e, KeyError):  # an adapter unknown, or unloaded after validation
        return APIError(404, str(e.args[0] if e.args else e), "model", "not_found_error")
    if isinstance(e, RuntimeError):  # shutting down, or the engine has stopped
        return APIError(503, str(e), kind="server_error")
    if isinstance(e, (ValueError, TypeError)):
        return APIError(400, str(e), getattr(e, "field", None))
    return APIError(500, f"internal error: {type(e).__name__}: {e}", kind="server_error")


def build_app(engine: AsyncEngine, model_name: str, api_key: str | None = None,
              lora_dirs: list[str] | None = None, max_waiting: int = 1024, public_metrics: bool = False) -> FastAPI:
    """`lora_dirs`: the only directories runtime-loaded adapters may come from
    (none: runtime loading is off). `max_waiting`: queue length past which new
    requests get 429. With `api_key`, every path but /health needs it
    (/metrics names every adapter and its traffic; /docs and /openapi.json
    describe the API), and /metrics too unless `public_metrics`."""
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
        message = str(err.get("msg")).removeprefix("Value error, ")
        return error_response(400, f"{field or 'body'}: {message}", field)

    @app.exception_handler(HTTPException)
    async def _http_error(_: Request, e: HTTPException):  # unknown paths and methods, unparseable bodies
        metrics.errors.labels(str(e.status_code)).inc()
        kind = "not_found_error" if e.status_code == 404 else "invalid_request_error"
        message = str(e.detail)
        if e.__cause__ is not None:  # e.g. a body that is not UTF-8, or JSON nested past the parser's depth
            message += f" ({type(e.__cause__).__name__}: {e.__cause__})"
        response = error_response(e.status_code, message, kind=kind)
        response.headers.update(e.headers or {})
        return response

    @app.exception_handler(EngineDeadError)
    async def _engine_dead(_: Request, e: EngineDeadError):  # e.g. an adapter call after the loop died
        metrics.errors.labels("503").inc()
        return error_response(503, str(e), kind="server_error")

    @app.exception_handler(Exception)
    async def _internal_error(_: Request, e: Exception):  # a bug: still the documented shape
        metrics.errors.labels("500").inc()
        return error_response(500, f"internal error: {type(e).__name__}: {e}", kind="server_error")

    @app.get("/metrics")
    async def prometheus():
        return Response(metrics.render(), media_type="text/plain; version=0.0.4")

    @app.post("/v1/load_lora_adapter")
    async def load_lora(body: LoadLoraRequest):
        if not allowed:
            raise APIError(403, "runtime adapter loading is off; start the server with --lora-dir", "lora_path",
                           "permission_error")
        try:
            check_name(body.lora_name)
        except AdapterError as e:
            raise APIError(400, str(e), "lora_name") from e
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
        try:
            await engine.call(llm.remove_adapter, body.lora_name)
        except KeyError as e:  # a concurrent unload of the same name got there first
            raise APIError(404, f"no adapter named {body.lora_name!r}", "lora_name", "not_found_error") from e
        while llm.adapter_loaded(adapter.id) and not llm.adapters.is_named(adapter.id):
            if engine.dead is not None:  # they never will
                raise APIError(503, f"the engine has stopped ({engine.dead})", kind="server_error")
            await asyncio.sleep(0.05)  # its running requests finish first
        return {"status": "ok", "lora_name": body.lora_name}

    open_paths = OPEN_PATHS + (("/metrics",) if public_metrics else ())

    @app.middleware("http")
    async def _auth(request: Request, call_next):
        if api_key and request.url.path not in open_paths:
            given = request.headers.get("authorization", "")
            if not secrets.compare_digest(given.encode(), f"Bearer {api_key}".encode()):
                metrics.errors.labels("401").inc()
                return error_response(401, "invalid or missing API key", kind="authentication_error")
        return await call_next(request)

    @app.get("/health")
    async def health():
        if engine.dead is not None:
            return JSONResponse(status_code=503, content={"status": "dead", **error_body(
                503, f"the engine has stopped ({engine.dead})", kind="server_error")})
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
        if engine.dead is not None:
            raise APIError(503, f"the engine has stopped ({engine.dead}); the server is exiting", kind="server_error")
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
    ids = [f"{rid}-{i}" for i in range(len(prompts) * body.n)]
    start = time.monotonic()
    try:  # every choice is validated, then all are queued together, so they batch from the first step
        specs = [(prompt, body.sampling(DEFAULT_MAX_TOKENS, logprobs, i % body.n), adapter, ids[i])
                 for i, prompt in enumerate(p for p in prompts for _ in range(body.n))]
        raw = await engine.submit(specs)
    except (ValueError, TypeError, KeyError, RuntimeError) as e:
        raise refusal(e) from e
    streams = [_timed(s, metrics, adapter or "base", start) for s in raw]
    if body.stream:
        usage = bool((body.stream_options or {}).get("include_usage"))
        return _EventStream(_sse(rid, body.model, streams, ids, chat, engine, usage, body.n), engine, ids)
    try:
        finals = []
        for s in streams:
            async for out in s:
                pass
            finals.append(out)
    except Exception as e:  # its adapter was unloaded after validation, or the engine stopped
        raise refusal(e) from e
    finally:  # also when the client disconnects while we wait
        for request_id in ids:
            engine.abort(request_id)
        await _close(streams)
    failed = next((o for o in finals if o.error is not None), None)
    if failed is not None:
        raise APIError(500, f"the engine failed on this request: {failed.error}", kind="server_error")
    return _final(rid, body.model, finals, body.n, chat, engine)


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


def _final(rid: str, model: str, outs: list[RequestOutput], n: int, chat: bool, engine: AsyncEngine) -> dict:
    choices = []
    for i, o in enumerate(outs):
        lp = _logprobs(o.token_ids, o.logprobs, o.top_logprobs, chat, engine) if o.logprobs else None
        if chat:
            choices.append({"index": i, "message": {"role": "assistant", "content": o.text},
                            "logprobs": lp, "finish_reason": o.finish_reason})
        else:
            choices.append({"index": i, "text": o.text, "logprobs": lp, "finish_reason": o.finish_reason})
    return {"id": rid, "object": "chat.completion" if chat else "text_completion", "created": int(time.time()),
            "model": model, "choices": choices, "usage": _usage(outs, n)}


def _usage(outs: list[RequestOutput], n: int) -> dict:
    prompt_tokens = sum(len(o.prompt_token_ids) for o in outs[::n])  # outs are prompt-major, n per prompt
    completion_tokens = sum(o.num_output_tokens for o in outs)
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def _finite(logprob: float) -> float:
    """JSON has no -inf or NaN: a token the model gave no mass reports -9999.0, as vLLM does."""
    return logprob if math.isfinite(logprob) else -9999.0


def _logprobs(ids: list[int], logprobs: list[float], top_logprobs: list[dict[int, float]], chat: bool,
              engine: AsyncEngine) -> dict:
    """The OpenAI logprobs object of some tokens (a whole choice, or a stream chunk's new ones)."""
    tok = engine.engine.tokenizer
    lps = [_finite(v) for v in logprobs]
    tops = [{t: _finite(v) for t, v in top.items()} for top in top_logprobs] or [{}] * len(ids)
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

    def chunk(i: int, out: RequestOutput) -> str:
        lp = None
        if out.new_logprobs:
            lp = _logprobs(out.new_token_ids, out.new_logprobs, out.new_top_logprobs, chat, engine)
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
                except Exception as e:  # adapter unloaded after validation, engine stopped
                    yield _error_event(refusal(e))
                    return
                if out.error is not None:
                    yield _error_event(APIError(500, f"the engine failed on this request: {out.error}",
                                                kind="server_error"))
                    return
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


class _EventStream(StreamingResponse):
    """Server-sent events whose requests are aborted however the response ends,
    also when the client is gone before the body starts (then `_sse`, never
    started, cannot clean up itself)."""

    def __init__(self, content, engine: AsyncEngine, request_ids: list[str]) -> None:
        super().__init__(content, media_type="text/event-stream")
        self.engine, self.request_ids = engine, request_ids

    async def __call__(self, scope, receive, send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            for request_id in self.request_ids:
                self.engine.abort(request_id)


def _error_event(e: APIError) -> str:
    """The last events of a stream that cannot be completed (as vLLM sends them;
    the openai client raises APIError on it)."""
    return "data: " + json.dumps(error_body(e.status, e.message, e.param, e.kind)) + "\n\ndata: [DONE]\n\n"


async def _close(streams) -> None:
    for s in streams:
        await s.aclose()


class DrainingServer(uvicorn.Server):
    """uvicorn whose first SIGTERM/SIGINT drains: requests in flight finish,
    new ones get 503, then it exits. A second signal exits at once."""

    def __init__(self, config: uvicorn.Config, engine: AsyncEngine) -> None:
        super().__init__(config)
        self.engine = engine
        engine.on_death = self._engine_died
        if engine.dead is not None:  # it died before it could tell us
            self.should_exit = True

    def _engine_died(self) -> None:
        """The engine's errors are on their way to every open request; uvicorn's
        graceful shutdown lets those responses finish, then `run` returns."""
        self.should_exit = True

    def handle_exit(self, sig, frame) -> None:
        if self.engine.draining:
            return super().handle_exit(sig, frame)
        self.engine.draining = True

        def exit_when_idle() -> None:
            while self.engine.num_unfinished() and self.engine.dead is None:
                time.sleep(0.05)
            super(DrainingServer, self).handle_exit(sig, frame)

        threading.Thread(target=exit_when_idle, name="loraserve-drain", daemon=True).start()
