"""The LoRA server: every adapter in one place, deltas computed for many instances.

One thread runs the loop: take every message that has arrived, answer the
control ones at once (hello, catalogue, load, unload, hint, ping, stats),
and queue deltas. A delta waits a short window (`batch_window_us`) for deltas
of the same (layer, projection) from other instances; then each such group
whose adapters have that layer's weights in a slot runs as one batched kernel
(`remote/compute.py`), and each instance gets its rows back: pushed at once,
or kept until it pulls them. Deltas whose weights are still travelling wait;
so does nothing else. In idle time the store fills hinted adapters' slots.

Anything malformed gets an error reply naming the problem; the loop never
dies of a message.
"""

from __future__ import annotations

import logging
import threading
import time
import uuid
from collections import defaultdict
from dataclasses import dataclass

import torch

from loraserve.clock import MonotonicClock
from loraserve.errors import InvalidRequest, UnknownModel
from loraserve.model.spec import ModelSpec
from loraserve.model.targets import Target, in_dim, layer_targets
from loraserve.lora_server.compute import batched_delta
from loraserve.remote.config import LoraServerConfig
from loraserve.lora_server.metrics import ServerMetrics
from loraserve.remote.protocol import (DTYPES, MAX_ROWS, Message, ProtocolError, decode, encode, error, field,
                                       position)
from loraserve.lora_server.store import AdapterStore
from loraserve.remote import nixl_transport
from loraserve.remote.transport import ServerSocket

log = logging.getLogger(__name__)

PULL_TTL_S = 60.0
"""How long a pull-mode result waits to be pulled before it is dropped."""

WEIGHT_POLL_S = 0.0005
"""How long the loop sleeps on the socket while deltas wait for adapter weights."""


@dataclass
class Delta:
    """One instance's rows of one (layer, target), parsed and checked."""

    peer: bytes
    id: int
    layer: int
    target: Target
    dtype: torch.dtype
    push: bool
    x: torch.Tensor
    """[N, in] the projection's input rows (only rows under some adapter)."""

    adapters: list[str]
    """Adapter ids the rows refer to."""

    row_adapter: torch.Tensor
    """[N] each row's index into `adapters`."""

    expert: torch.Tensor | None
    """[N] each row's expert (expert targets only)."""

    arrived: float

    position: int = 0
    """Where (layer, target) comes in a forward pass: deltas of one step arrive in this order."""

    at: int | None = None
    """NIXL push: where in the instance's registered arena the result is to be written."""


class LoraServer:
    def __init__(self, config: LoraServerConfig, listen: str) -> None:
        self.config = config
        self.spec = ModelSpec.from_dir(config.model)
        self.clock = MonotonicClock()
        self.store = AdapterStore(self.spec, config, self.clock)
        self.sock = ServerSocket(listen)
        self.endpoint = self.sock.endpoint
        self.incarnation = uuid.uuid4().hex[:12]
        """Changes with every start: an instance that sees a new one re-reads the catalogue."""
        self.metrics = ServerMetrics(self)
        self.pending: list[Delta] = []
        self.results: dict[tuple[bytes, int], tuple[list, float]] = {}
        """Pull mode: (peer, id) → (result frames, when computed)."""
        self.pullers: set[tuple[bytes, int]] = set()
        """Pulls that came before their result."""
        self.last_seen: dict[bytes, tuple[float, int]] = {}
        """Instance → when its latest delta arrived, and that delta's position in the forward pass."""
        self.plans: dict[bytes, frozenset[int]] = {}
        """Instance → the positions its current step sends deltas for."""
        self.nixl: nixl_transport.NixlWriter | None = None
        """One-sided writes of pushed results, once an instance registered an arena (`remote/nixl_transport.py`)."""
        self.stop = threading.Event()

    # -- the loop --------------------------------------------------------------

    def serve_forever(self) -> None:
        try:
            while not self.stop.is_set():
                self.run_once()
        finally:
            self.close()

    def run_once(self, idle_wait: float = 0.05) -> None:
        # deltas waiting for weights poll briefly (the mover thread needs the CPU); prefetch work does not wait
        busy = self.pending or (self.nixl is not None and self.nixl.busy)
        wait = WEIGHT_POLL_S if busy else 0 if self.store.prefetch else idle_wait
        if self.sock.poll(wait):
            self._drain()
        if self.pending and self.config.batch_window_us:
            # give instances that are behind in their forward pass a moment to catch up
            window_end = min(d.arrived for d in self.pending) + self.config.batch_window_us / 1e6
            while ((left := window_end - time.monotonic()) > 0 and self._someone_is_coming()
                   and self.sock.poll(left)):
                self._drain()
        if self.pending:
            self._compute()
        if not self.pending:
            self.store.advance()
        self._expire_results()
        if self.nixl is not None and self.nixl.busy:
            for peer, msg_id in self.nixl.progress():
                self.sock.send(peer, error("the NIXL write of this result failed", 503, id=msg_id))
        self.metrics.refresh()

    def _someone_is_coming(self) -> bool:
        """Whether an instance active in the last second is behind some pending
        delta in its forward pass (its latest delta was for an earlier layer or
        projection), so its rows for that delta's projection are on the way.
        Waiting for it puts instances in step, and their deltas batch from then
        on; an instance already past that projection will not send it before
        its next step, and waiting for it would only add latency."""
        now = time.monotonic()
        for peer in [p for p, (t, _) in self.last_seen.items() if now - t > 1.0]:
            del self.last_seen[peer]
        waiting = {(d.peer, d.position) for d in self.pending}
        for d in self.pending:
            for peer, (_, position) in self.last_seen.items():
                if (peer != d.peer and position < d.position and d.position in self.plans.get(peer, ())
                        and (peer, d.position) not in waiting):
                    return True
        return False

    def _drain(self) -> bool:
        """Handle every message waiting; returns whether there were any."""
        got = False
        while (item := self.sock.recv()) is not None:
            got = True
            peer, frames = item
            self._handle(peer, frames)
        return got

    def _handle(self, peer: bytes, frames: list) -> None:
        msg_id = None
        try:
            msg = decode(frames)
            msg_id = msg.header.get("id")
            reply = self._dispatch(peer, msg)
        except ProtocolError as e:
            self.metrics.refused.labels(str(e.status)).inc()
            reply = error(str(e), e.status, id=msg_id)
        except UnknownModel as e:
            self.metrics.refused.labels("404").inc()
            reply = error(f"no adapter named {e.args[0]!r}", 404, id=msg_id)
        except InvalidRequest as e:  # AdapterError: a bad adapter or name
            self.metrics.refused.labels("400").inc()
            reply = error(e.message, 400, id=msg_id, field=e.field)
        except Exception as e:  # a bug: answer, log, keep serving
            log.exception("handling a %s message failed", frames and bytes(frames[0])[:40])
            reply = error(f"{type(e).__name__}: {e}", 500, id=msg_id)
        if reply is not None:
            self.sock.send(peer, reply)

    def _dispatch(self, peer: bytes, msg: Message) -> list | None:
        h, kind = msg.header, msg.kind
        if kind == "delta":
            delta = self._parse_delta(peer, msg)
            if "plan" in msg.header:
                plan = field(msg.header, "plan", list)
                if len(plan) > self.spec.num_layers * len(Target) or not all(isinstance(p, int) for p in plan):
                    raise ProtocolError("'plan' must list at most one position per layer and target")
                self.plans[peer] = frozenset(plan)
            self.pending.append(delta)
            self.last_seen[peer] = (delta.arrived, delta.position)
            return None
        if kind == "pull":
            key = (peer, field(h, "id", int))
            if key in self.results:
                return self.results.pop(key)[0]
            self.pullers.add(key)
            return None
        if kind == "nixl":
            return self._nixl_register(peer, h)
        if kind == "hint":
            self.store.hint([a for a in field(h, "adapters", list) if isinstance(a, str)])
            return None
        if kind in ("ping", "hello"):
            return encode({"kind": kind, "id": h.get("id"), "incarnation": self.incarnation,
                           "version": self.store.version})
        if kind == "catalogue":
            return encode({"kind": "catalogue", "id": h.get("id"), "incarnation": self.incarnation,
                           "version": self.store.version, "adapters": self.store.catalogue()})
        if kind == "load":
            adapter = self.store.add(field(h, "name", str), field(h, "path", str))
            return encode({"kind": "loaded", "id": h.get("id"), "name": h["name"], "adapter": adapter.id,
                           "rank": adapter.rank, "version": self.store.version})
        if kind == "unload":
            self.store.remove(field(h, "name", str))
            return encode({"kind": "unloaded", "id": h.get("id"), "version": self.store.version})
        if kind == "stats":
            return encode({"kind": "stats", "id": h.get("id"), "stats": self.stats()})
        raise ProtocolError(f"unknown message kind {kind!r}")

    def _parse_delta(self, peer: bytes, msg: Message) -> Delta:
        h, s = msg.header, self.spec
        msg_id = field(h, "id", int)
        layer = field(h, "layer", int)
        if not 0 <= layer < s.num_layers:
            raise ProtocolError(f"layer {layer} is outside [0, {s.num_layers})")
        try:
            target = Target(field(h, "target", str))
        except ValueError:
            raise ProtocolError(f"unknown target {h['target']!r}") from None
        if target not in layer_targets(s, layer):
            raise ProtocolError(f"layer {layer} has no {target} projection")
        if h.get("dtype") not in DTYPES or DTYPES[h["dtype"]] == torch.int32:
            raise ProtocolError(f"dtype {h.get('dtype')!r} is not a float type")
        rows = field(h, "rows", int)
        if not 0 < rows <= MAX_ROWS:
            raise ProtocolError(f"rows {rows} is outside (0, {MAX_ROWS}]")
        want = 2 if target.is_expert else 1
        if len(msg.tensors) != 1 + want:
            raise ProtocolError(f"a {target} delta carries {1 + want} tensors, got {len(msg.tensors)}")
        x = msg.tensors[0]
        if x.dtype != DTYPES[h["dtype"]] or list(x.shape) != [rows, in_dim(s, target)]:
            raise ProtocolError(f"x must be {h['dtype']}[{rows}, {in_dim(s, target)}], "
                                f"got {str(x.dtype).removeprefix('torch.')}{list(x.shape)}")
        adapters = field(h, "adapters", list)
        if not adapters or not all(isinstance(a, str) for a in adapters):
            raise ProtocolError("'adapters' must be a non-empty list of adapter ids")
        unknown = [a for a in adapters if not self.store.registry.has(a)]
        if unknown:
            raise ProtocolError(f"unknown adapter {unknown[0]!r}", 404)
        if len(set(adapters)) > self.config.max_loras:
            raise ProtocolError(f"{len(set(adapters))} adapters in one delta; this server has "
                                f"{self.config.max_loras} slots", 503)
        row_adapter, expert = msg.tensors[1], None
        _check_index(row_adapter, rows, len(adapters), "adapter")
        if target.is_expert:
            expert = msg.tensors[2]
            _check_index(expert, rows, s.num_experts, "expert")
            expert = expert.long()
        at = h.get("at")
        if at is not None and (not isinstance(at, int) or isinstance(at, bool) or at < 0):
            raise ProtocolError(f"'at' must be an offset >= 0 in the instance's NIXL arena, got {at!r}")
        return Delta(peer, msg_id, layer, target, x.dtype, bool(h.get("push", True)), x, adapters,
                     row_adapter.long(), expert, time.monotonic(), position(s, layer, target), at)

    # -- computing -------------------------------------------------------------

    def _compute(self) -> None:
        """Run every group of pending deltas whose weights are in place."""
        groups: dict[tuple[int, Target], list[Delta]] = defaultdict(list)
        for d in self.pending:
            groups[(d.layer, d.target)].append(d)
        waiting = []
        for (layer, target), deltas in groups.items():
            while deltas:
                batch, deltas = _fit(deltas, self.config.max_loras)
                waiting.extend(self._run(layer, target, batch))
        self.pending = waiting

    def _run(self, layer: int, target: Target, batch: list[Delta]) -> list[Delta]:
        """Compute one batch; returns the deltas that must wait (weights not there yet)."""
        adapters = list(dict.fromkeys(a for d in batch for a in d.adapters))
        slots: dict[str, int] = {}
        try:
            for a in adapters:
                slot = self.store.acquire(a, layer)
                if slot is None:
                    return batch
                slots[a] = slot
            start = time.perf_counter()
            x = torch.cat([d.x.to(self.store.bank.dtype) for d in batch]).to(self.store.bank.device)
            slot = torch.cat([torch.tensor([slots[a] for a in d.adapters])[d.row_adapter] for d in batch])
            expert = torch.cat([d.expert for d in batch]) if target.is_expert else None
            dev = self.store.bank.device
            y = batched_delta(self.store.bank, layer, target, x, slot.to(dev),
                              None if expert is None else expert.to(dev))
            compute_s = time.perf_counter() - start
        except ProtocolError as e:  # e.g. an adapter unloaded while its delta waited
            for d in batch:
                self.sock.send(d.peer, error(str(e), e.status, id=d.id))
            return []
        finally:
            for a in slots:
                self.store.release(a)
        self.metrics.observe_batch(target, batch, compute_s)
        at = 0
        for d in batch:
            n = d.x.shape[0]
            rows = y[at:at + n].to(d.dtype)
            at += n
            extra = {}
            if d.at is not None and d.push:
                if self.nixl is None or d.peer not in self.nixl.peers:
                    extra["nixl"] = "unregistered"  # e.g. this server restarted: the instance registers again
                elif self.nixl.write(d.peer, d.id, rows, d.at):
                    continue
            frames = encode({"kind": "result", "id": d.id, **extra}, [rows])
            key = (d.peer, d.id)
            if d.push or key in self.pullers:
                self.pullers.discard(key)
                self.sock.send(d.peer, frames)
            else:
                self.results[key] = (frames, time.monotonic())
        return []

    def _expire_results(self) -> None:
        if self.results:
            old = time.monotonic() - PULL_TTL_S
            for key in [k for k, (_, t) in self.results.items() if t < old]:
                del self.results[key]

    def _nixl_register(self, peer: bytes, h: dict) -> list:
        """An instance registers (or withdraws) its NIXL arena. The answer fences:
        the peer's queued deltas are dropped and its writes in flight finished first."""
        if self.nixl is None and not h.get("close"):
            try:
                self.nixl = nixl_transport.NixlWriter(f"loraserve-lora-server-{self.incarnation}")
            except nixl_transport.NixlUnavailable as e:
                raise ProtocolError(f"this LoRA server cannot write over NIXL: {e}", 501) from None
        self.pending = [d for d in self.pending if d.peer != peer]
        fields = self.nixl.register(peer, h) if self.nixl is not None else {}
        return encode({"kind": "nixl", "id": h.get("id"), **fields})

    # -- the rest --------------------------------------------------------------

    def load(self, name: str, path: str) -> None:
        self.store.add(name, path)

    def stats(self) -> dict:
        out = self.store.stats()
        out.update(self.metrics.snapshot())
        out["bytes_in"], out["bytes_out"] = self.sock.bytes_in, self.sock.bytes_out
        out["pending_deltas"] = len(self.pending)
        out["nixl_writes"] = self.nixl.writes if self.nixl is not None else 0
        out["nixl_bytes_out"] = self.nixl.bytes_out if self.nixl is not None else 0
        return out

    def close(self) -> None:
        if self.nixl is not None:
            self.nixl.close()
        self.sock.close()
        self.store.close()


def _check_index(t: torch.Tensor, rows: int, bound: int, what: str) -> None:
    if t.dtype != torch.int32 or list(t.shape) != [rows]:
        raise ProtocolError(f"{what} ids must be int32[{rows}]")
    if rows and (int(t.min()) < 0 or int(t.max()) >= bound):
        raise ProtocolError(f"{what} ids must be in [0, {bound})")


def _fit(deltas: list[Delta], max_adapters: int) -> tuple[list[Delta], list[Delta]]:
    """The longest prefix of `deltas` using at most `max_adapters` distinct adapters (at least one delta)."""
    seen: set[str] = set()
    for i, d in enumerate(deltas):
        if i and len(seen | set(d.adapters)) > max_adapters:
            return deltas[:i], deltas[i:]
        seen |= set(d.adapters)
    return deltas, []
