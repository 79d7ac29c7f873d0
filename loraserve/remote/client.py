"""An instance's side of the LoRA server: control calls, liveness, and the
`LoraBackend` whose deltas are computed remotely.

Two sockets, one per thread that talks: `LoraServerClient` (control: the
catalogue, loads and unloads from the API threads, pings from its heartbeat
thread) and `RemoteLoraBackend` (deltas and prefetch hints, engine thread only).

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
from typing import Sequence

import torch

from loraserve.errors import Unavailable, UnknownModel
from loraserve.lora.adapter import AdapterError, LoraAdapter
from loraserve.model.lora import Routing
from loraserve.model.spec import ModelSpec
from loraserve.model.targets import Target, out_dim
from loraserve.remote.config import RemoteLoraConfig
from loraserve.remote.protocol import Message, position
from loraserve.remote.transport import ClientSocket, Unreachable

log = logging.getLogger(__name__)


class LoraServerError(RuntimeError):
    """The LoRA server refused a message (its status and message)."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(f"the LoRA server answered {status}: {message}")
        self.status, self.message = status, message


def _answer(msg: Message) -> Message:
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
    def __init__(self, config: RemoteLoraConfig) -> None:
        self.config = config
        self._sock = ClientSocket(config.endpoint)
        self._lock = threading.Lock()
        self._ids = itertools.count(1)
        self.up = False
        self.incarnation: str | None = None
        self.version: int | None = None
        self._catalogue: list[dict] | None = None
        """A catalogue read since the engine last took one."""
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def call(self, header: dict, timeout_s: float | None = None) -> Message:
        """One request and its reply (any thread). Raises Unavailable if the
        server does not answer in time, LoraServerError if it refuses."""
        with self._lock:
            msg_id = next(self._ids)
            try:
                self._sock.send({**header, "id": msg_id})
                return _answer(self._sock.recv(timeout_s or self.config.timeout_s, want_id=msg_id))
            except Unreachable as e:
                self.up = False
                raise Unavailable(str(e)) from None

    def connect(self) -> list[dict]:
        """Read the catalogue (at start); raises Unavailable if the server is not there."""
        self._refresh()
        return self.take_catalogue() or []

    def start(self) -> None:
        self._thread = threading.Thread(target=self._beat, name="loraserve-lora-heartbeat", daemon=True)
        self._thread.start()

    def _refresh(self) -> None:
        msg = self.call({"kind": "catalogue"})
        with self._lock:
            self._catalogue = msg.header["adapters"]
            self.incarnation, self.version = msg.header["incarnation"], msg.header["version"]
            self.up = True

    def _beat(self) -> None:
        while not self._stop.wait(self.config.heartbeat_s):
            try:
                msg = self.call({"kind": "ping"}, timeout_s=max(self.config.heartbeat_s, 1.0))
                if (msg.header["incarnation"], msg.header["version"]) != (self.incarnation, self.version):
                    if self.incarnation is not None and msg.header["incarnation"] != self.incarnation:
                        log.warning("the LoRA server at %s restarted; reading its catalogue again",
                                    self.config.endpoint)
                    self._refresh()
                if not self.up:
                    log.warning("the LoRA server at %s answers again", self.config.endpoint)
                self.up = True
            except Unavailable:
                if self.up:
                    log.error("the LoRA server at %s does not answer", self.config.endpoint)
                self.up = False
            except Exception:  # keep beating whatever one reply was
                log.exception("LoRA server heartbeat")

    def take_catalogue(self) -> list[dict] | None:
        """The catalogue read since the last call, if any (the engine thread applies it)."""
        with self._lock:
            out, self._catalogue = self._catalogue, None
        return out

    def load(self, name: str, path: str) -> LoraAdapter:
        """Have the server load an adapter (its path is the server's); returns its metadata."""
        try:
            msg = self.call({"kind": "load", "name": name, "path": path}, timeout_s=max(60.0, self.config.timeout_s))
        except LoraServerError as e:
            if e.status in (400, 403, 404):  # a bad adapter, a path it may not read: the request's fault
                raise AdapterError(e.message) from None
            raise
        entries = self.call({"kind": "catalogue"}).header["adapters"]
        entry = next(e for e in entries if e["name"] == name and e["id"] == msg.header["adapter"])
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


class RemoteLoraBackend:
    """The model's `LoraBackend` with every delta computed on the LoRA server.

    `begin` lays a step's rows out base model first, then by adapter, and
    notes each adapter row's adapter. `submit` sends a projection's adapter
    rows (for experts, the adapter rows' (token, expert) pairs with their
    expert ids) before the base matmul, or, without overlap, `wait` sends them
    after it; `wait` takes the delta (pushed into the buffer registered for it,
    or pulled) and adds it in place. Base-model rows never travel.
    """

    def __init__(self, spec: ModelSpec, client: LoraServerClient, adapters: dict[str, LoraAdapter]) -> None:
        self.spec = spec
        self.client = client
        self.config = client.config
        self.adapters = adapters
        """id → metadata (the layout says which projections each adapter adapts)."""
        self.sock = ClientSocket(client.config.endpoint)
        self._ids = itertools.count(1)
        self.slots = UnboundedBudget()
        self.num_base = 0
        self.step_adapters: list[str] = []
        self.row_adapter: torch.Tensor | None = None
        self.targets: set[tuple[int, Target]] = set()
        self.plan: list[int] | None = None
        """Positions of the step's deltas, sent with its first one (then None)."""
        self.wait_s = 0.0
        """Seconds the engine thread spent waiting for deltas (the remote-LoRA wait, for metrics)."""
        self.steps = 0
        """Steps with adapter rows (wait_s / steps: the mean remote-LoRA wait per step)."""

    @property
    def active(self) -> bool:
        return self.row_adapter is not None

    def begin(self, adapters: Sequence[str | None], rows: Sequence[int], loads: Sequence) -> list[int]:
        order = sorted(range(len(adapters)), key=lambda i: "" if adapters[i] is None else adapters[i])
        self.num_base = sum(rows[i] for i in order if adapters[i] is None)
        ids = list(dict.fromkeys(adapters[i] for i in order if adapters[i] is not None))
        self.step_adapters = ids
        self.row_adapter = None
        self.targets = set()
        if ids:
            if not self.client.up:
                raise Unavailable(f"the LoRA server at {self.config.endpoint} is down")
            self.steps += 1
            index = {a: k for k, a in enumerate(ids)}
            self.row_adapter = torch.tensor([index[adapters[i]] for i in order if adapters[i] is not None
                                             for _ in range(rows[i])], dtype=torch.int32)
            for a in ids:
                meta = self.adapters.get(a)
                if meta is None:
                    raise UnknownModel(a, f"adapter {a} is not in the LoRA server's catalogue")
                self.targets.update(key for key, _, _ in meta.layout)
            self.plan = sorted(position(self.spec, layer, target) for layer, target in self.targets)
        return order

    def submit(self, layer: int, target: Target, x: torch.Tensor, routing: Routing | None = None):
        if self.row_adapter is None or (layer, target) not in self.targets:
            return None
        if routing is None:
            rows, row_adapter, expert = None, self.row_adapter, None
            xs = x[self.num_base:]
        else:
            rows = (routing.token >= self.num_base).nonzero().flatten()
            if not len(rows):
                return None
            xs = x[rows]
            row_adapter = self.row_adapter[(routing.token[rows] - self.num_base).cpu()]
            expert = routing.expert[rows].to(torch.int32).cpu()
        header = {"kind": "delta", "id": next(self._ids), "layer": layer, "target": target.value,
                  "dtype": str(x.dtype).removeprefix("torch."), "rows": xs.shape[0], "adapters": self.step_adapters,
                  "push": self.config.mode == "push"}
        if self.plan is not None:
            header["plan"], self.plan = self.plan, None
        tensors = [xs.cpu(), row_adapter] + ([expert] if expert is not None else [])
        handle = (header, tensors, rows, target)
        if self.config.overlap:
            self._send(header, tensors, target)
        return handle

    def wait(self, handle, out: torch.Tensor) -> None:
        header, tensors, rows, target = handle
        if not self.config.overlap:
            self._send(header, tensors, target)
        start = time.perf_counter()
        try:
            if self.config.mode == "pull":
                self.sock.send({"kind": "pull", "id": header["id"]})
            msg = _answer(self.sock.recv(self.config.timeout_s, want_id=header["id"]))
        except Unreachable as e:
            self.client.up = False
            self.sock.buffers.clear()
            raise Unavailable(str(e)) from None
        except LoraServerError as e:
            self.sock.buffers.pop(header["id"], None)
            if e.status in (426, 503):
                raise Unavailable(str(e)) from None
            raise
        finally:
            self.wait_s += time.perf_counter() - start
        delta = msg.tensors[0].to(out.device)
        if rows is None:
            out[self.num_base:] += delta
        else:
            out.index_add_(0, rows, delta.to(out.dtype))

    def _send(self, header: dict, tensors: list[torch.Tensor], target: Target) -> None:
        if self.config.mode == "push":
            dtype = tensors[0].dtype
            self.sock.register(header["id"], torch.empty(header["rows"], out_dim(self.spec, target), dtype=dtype))
        try:
            self.sock.send(header, tensors)
        except Unreachable as e:
            self.client.up = False
            raise Unavailable(str(e)) from None

    def hint(self, adapter_ids: list[str]) -> None:
        """Requests for these adapters were queued: the server may start loading them."""
        if adapter_ids and self.client.up:
            try:
                self.sock.send({"kind": "hint", "adapters": adapter_ids})
            except Unreachable:
                pass  # a hint is advice: the delta will ask again

    def forget(self, adapter_id: str) -> None:
        """Nothing to drop here: the adapter's weights live on the server."""

    def close(self) -> None:
        self.sock.close()


class UnboundedBudget:
    """The scheduler's adapter budget when adapters live on the LoRA server:
    any number of distinct adapters may run, and none is ever loaded here."""

    def can_acquire(self, adapter: str) -> bool:
        return True

    def acquire(self, adapter: str) -> bool:
        return False

    def release(self, adapter: str) -> None:
        pass

    def resident(self) -> dict[str, int]:
        return {}

