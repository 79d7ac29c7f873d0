"""Errors as the OpenAI API shapes them, and the one place that maps a kind of
failure to its HTTP status.

Every error body is `{"error": {"message", "type", "param", "code"}}`; an
exception of no known kind is a logged 500, never a guess at a 4xx.
"""

from __future__ import annotations

import json
import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException

from loraserve.errors import Draining, EngineDead, InvalidRequest, Overloaded, RequestError, Unavailable, UnknownModel

log = logging.getLogger(__name__)


class APIError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None, kind: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.param, self.kind = status, message, param, kind


STATUS: list[tuple[type[Exception], int, str]] = [
    (InvalidRequest, 400, "invalid_request_error"),  # AdapterError too
    (UnknownModel, 404, "not_found_error"),
    (Overloaded, 429, "rate_limit_error"),
    (Draining, 503, "server_error"),
    (EngineDead, 503, "server_error"),
    (Unavailable, 503, "server_error"),  # the LoRA server is down
]
"""Each kind of failure and its status; the first match wins."""


def api_error(e: Exception) -> APIError:
    """The API error for an exception raised while serving a request."""
    if isinstance(e, APIError):
        return e
    for kind, status, label in STATUS:
        if isinstance(e, kind):
            param = getattr(e, "field", None) or ("model" if isinstance(e, UnknownModel) else None)
            return APIError(status, str(e), param, label)
    log.error("internal error while serving a request", exc_info=e)
    return APIError(500, f"internal error: {type(e).__name__}: {e}", kind="server_error")


def error_body(e: APIError) -> dict:
    return {"error": {"message": e.message, "type": e.kind, "param": e.param, "code": e.status}}


def error_response(e: APIError) -> JSONResponse:
    response = JSONResponse(status_code=e.status, content=error_body(e))
    if e.status == 429:
        response.headers["Retry-After"] = "1"
    return response


def error_event(e: APIError) -> str:
    """The last events of a stream that cannot be completed (as vLLM sends them;
    the openai client raises APIError on it)."""
    return "data: " + json.dumps(error_body(e)) + "\n\ndata: [DONE]\n\n"


def install(app: FastAPI, count) -> None:
    """Every error the app returns in the OpenAI shape; `count(status)` for each."""

    def respond(e: APIError) -> JSONResponse:
        count(e.status)
        return error_response(e)

    @app.exception_handler(APIError)
    @app.exception_handler(RequestError)
    async def _known(_: Request, e: Exception):
        return respond(api_error(e))

    @app.exception_handler(RequestValidationError)
    async def _validation(_: Request, e: RequestValidationError):
        err = e.errors()[0]
        field = ".".join(str(x) for x in err.get("loc", ())[1:]) or None
        message = str(err.get("msg")).removeprefix("Value error, ")
        return respond(APIError(400, f"{field or 'body'}: {message}", field))

    @app.exception_handler(HTTPException)
    async def _http(_: Request, e: HTTPException):  # unknown paths and methods, unparseable bodies
        message = str(e.detail)
        if e.__cause__ is not None:  # e.g. a body that is not UTF-8, or JSON nested past the parser's depth
            message += f" ({type(e.__cause__).__name__}: {e.__cause__})"
        kind = "not_found_error" if e.status_code == 404 else "invalid_request_error"
        response = respond(APIError(e.status_code, message, kind=kind))
        response.headers.update(e.headers or {})
        return response

    @app.exception_handler(Exception)
    async def _internal(_: Request, e: Exception):  # a bug: logged, and still the documented shape
        return respond(api_error(e))
