"""The LoRA server: every adapter in one place, deltas computed for many instances.

One thread runs the loop: take every message that has arrived, answer the
control ones at once (hello, catalogue, load, unload, hint, ping, stats),
and queue deltas. A delta waits a short window (`batch_window_us`) for deltas
of the same (layer, projection) from other instances; then each such group
whose adapters have that layer's weights in a slot runs as one batched kernel
(`lora_server/compute.py`), and each instance gets its rows back: pushed at once,
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
from concurrent.futures import Future
from pathlib import Path

import torch

from loraserve.clock import Clock, MonotonicClock
from loraserve.lora.adapter import LoraAdapter
from loraserve.kernels import combine_rows
from loraserve.lora_server.compute import store_delta
from loraserve.lora_server.delta import Delta, parse_delta
from loraserve.lora_server.parallel import RankFailed, RankLauncher, Ranks
from loraserve.lora_server.shard import Layout
from loraserve.lora_server.metrics import ServerMetrics
from loraserve.lora_server.store import AdapterStore
from loraserve.lora_server.window import BatchWindow, form_batches, run_ready
from loraserve.model.spec import ModelSpec
from loraserve.model.targets import Target, in_dim, layer_targets
from loraserve.remote.config import LoraServerConfig
from loraserve.remote.protocol import (MAX_HEADER, MAX_ROWS, Message, ProtocolError, decode, encode, error, field,
                                       refusal)
from loraserve.remote import nixl_transport
from loraserve.remote.transport import ServerSocket
from loraserve.threads import alone_pool

log = logging.getLogger(__name__)

PULL_TTL_S = 60.0
"""How long a pull-mode result waits to be pulled before it is dropped."""

WEIGHT_POLL_S = 0.0005
"""How long the loop sleeps on the socket while deltas wait for adapter weights."""

PENDING_TTL_S = 30.0
"""Longest a delta waits for its weights before it is refused (503)."""

MAX_MESSAGES_PER_TURN = 4096
"""Messages handled before the loop computes again."""


class LoraServer:
    def __init__(self, config: LoraServerConfig, listen: str, lora_dirs: list[str] = (),
                 clock: Clock | None = None, launcher: RankLauncher | None = None) -> None:
        """`lora_dirs`: the only directories runtime loads may read from (none: runtime loading is off).
        `clock`: what the policies (batching window, adapter cache, expiries) read time from.
        `launcher`: how ranks 1.. start (default: as this process's children)."""
        self.config = config
        self.lora_dirs = [Path(d).resolve() for d in lora_dirs]
        self.spec = ModelSpec.from_dir(config.model)
        self.clock = clock or MonotonicClock()
        layout = Layout.of(config.ep, config.pp, self.spec)
        self.store = AdapterStore(self.spec, config, self.clock, layout.shard(0) if layout.world > 1 else None)
        widest = max(in_dim(self.spec, t) for layer in range(self.spec.num_layers)
                     for t in layer_targets(self.spec, layer))
        # the largest legitimate message: a delta of MAX_ROWS fp32 rows of the widest input, its ids, a header
        self.sock = ServerSocket(listen, MAX_ROWS * (widest + 2) * 4 + MAX_HEADER)
        self.ranks: Ranks | None = None
        if layout.world > 1:
            try:
                self.ranks = Ranks(config, layout, self.store, launcher=launcher)
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
        self.pullers: dict[tuple[bytes, int], float] = {}
        """Pulls that came before their result (and when)."""
        self.window = BatchWindow(self.clock, config.batch_window_us / 1e6)
        """Which instances are behind in their forward pass, hence worth waiting for (`lora_server/window.py`)."""
        self.nixl: nixl_transport.NixlWriter | None = None
        """One-sided writes of pushed results, once an instance registered an arena (`remote/nixl_transport.py`)."""
        self.stop = threading.Event()
        self.loader = alone_pool(1, "loraserve-adapter-reader")
        self.loads: list[tuple[bytes, object, str, str, Future]] = []
        """Runtime loads being read: (peer, message id, name, path, the read)."""

    # -- the loop --------------------------------------------------------------

    def serve_forever(self) -> None:
        try:
            while not self.stop.is_set():
                self.run_once()
        finally:
            self.close()

    def run_once(self, idle_wait: float = 0.05) -> None:
        if self.ranks is not None:
            self.ranks.check()
        # deltas waiting for weights (or NIXL writes in flight) poll briefly: other threads need the CPU
        busy = self.pending or self.loads or self.store.prefetch or (self.nixl is not None and self.nixl.busy)
        wait = WEIGHT_POLL_S if busy else idle_wait
        if self.sock.poll(wait):
            self._drain()
        # give instances that are behind in their forward pass a moment to catch up
        while (end := self.window.deadline([(d.peer, d.position, d.arrived) for d in self.pending])) is not None:
            if not self.sock.poll(end - self.clock.now()):
                break
            self._drain()
        if self.pending:
            self._compute()
        if self.loads:
            self._finish_loads()
        if not self.pending:
            self.store.advance()
        self._expire()
        if self.nixl is not None and self.nixl.busy:
            for peer, msg_id in self.nixl.progress():
                self.sock.send(peer, error("the NIXL write of this result failed", 503, id=msg_id))
        self.metrics.refresh()

    def _drain(self) -> bool:
        """Handle the messages waiting (at most a turn's worth, so a flood
        cannot starve the kernels); returns whether there were any."""
        for n in range(MAX_MESSAGES_PER_TURN):
            if (item := self.sock.recv()) is None:
                return n > 0
            self._handle(*item)
        return True

    def _handle(self, peer: bytes, frames: list) -> None:
        msg_id = None
        try:
            msg = decode(frames)
            msg_id = msg.header.get("id")
            reply = self._dispatch(peer, msg)
        except Exception as e:
            reply = self._refusal(e, msg_id)
        if reply is not None:
            self.sock.send(peer, reply)

    def _refusal(self, e: Exception, msg_id) -> list:
        """The error reply for what a message raised (a bug is logged and answered too)."""
        status, text, extra = refusal(e)
        if status == 500:
            log.error("handling a message failed", exc_info=e)
        self.metrics.refused.labels(str(status)).inc()
        return error(text, status, id=msg_id, **extra)

    def _finish_loads(self) -> None:
        """Name the adapters the loader thread has read (the store is the loop thread's)."""
        for item in [x for x in self.loads if x[4].done()]:
            self.loads.remove(item)
            peer, msg_id, name, path, future = item
            try:
                adapter = self._register(name, path, future.result())
                reply = encode({"kind": "loaded", "id": msg_id, "name": name, "adapter": adapter.id,
                                "rank": adapter.rank, "version": self.store.version})
            except Exception as e:
                reply = self._refusal(e, msg_id)
            self.sock.send(peer, reply)

    def _dispatch(self, peer: bytes, msg: Message) -> list | None:
        h, kind = msg.header, msg.kind
        if kind == "delta":
            delta = parse_delta(peer, msg, self.spec, self.store, self.config.max_loras, self.clock.now())
            plan = None
            if "plan" in msg.header:
                plan = field(msg.header, "plan", list)
                if len(plan) > self.spec.num_layers * len(Target) or not all(isinstance(p, int) for p in plan):
                    raise ProtocolError("'plan' must list at most one position per layer and target")
            self.pending.append(delta)
            self.window.arrived(peer, delta.position, delta.arrived, plan)
            return None
        if kind == "pull":
            key = (peer, field(h, "id", int))
            if key in self.results:
                return self.results.pop(key)[0]
            self.pullers[key] = self.clock.now()
            return None
        if kind == "nixl":
            return self._nixl_register(peer, h)
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
            try:
                path = Path(field(h, "path", str)).resolve()
            except (ValueError, OSError) as e:  # e.g. an embedded NUL byte
                raise ProtocolError(f"lora_path: {e}") from None
            if not any(path.is_relative_to(d) for d in self.lora_dirs):
                raise ProtocolError(f"lora_path {h['path']!r} is outside the LoRA server's --lora-dir "
                                    f"directories" if self.lora_dirs else
                                    "runtime adapter loading is off on the LoRA server; start it with --lora-dir",
                                    403)
            # reading a large adapter takes seconds: a worker thread reads, the loop goes on serving deltas
            name = field(h, "name", str)
            self.loads.append((peer, h.get("id"), name, str(path),
                               self.loader.submit(self.store.registry.load, name, path, self.lora_dirs)))
            return None
        if kind == "unload":
            self.store.remove(field(h, "name", str))
            if self.ranks is not None:
                self.ranks.call({"kind": "unload", "name": h["name"]})
            return encode({"kind": "unloaded", "id": h.get("id"), "version": self.store.version})
        if kind == "stats":
            return encode({"kind": "stats", "id": h.get("id"), "stats": self.stats()})
        raise ProtocolError(f"unknown message kind {kind!r}")

    # -- computing -------------------------------------------------------------

    def _compute(self) -> None:
        """Run every group of pending deltas whose weights are in place."""
        live = []
        for d in self.pending:
            gone = next((a for a in d.adapters if not self.store.registry.has(a)), None)
            if gone is not None:  # unloaded while it waited: this delta fails, not its whole batch
                self.sock.send(d.peer, error(f"adapter {gone} was unloaded from the LoRA server", 404, id=d.id))
                continue
            live.append(d)
        waiting = []
        for (layer, target), batch in form_batches(live, lambda d: (d.layer, d.target), lambda d: d.adapters,
                                                   self.config.max_loras):
            if self.ranks is None:
                waiting.extend(run_ready(batch, lambda ds: self._run(layer, target, ds),
                                         lambda d: self.store.ready(d.adapters, layer)))
            else:  # the layer's weights may sit on other ranks (pipeline stages): a batch runs whole or waits
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
        except RankFailed:  # a rank is gone: this server cannot compute any more, let its supervisor restart it
            raise
        except Exception as e:  # a bug or a device fault: these deltas fail, the server goes on
            log.exception("a batched delta of layer %d %s failed", layer, target)
            for d in batch:
                self.sock.send(d.peer, error(f"{type(e).__name__}: {e}", 500, id=d.id))
            return []
        if y is None:
            return batch
        compute_s = time.perf_counter() - start
        self.metrics.observe_batch(target, batch, compute_s)
        at = 0
        for d in batch:
            n = d.x.shape[0]
            rows = y[at:at + n]
            at += n
            if d.combine is not None:
                try:
                    rows = combine_rows(rows, d.scatter, d.weight, d.combine)
                except Exception as e:  # a bug or a device fault: this delta fails, the server goes on
                    log.exception("combining a delta of layer %d %s failed", layer, target)
                    self.sock.send(d.peer, error(f"{type(e).__name__}: {e}", 500, id=d.id))
                    continue
            rows = rows.to(d.dtype)
            extra = {}
            if d.at is not None and d.push:
                if self.nixl is None or d.peer not in self.nixl.peers:
                    extra["nixl"] = "unregistered"  # e.g. this server restarted: the instance registers again
                elif self.nixl.write(d.peer, d.id, rows, d.at):
                    continue
            frames = encode({"kind": "result", "id": d.id, **extra}, [rows])
            key = (d.peer, d.id)
            if d.push or key in self.pullers:
                self.pullers.pop(key, None)
                self.sock.send(d.peer, frames)
            else:
                self.results[key] = (frames, self.clock.now())
        return []

    def _expire(self) -> None:
        """Drop what nobody will come for: pull results and pulls past their
        time, and deltas that waited for weights longer than any instance
        waits (answered 503, so a live instance hears why)."""
        now = self.clock.now()
        if self.results:
            for key in [k for k, (_, t) in self.results.items() if now - t > PULL_TTL_S]:
                del self.results[key]
        if self.pullers:
            for key in [k for k, t in self.pullers.items() if now - t > PULL_TTL_S]:
                del self.pullers[key]
        stale = [d for d in self.pending if now - d.arrived > PENDING_TTL_S]
        for d in stale:
            self.pending.remove(d)
            self.sock.send(d.peer, error(f"the weights for layer {d.layer} did not reach a slot within "
                                         f"{PENDING_TTL_S:g} s", 503, id=d.id))
        self.window.expire()

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
        """Serve an adapter from the start (any path: the operator's choice)."""
        self._register(name, path, self.store.registry.load(name, path))

    def _register(self, name: str, path: str, adapter: LoraAdapter) -> LoraAdapter:
        """Name a read adapter here and on every other rank (undone here if a rank refuses it)."""
        adapter = self.store.add_loaded(name, adapter)
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
        out["nixl_writes"] = self.nixl.writes if self.nixl is not None else 0
        out["nixl_bytes_out"] = self.nixl.bytes_out if self.nixl is not None else 0
        return out

    def close(self) -> None:
        self.loader.shutdown(wait=False, cancel_futures=True)
        if self.nixl is not None:
            self.nixl.close()
        self.sock.close()
        if self.ranks is not None:
            self.ranks.close()
        self.store.close()
