"""What travels between the endpoint and its replicas besides outputs: the
routing key a request carries, and refusals as plain data.

The project's errors keep fields of their own (`InvalidRequest.field`) that do
not survive pickling through a Ray task error, and a refusal is an answer, not a
crash: a replica returns it as a `Refusal` and the endpoint raises the same kind
of error there, so the HTTP layer maps it to the same status as one process would.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from loraserve.errors import Draining, EngineDead, InvalidRequest, Overloaded, Unavailable, UnknownModel
from loraserve.lora.files import AdapterError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class RouteKey:
    """What the request router reads of a call (its `route` keyword)."""

    adapter: str | None = None
    session: str | None = None
    tokens: int = 0
    """Prompt tokens (estimated for text) plus max_tokens: the work it brings."""

    pin: str | None = None
    """A replica's id: the call goes there and nowhere else (adapter loads, stats)."""


@dataclass(frozen=True)
class Refusal:
    kind: str
    message: str
    field: str | None = None


KINDS: dict[str, tuple[type[Exception], object]] = {
    "AdapterError": (AdapterError, lambda m, f: AdapterError(m, f or "lora_path")),
    "InvalidRequest": (InvalidRequest, lambda m, f: InvalidRequest(f, m)),
    "UnknownModel": (UnknownModel, lambda m, f: UnknownModel(f or "", m)),
    "Overloaded": (Overloaded, lambda m, f: Overloaded(m)),
    "Draining": (Draining, lambda m, f: Draining(m)),
    "Unavailable": (Unavailable, lambda m, f: Unavailable(m)),
    "EngineDead": (EngineDead, lambda m, f: EngineDead(m)),
}
"""The refusals a replica may answer with, rebuilt on the endpoint (the first match wins: AdapterError
before InvalidRequest, its base)."""


def refusal(e: Exception) -> Refusal | None:
    """The refusal for a known kind of error (None: a bug, which stays an exception)."""
    for kind, (cls, _) in KINDS.items():
        if isinstance(e, cls):
            field = e.name if isinstance(e, UnknownModel) else getattr(e, "field", None)
            return Refusal(kind, str(e), field)
    return None


def raise_refusal(r: Refusal):
    """Raise it as the error it was; "Internal" (a replica's bug) as a RuntimeError, a 500."""
    make = KINDS[r.kind][1] if r.kind in KINDS else lambda m, f: RuntimeError(m)
    raise make(r.message, r.field)


def answer(e: Exception) -> Refusal:
    """What a replica answers for an error: its refusal, or for anything else (a bug) an internal error."""
    r = refusal(e)
    if r is None:
        log.error("replica: internal error", exc_info=e)
        return Refusal("Internal", f"{type(e).__name__}: {e}")
    return r


def as_error(r: Refusal) -> Exception:
    """The error a refusal stands for, to hand to a stream's consumer."""
    try:
        raise_refusal(r)
    except Exception as e:
        return e
