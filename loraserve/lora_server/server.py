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

With `--ep`/`--pp` this process is rank 0 of a parallel server: the loop is
the same, its store holds rank 0's shard, and `parallel.Ranks` carries
control messages to the other ranks and routes each batch's rows to the
ranks that own them.
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
from loraserve.lora.adapter import LoraAdapter
from loraserve.model.spec import ModelSpec
from loraserve.model.targets import Target, in_dim, layer_targets
from loraserve.lora_server.compute import store_delta
from loraserve.lora_server.parallel import Ranks
from loraserve.lora_server.shard import Layout
from loraserve.remote.config import LoraServerConfig
from loraserve.lora_server.metrics import ServerMetrics
from loraserve.remote.protocol import DTYPES, MAX_ROWS, Message, ProtocolError, decode, encode, error, field
from loraserve.lora_server.store import AdapterStore
from loraserve.remote.transport import ServerSocket

log = logging.getLogger(__name__)

PULL_TTL_S = 60.0
"""How long a pull-mode result waits to be pulled before it is dropped."""


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


class LoraServer:
    def __init__(self, config: LoraServerConfig, listen: str) -> None:
        self.config = config
        self.spec = ModelSpec.from_dir(config.model)
        self.clock = MonotonicClock()
        layout = Layout.of(config.ep, config.pp, self.spec)
        self.store = AdapterStore(self.spec, config, self.clock, layout.shard(0) if layout.world > 1 else None)
        self.sock = ServerSocket(listen)
        self.ranks: Ranks | None = None
        if layout.world > 1:
            try:
                self.ranks = Ranks(config, layout, self.store)
            except BaseException:
                self.sock.close()
                self.store.close()
                raise
        self.endpoint = self.sock.endpoint
        self.incarnation = uuid.uuid4().hex[:12]
        """Changes with every start: an instance that sees a new one re-reads the catalogue."""
        self.metrics = ServerMetrics(self)
        self.pending: list[Delta] = []
        self.results: dict[tuple[bytes, int], tuple[list, float]] = {}
        """Pull mode: (peer, id) → (result frames, when computed)."""
        self.pullers: set[tuple[bytes, int]] = set()
        """Pulls that came before their result."""
        self.stop = threading.Event()

    # -- the loop --------------------------------------------------------------

    def serve_forever(self) -> None:
        try:
            while not self.stop.is_set():
                self.run_once()
        finally:
            self.close()

    def run_once(self, idle_wait: float = 0.05) -> None:
        busy = bool(self.pending) or bool(self.store.prefetch)
        if self.sock.poll(0 if busy else idle_wait):
            self._drain()
        if self.pending and self.config.batch_window_us:
            # give other instances' deltas of the same layer a moment to arrive
            window_end = min(d.arrived for d in self.pending) + self.config.batch_window_us / 1e6
            while (left := window_end - time.monotonic()) > 0 and self.sock.poll(left):
                self._drain()
        if self.pending:
            self._compute()
        if not self.pending or not self._drain():
            self.store.advance()
        self._expire_results()
        self.metrics.refresh()

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
            self.pending.append(self._parse_delta(peer, msg))
            return None
        if kind == "pull":
            key = (peer, field(h, "id", int))
            if key in self.results:
                return self.results.pop(key)[0]
            self.pullers.add(key)
            return None
        if kind == "hint":
            adapters = [a for a in field(h, "adapters", list) if isinstance(a, str)]
            self.store.hint(adapters)
            if self.ranks is not None:
                self.ranks.hint(adapters)
            return None
        if kind in ("ping", "hello"):
            return encode({"kind": kind, "id": h.get("id"), "incarnation": self.incarnation,
                           "version": self.store.version})
        if kind == "catalogue":
            return encode({"kind": "catalogue", "id": h.get("id"), "incarnation": self.incarnation,
                           "version": self.store.version, "adapters": self.store.catalogue()})
        if kind == "load":
            adapter = self._load(field(h, "name", str), field(h, "path", str))
            return encode({"kind": "loaded", "id": h.get("id"), "name": h["name"], "adapter": adapter.id,
                           "rank": adapter.rank, "version": self.store.version})
        if kind == "unload":
            self.store.remove(field(h, "name", str))
            if self.ranks is not None:
                self.ranks.call({"kind": "unload", "name": h["name"]})
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
        return Delta(peer, msg_id, layer, target, x.dtype, bool(h.get("push", True)), x, adapters,
                     row_adapter.long(), expert, time.monotonic())

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
        index = {a: i for i, a in enumerate(adapters)}
        start = time.perf_counter()
        x = torch.cat([d.x for d in batch])
        row_adapter = torch.cat([torch.tensor([index[a] for a in d.adapters])[d.row_adapter] for d in batch])
        expert = torch.cat([d.expert for d in batch]) if target.is_expert else None
        try:
            if self.ranks is None:
                y = store_delta(self.store, layer, target, x, adapters, row_adapter, expert)
            else:
                y = self.ranks.delta(layer, target, x, adapters, row_adapter, expert)
        except ProtocolError as e:  # e.g. an adapter unloaded while its delta waited
            for d in batch:
                self.sock.send(d.peer, error(str(e), e.status, id=d.id))
            return []
        if y is None:
            return batch
        compute_s = time.perf_counter() - start
        self.metrics.observe_batch(target, batch, compute_s)
        at = 0
        for d in batch:
            n = d.x.shape[0]
            frames = encode({"kind": "result", "id": d.id}, [y[at:at + n].to(d.dtype)])
            at += n
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

    # -- the rest --------------------------------------------------------------

    def load(self, name: str, path: str) -> None:
        self._load(name, path)

    def _load(self, name: str, path: str) -> LoraAdapter:
        adapter = self.store.add(name, path)
        if self.ranks is not None:
            try:
                self.ranks.load(name, path)
            except BaseException:
                self.store.remove(name)
                raise
        return adapter

    def stats(self) -> dict:
        out = self.store.stats()
        out.update(self.metrics.snapshot())
        out["bytes_in"], out["bytes_out"] = self.sock.bytes_in, self.sock.bytes_out
        out["pending_deltas"] = len(self.pending)
        if self.ranks is not None:
            out["ranks"] = self.ranks.stats()
            out["rank_not_ready"] = self.ranks.not_ready
        return out

    def close(self) -> None:
        self.sock.close()
        if self.ranks is not None:
            self.ranks.close()
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
