"""The request body limit, enforced before anything reads the body.

A body whose Content-Length is over the limit is answered 413 at once, unread.
A chunked body (no Content-Length) is counted as it arrives, and refused with
413 as soon as it passes the limit: at most the limit is ever buffered.
"""

from __future__ import annotations

from typing import Callable

from fastapi import HTTPException

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
