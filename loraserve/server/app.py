"""The OpenAI-compatible HTTP API: its routes, over the engine's client interface.

The routes only parse and check what HTTP owns (the API key, which directories
adapters may come from, the model name) and hand everything else to the
`AsyncEngine`. Errors are typed (`loraserve/errors.py`) and become OpenAI-style
JSON errors in one place (`server/errors.py`); responses are shaped in
`server/openai_format.py` and streamed in `server/responses.py`.
"""

from __future__ import annotations

import asyncio
import secrets
import time
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response

from loraserve.engine.async_engine import AsyncEngine
from loraserve.errors import InvalidRequest, UnknownModel
from loraserve.lora.registry import check_name
from loraserve.server import errors
from loraserve.server.body import BodyLimit, FastJSONRoute
from loraserve.server.errors import APIError, error_body
from loraserve.server.limits import ServerLimits
from loraserve.server.metrics import Metrics
from loraserve.server.protocol import ChatCompletionRequest, CompletionRequest, LoadLoraRequest, UnloadLoraRequest
from loraserve.server.responses import respond

OPEN_PATHS = ("/health",)
"""What answers without the API key: the probe a supervisor or load balancer sends."""


def build_app(client: AsyncEngine, model_name: str, api_key: str | None = None,
              lora_dirs: list[str] | None = None, public_metrics: bool = False,
              limits: ServerLimits = ServerLimits()) -> FastAPI:
    """`lora_dirs`: the only directories runtime-loaded adapters may come from
    (none: runtime loading is off; with a LoRA server, its own --lora-dir decides). With `api_key`, every path but /health
    needs it (/metrics names every adapter and its traffic; /docs and
    /openapi.json describe the API), and /metrics too unless `public_metrics`.
    `limits`: what a request may be at most (server/limits.py)."""
    app = FastAPI(title="loraserve", version="0.1.0")
    app.router.route_class = FastJSONRoute  # bodies parsed by pydantic's parser (see body.py)
    metrics = Metrics(client.stats, client.info, getattr(client, "replica_view", None))  # a scaled-out endpoint's
    app.state.metrics = metrics
    errors.install(app, lambda status: metrics.errors.labels(str(status)).inc())
    allowed = [Path(d).resolve() for d in lora_dirs or []]
    open_paths = OPEN_PATHS + (("/metrics",) if public_metrics else ())
    app.add_middleware(BodyLimit, max_bytes=limits.max_request_bytes,
                       count=lambda status: metrics.errors.labels(str(status)).inc())

    @app.middleware("http")
    async def _auth(request: Request, call_next):
        if api_key and request.url.path not in open_paths:
            given = request.headers.get("authorization", "")
            if not secrets.compare_digest(given.encode(), f"Bearer {api_key}".encode()):
                metrics.errors.labels("401").inc()
                return errors.error_response(APIError(401, "invalid or missing API key",
                                                      kind="authentication_error"))
        return await call_next(request)

    @app.get("/health")
    async def health():
        status = client.health()
        if status == "dead":
            return JSONResponse(status_code=503, content={"status": "dead", **error_body(APIError(
                503, f"the engine has stopped ({client.dead})", kind="server_error"))})
        return {"status": status}

    @app.get("/metrics")
    async def prometheus():
        await client.refresh_stats()
        return Response(metrics.render(), media_type="text/plain; version=0.0.4")

    @app.get("/v1/models")
    async def models():
        now = int(time.time())
        data = [{"id": model_name, "object": "model", "created": now, "owned_by": "loraserve", "parent": None,
                 "root": client.model_root}]
        for a in client.adapters():
            data.append({"id": a.name, "object": "model", "created": now, "owned_by": "loraserve",
                         "parent": model_name, "root": a.path})
        return {"object": "list", "data": data}

    @app.post("/v1/load_lora_adapter")
    async def load_lora(body: LoadLoraRequest):
        remote = client.adapters_remote  # then the LoRA server reads the path, and its --lora-dir decides
        if not allowed and not remote:
            raise APIError(403, "runtime adapter loading is off; start the server with --lora-dir", "lora_path",
                           "permission_error")
        check_name(body.lora_name)
        if body.lora_name == model_name:
            raise InvalidRequest("lora_name", f"an adapter named {model_name!r} is already loaded (the base model)")
        path: str | Path = body.lora_path
        if not remote:
            try:
                path = Path(body.lora_path).resolve()
            except (ValueError, OSError) as e:  # e.g. an embedded NUL byte
                raise InvalidRequest("lora_path", f"lora_path: {e}") from e
            if not any(path.is_relative_to(d) for d in allowed):
                raise APIError(403, f"lora_path {body.lora_path!r} is outside the allowed --lora-dir directories",
                               "lora_path", "permission_error")
        start = time.monotonic()
        info = await client.load_adapter(body.lora_name, path, allowed)  # its files must lie there too
        metrics.adapter_load.observe(time.monotonic() - start)
        return {"status": "ok", "lora_name": info.name, "id": info.id, "rank": info.rank}

    @app.post("/v1/unload_lora_adapter")
    async def unload_lora(body: UnloadLoraRequest):
        try:
            await client.unload_adapter(body.lora_name)
        except UnknownModel as e:
            raise APIError(404, f"no adapter named {body.lora_name!r}", "lora_name", "not_found_error") from e
        return {"status": "ok", "lora_name": body.lora_name}

    def adapter_for(model: str) -> str | None:
        if model == model_name:
            return None
        if not any(a.name == model for a in client.adapters()):
            raise UnknownModel(model, f"the model {model!r} does not exist; see GET /v1/models")
        return model

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, request: Request):
        adapter = adapter_for(body.model)
        return await respond(client, metrics, body, adapter, _prompts(body.prompt), body.logprobs, chat=False,
                             session=_session(request, body))

    @app.post("/v1/chat/completions")
    async def chat(body: ChatCompletionRequest, request: Request):
        adapter = adapter_for(body.model)
        messages = [m.for_template() for m in body.messages]
        # the template only adds text: messages that cannot fit are refused unrendered
        client.check_prompt_chars(sum(len(m["content"] or "") for m in messages), "messages")
        try:  # on a worker thread: rendering and tokenizing a long conversation takes a while
            prompt = await asyncio.to_thread(client.chat_prompt, messages, body.tools, body.chat_template_kwargs)
        except Exception as e:  # template errors are the request's fault (e.g. bad roles)
            raise InvalidRequest("messages", f"messages: {e}") from e
        if body.max_completion_tokens:
            body.max_tokens = body.max_completion_tokens
        logprobs = (body.top_logprobs or 0) if body.logprobs else None
        return await respond(client, metrics, body, adapter, [prompt], logprobs, chat=True,
                             session=_session(request, body))

    return app


def _session(request: Request, body) -> str | None:
    """The conversation a request belongs to: the X-Session-Id header, else OpenAI's `user` field."""
    session = request.headers.get("x-session-id") or body.user
    if session is not None and len(session) > 256:
        raise InvalidRequest("user", "X-Session-Id: at most 256 characters")
    return session


def _prompts(prompt) -> list[str | list[int]]:
    if isinstance(prompt, str):
        return [prompt]
    if prompt and isinstance(prompt[0], int):
        return [prompt]
    if not prompt:
        raise InvalidRequest("prompt", "prompt: must not be empty")
    return list(prompt)
