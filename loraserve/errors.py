"""The errors a request can meet, by kind: the HTTP layer maps each kind to a
status in one place (`server/errors.py`), so nothing depends on a builtin
exception's type meaning something (a KeyError from a bug is a 500, not a 404)."""

from __future__ import annotations


class RequestError(Exception):
    """Something about one request that the engine refuses or cannot do."""


class InvalidRequest(RequestError, ValueError):
    """A field out of range or malformed input. `field` names it (the OpenAI error's `param`)."""

    def __init__(self, field: str | None, message: str) -> None:
        super().__init__(message)
        self.field = field


class UnknownModel(RequestError, KeyError):
    """No base model or adapter of that name (or it was unloaded meanwhile)."""

    def __init__(self, name: str, message: str | None = None) -> None:
        super().__init__(message or f"no adapter named {name!r}")
        self.name = name

    def __str__(self) -> str:  # the message, not KeyError's repr of it
        return str(self.args[0])


class Overloaded(RequestError):
    """The queue is full: retry later."""


class Draining(RequestError):
    """The server is shutting down: no new requests."""


class Unavailable(RequestError):
    """A service the request needs is down (the LoRA server): retry later (a 503)."""


class EngineDead(RequestError):
    """The engine loop has stopped: nothing more will be computed."""
