"""An instance's side of the LoRA server: control calls and liveness (the
deltas themselves are `remote/backend.py`'s).

Each thread that talks has its own socket: control calls (the catalogue,
loads and unloads, from the API threads, taking turns), the heartbeat thread,
and `RemoteLoraBackend` (deltas and prefetch hints, engine thread only).

Liveness: the heartbeat pings every `heartbeat_s`. A step that waits longer
than `timeout_s` for a delta marks the server down; while it is down, a step
with adapter rows fails at once with `Unavailable` (a 503: the engine fails
just those requests, base-model ones go on). The next answered ping marks it
up again; ZeroMQ reconnects the sockets by itself. A server that restarted
(a new incarnation) or whose catalogue changed is read again, and the engine
applies the new catalogue on its own thread (`take_catalogue`).
"""

from __future__ import annotations

import itertools
import logging
import threading
import time

from loraserve.errors import Unavailable
from loraserve.lora.adapter import AdapterError, LoraAdapter
from loraserve.model.targets import Target
from loraserve.remote.config import RemoteLoraConfig
from loraserve.remote.protocol import Message
from loraserve.remote.transport import ClientSocket, Unreachable

log = logging.getLogger(__name__)


class LoraServerError(RuntimeError):
    """The LoRA server refused a message (its status and message)."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(f"the LoRA server answered {status}: {message}")
        self.status, self.message = status, message


def answer(msg: Message) -> Message:
    """The reply, or LoraServerError if it is an error."""
    if msg.kind == "error":
        raise LoraServerError(int(msg.header.get("status", 500)), str(msg.header.get("message")))
    return msg


def adapter_meta(entry: dict) -> LoraAdapter:
    """A catalogue entry as the adapter metadata the engine keeps (no weights)."""
    layout = tuple(((int(k[0]), Target(k[1])), tuple(a), tuple(b)) for k, a, b in entry["layout"])
    return LoraAdapter(id=entry["id"], name=entry["name"], path=entry["path"], rank=int(entry["rank"]),
                       alpha=0.0, use_rslora=False, target_modules=(), layout=layout,
                       num_bytes=int(entry["num_bytes"]))


class LoraServerClient:
    """Control calls (any thread) and liveness (its heartbeat thread), each on
    its own socket: a slow load never delays a ping, and the engine thread
    never waits on either (`up` and `take_catalogue` read plain state)."""

    def __init__(self, config: RemoteLoraConfig) -> None:
        self.config = config
        self._sock = ClientSocket(config.endpoint)
        self._sock_lock = threading.Lock()
        """Held for a control call's whole round trip (API threads take turns)."""
        self._state_lock = threading.Lock()
        """Held only to read or swap the catalogue (never across the network)."""
        self._ids = itertools.count(1)
        self.up = False
        """Whether deltas can be asked for: False from a delta's timeout, or
        `timeout_s` without an answered ping, until the next answered ping."""
        self._last_answer = time.monotonic()
        self._ever_up = False
        self.incarnation: str | None = None
        self.version: int | None = None
        self._catalogue: list[dict] | None = None
        """A catalogue read since the engine last took one."""
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def call(self, header: dict, timeout_s: float | None = None, sock: ClientSocket | None = None) -> Message:
        """One request and its reply. Raises Unavailable if the server does not
        answer in time, LoraServerError if it refuses."""
        if sock is None:
            with self._sock_lock:
                return self.call(header, timeout_s, self._sock)
        msg_id = next(self._ids)
        try:
            sock.send({**header, "id": msg_id})
            return answer(sock.recv(timeout_s or self.config.timeout_s, want_id=msg_id))
        except Unreachable as e:
            raise Unavailable(str(e)) from None

    def connect(self) -> list[dict]:
        """Read the catalogue at start. A server that is not there yet is no
        error: the instance serves the base model, and the heartbeat reads the
        catalogue once the server answers."""
        try:
            with self._sock_lock:
                return self._refresh(self._sock)
        except Unavailable:
            log.warning("the LoRA server at %s does not answer yet; serving the base model until it does",
                        self.config.endpoint)
            return []

    def start(self) -> None:
        self._thread = threading.Thread(target=self._beat, name="loraserve-lora-heartbeat", daemon=True)
        self._thread.start()

    def mark_down(self) -> None:
        """A delta went unanswered: adapter rows fail at once until a ping is answered."""
        if self.up:
            log.error("the LoRA server at %s does not answer deltas", self.config.endpoint)
        self.up = False

    def _refresh(self, sock: ClientSocket) -> list[dict]:
        """Read the catalogue (offered to the engine unless a newer one was); returns it."""
        msg = self.call({"kind": "catalogue"}, sock=sock)
        self._offer(msg)
        self._answered()
        return msg.header["adapters"]

    def _offer(self, msg: Message) -> None:
        """Keep a catalogue read on any thread unless a newer one was read
        already (a heartbeat's read that crossed a load must not undo it)."""
        h = msg.header
        with self._state_lock:
            if h["incarnation"] != self.incarnation or h["version"] > (self.version or -1):
                self._catalogue = h["adapters"]
                self.incarnation, self.version = h["incarnation"], h["version"]

    def _answered(self) -> None:
        if not self.up and self._ever_up:
            log.warning("the LoRA server at %s answers again", self.config.endpoint)
        self._last_answer = time.monotonic()
        self.up = self._ever_up = True

    def _beat(self) -> None:
        sock = ClientSocket(self.config.endpoint)  # this thread's own
        try:
            while not self._stop.wait(self.config.heartbeat_s):
                try:
                    msg = self.call({"kind": "ping"}, timeout_s=max(self.config.heartbeat_s, 1.0), sock=sock)
                    if (msg.header["incarnation"], msg.header["version"]) != (self.incarnation, self.version):
                        if self.incarnation not in (None, msg.header["incarnation"]):
                            log.warning("the LoRA server at %s restarted; reading its catalogue again",
                                        self.config.endpoint)
                        self._refresh(sock)
                    self._answered()
                except Unavailable:
                    if self.up and time.monotonic() - self._last_answer > self.config.timeout_s:
                        log.error("the LoRA server at %s has not answered for %g s", self.config.endpoint,
                                  self.config.timeout_s)
                        self.up = False
                except Exception:  # keep beating whatever one reply was
                    log.exception("LoRA server heartbeat")
        finally:
            sock.close()

    def take_catalogue(self) -> list[dict] | None:
        """The catalogue read since the last call, if any (the engine thread applies it)."""
        with self._state_lock:
            out, self._catalogue = self._catalogue, None
        return out

    def load(self, name: str, path: str) -> LoraAdapter:
        """Have the server load an adapter (its path is the server's); returns its metadata."""
        try:
            msg = self.call({"kind": "load", "name": name, "path": path}, timeout_s=max(60.0, self.config.timeout_s))
            catalogue = self.call({"kind": "catalogue"})
            self._offer(catalogue)  # at least as new as the load: what the engine applies next shows it
            entries = catalogue.header["adapters"]
        except LoraServerError as e:
            if e.status in (400, 403, 404):  # a bad adapter, a path it may not read: the request's fault
                raise AdapterError(e.message) from None
            raise
        entry = next((e for e in entries if e["name"] == name and e["id"] == msg.header["adapter"]), None)
        if entry is None:
            raise AdapterError(f"adapter {name!r} was unloaded from the LoRA server as it was being loaded")
        return adapter_meta(entry)

    def unload(self, name: str) -> None:
        try:
            self.call({"kind": "unload", "name": name})
        except LoraServerError as e:
            if e.status != 404:  # already gone there: fine
                raise

    def stats(self) -> dict:
        return self.call({"kind": "stats"}).header["stats"]

    def close(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        self._sock.close()
