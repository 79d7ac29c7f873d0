"""The request body: its size limit, enforced before anything reads it, and
a JSON parser fast enough to run on the event loop.

A body whose Content-Length is over the limit is answered 413 at once, unread.
A chunked body (no Content-Length) is counted as it arrives, and refused with
413 as soon as it passes the limit: at most the limit is ever buffered.
"""

from __future__ import annotations

import json
from typing import Callable

import pydantic_core
from fastapi import HTTPException, Request
from fastapi.routing import APIRoute

from loraserve.server.errors import APIError, error_response


def too_large(limit: int) -> APIError:
    return APIError(413, f"the request body is over the server's limit of {limit} bytes (--max-request-bytes)",
                    kind="invalid_request_error")


class BodyLimit:
    """ASGI middleware: `count(status)` for each refusal made here (the rest
    go through the app's error handlers, which count their own)."""

    def __init__(self, app, max_bytes: int, count: Callable[[int], None]) -> None:
        self.app, self.max_bytes, self.count = app, max_bytes, count

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        length = dict(scope["headers"]).get(b"content-length")
        if length is not None and length.isdigit() and int(length) > self.max_bytes:
            self.count(413)
            response = error_response(too_large(self.max_bytes))
            response.headers["Connection"] = "close"
            return await response(scope, receive, send)
        seen = 0

        async def counted():
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.max_bytes:  # FastAPI passes an HTTPException from reading the body through
                    raise HTTPException(413, too_large(self.max_bytes).message, headers={"Connection": "close"})
            return message

        await self.app(scope, counted, send)



JSON_FALLBACK_BYTES = 1 << 20
"""Bodies up to this size that the fast parser refuses are parsed again by
`json`, for its error messages (and for lone surrogate escapes, which it
accepts and the API then names); a larger one is refused with the fast parser's."""


class _FastJSONRequest(Request):
    async def json(self):
        if not hasattr(self, "_json"):
            body = await self.body()
            try:
                self._json = pydantic_core.from_json(body)
            except ValueError as e:
                if len(body) > JSON_FALLBACK_BYTES:
                    raise HTTPException(400, "There was an error parsing the body") from e
                self._json = json.loads(body)
        return self._json


class FastJSONRoute(APIRoute):
    """A route whose JSON body is parsed by pydantic's parser, not `json`: the
    event loop parses every body, and a body of 64 MiB of small numbers takes
    `json` 3 seconds and pydantic's 0.15 (the issue's stalled /health)."""

    def get_route_handler(self):
        handler = super().get_route_handler()

        async def fast_json(request: Request):
            return await handler(_FastJSONRequest(request.scope, request.receive))

        return fast_json
