"""Rank 0's view of a parallel LoRA server (`--ep X --pp Y`, X*Y ranks).

Rank 0 is the front: it owns the instances' socket, the catalogue and the
batching (`server.py`, as with one rank), and is also stage 0's leader (EP
rank 0 of stage 0). It starts ranks 1..X*Y-1 through a launcher: its own
processes (`LocalRanks`: `python -m loraserve.lora_server.rank`), or Ray actors
placed on any node (`cluster/lora_server.py`). It meets them on a TCPStore on a
free port of the launcher's address, and from then on is the only one that
speaks to them (`wire.py`). It stops them on close; they stop by themselves if it dies.

Control (load, unload, hint) is applied on every rank: each rank's store
keeps its shard's bytes. A load is checked on rank 0 first, then on the
others, and undone everywhere if any refuses it.

A batch of one (layer, target) is routed synchronously: dense targets to the
layer's stage leader, expert rows to their experts' EP ranks with the expert
ids made local (`Layout.owners`). Rank 0 sends the remote parts first,
computes its own, then gathers the answers back in row order. A rank whose
weights for the layer are not in a slot yet answers "not ready"; the whole
batch then stays pending and is asked again on the server loop's next turn.
Nothing waits for a load, so no rank can deadlock another; the cost is that
a batch computed in part is computed again (only while adapters load).
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Protocol

import torch

from loraserve.lora_server import wire
from loraserve.lora_server.compute import store_delta
from loraserve.lora_server.rank import config_json, rank_stats
from loraserve.lora_server.shard import Layout
from loraserve.lora_server.store import AdapterStore
from loraserve.model.targets import Target, out_dim
from loraserve.remote.config import LoraServerConfig
from loraserve.remote.protocol import ProtocolError

log = logging.getLogger(__name__)

TIMEOUT_S = 60.0
"""Bound on every wait between ranks (start-up included). An idle rank is
pinged at a quarter of it, so only a silent peer times out."""


class RankFailed(RuntimeError):
    """A rank died or stopped answering: the server cannot go on."""


@dataclass
class _Part:
    """The rows of a batch one rank computes."""

    rank: int
    rows: torch.Tensor | None
    """Their indices in the batch (None: all of them)."""

    x: torch.Tensor
    adapters: list[str]
    row_adapter: torch.Tensor
    expert: torch.Tensor | None
    """Local expert ids (expert targets)."""


class RankLauncher(Protocol):
    """Starts and stops ranks 1.. (their processes); the ranks do the rest over the store."""

    host: str
    """Rank 0's address as every rank reaches it (its store and its end of the group listen there)."""

    def start(self, rank: int, world: int, port: int, timeout_s: float, config: LoraServerConfig) -> None: ...

    def exited(self, rank: int) -> int | None:
        """The rank's exit status once it has stopped (None while it runs)."""

    def stop(self, grace_s: float) -> None:
        """Wait up to `grace_s` for the ranks to exit, then kill those left."""


class LocalRanks:
    """Ranks as child processes on this machine (`loraserve lora-server --ep --pp`)."""

    host = "127.0.0.1"

    def __init__(self) -> None:
        self.procs: dict[int, subprocess.Popen] = {}

    def start(self, rank: int, world: int, port: int, timeout_s: float, config: LoraServerConfig) -> None:
        env = dict(os.environ)
        # the ranks run this very code, wherever it was imported from
        root = str(Path(__file__).resolve().parents[2])
        env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH")) if p)
        cmd = [sys.executable, "-m", "loraserve.lora_server.rank", "--rank", str(rank), "--world", str(world),
               "--port", str(port), "--timeout", str(timeout_s), "--config", config_json(config),
               "--parent", str(os.getpid())]
        self.procs[rank] = subprocess.Popen(cmd, env=env, stdin=subprocess.DEVNULL)

    def exited(self, rank: int) -> int | None:
        return self.procs[rank].poll()

    def stop(self, grace_s: float) -> None:
        deadline = time.monotonic() + grace_s
        for proc in self.procs.values():
            try:
                proc.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=5)


class Ranks:
    def __init__(self, config: LoraServerConfig, layout: Layout, store: AdapterStore,
                 timeout_s: float = TIMEOUT_S, launcher: RankLauncher | None = None) -> None:
        self.layout = layout
        self.store = store
        """Rank 0's own store (its shard)."""
        self.timeout_s = timeout_s
        self.lock = threading.Lock()
        """One exchange at a time: the server loop's and the pinger's."""
        self.closed = threading.Event()
        self.launcher = launcher or LocalRanks()
        self.last_sent = [time.monotonic()] * layout.world
        self.not_ready = 0
        """Answers "not ready" from other ranks (their batch was asked again later)."""
        self.failed: RankFailed | None = None
        """What the pinger found: a rank gone while the server was idle."""
        tcp = wire.rendezvous(timeout_s, self.launcher.host)
        try:
            for rank in range(1, layout.world):
                self.launcher.start(rank, layout.world, tcp.port, timeout_s, config)
            self._wait_up(tcp)
            self.channel = wire.Channel(tcp, 0, layout.world, store.bank.device, timeout_s, self.launcher.host)
        except BaseException:
            self.launcher.stop(5.0)
            raise
        self._tcp = tcp
        self._pinger = threading.Thread(target=self._ping, name="loraserve-rank-pinger", daemon=True)
        self._pinger.start()

    # -- start and stop --------------------------------------------------------

    def _wait_up(self, tcp) -> None:
        keys = [f"up/{rank}" for rank in range(1, self.layout.world)]
        deadline = time.monotonic() + self.timeout_s
        while not tcp.check(keys):
            for rank in range(1, self.layout.world):
                status = self.launcher.exited(rank)
                if status is not None:
                    raise RankFailed(f"LoRA server rank {rank} exited with status {status} at start")
            if time.monotonic() > deadline:
                raise RankFailed(f"LoRA server ranks did not start within {self.timeout_s:g} s")
            time.sleep(0.05)

    def close(self) -> None:
        if self.closed.is_set():
            return
        self.closed.set()
        self._pinger.join(timeout=5)
        with self.lock:
            for rank in range(1, self.layout.world):
                try:
                    if self.launcher.exited(rank) is None:
                        self.channel.send(rank, [wire.STOP])
                except RuntimeError:
                    pass  # gone meanwhile
        self.launcher.stop(5.0)

    def _ping(self) -> None:
        period = self.timeout_s / 4
        while not self.closed.wait(period / 4):
            with self.lock:
                for rank in range(1, self.layout.world):
                    if time.monotonic() - self.last_sent[rank] > period and not self.closed.is_set():
                        try:
                            self._send(rank, [wire.PING])
                        except RankFailed as e:
                            log.error("LoRA server rank %d is gone", rank)
                            self.failed = e  # the server loop stops on it (`check`)
                            return

    def check(self) -> None:
        """Raise what the pinger found: an idle server must not outlive a rank it can no longer reach."""
        if self.failed is not None:
            raise self.failed

    # -- messages --------------------------------------------------------------

    @contextmanager
    def _talking_to(self, rank: int) -> Iterator[None]:
        """A broken pair (the rank died, or a wait timed out) is RankFailed."""
        try:
            yield
        except RankFailed:
            raise
        except RuntimeError as e:
            raise RankFailed(f"LoRA server rank {rank}: {str(e).splitlines()[0][:300]}") from None

    def _send(self, rank: int, header: list[int], payload: torch.Tensor | None = None) -> None:
        with self._talking_to(rank):
            self.channel.send(rank, header, payload)
        self.last_sent[rank] = time.monotonic()

    def _answer(self, rank: int) -> list[int] | None:
        """The header fields of the rank's answer if it is OK (its payload, if
        any, is next), None if it is not ready; ProtocolError if it refused."""
        with self._talking_to(rank):
            status, *fields = self.channel.recv_header(rank)
            if status == wire.OK:
                return fields
            if status == wire.NOT_READY:
                self.not_ready += 1
                return None
            message = wire.decode_text(self.channel.recv_bytes(rank, fields[1]))
        raise ProtocolError(message, fields[0])

    # -- control ---------------------------------------------------------------

    def call(self, request: dict) -> list[dict]:
        """Apply a load, unload or stats request on every other rank; their
        answers, in rank order. ProtocolError (after every rank answered) if
        any refused."""
        payload = wire.encode_json(request)
        answers, refused = [], None
        with self.lock:
            for rank in range(1, self.layout.world):
                self._send(rank, [wire.CALL, payload.numel()], payload)
            for rank in range(1, self.layout.world):
                try:
                    fields = self._answer(rank)
                except ProtocolError as e:
                    refused = refused or e
                    continue
                with self._talking_to(rank):
                    answers.append(wire.decode_json(self.channel.recv_bytes(rank, fields[0])))
        if refused is not None:
            raise refused
        return answers

    def load(self, name: str, path: str) -> None:
        """Load on the other ranks (rank 0 has); undone on all if one refuses."""
        try:
            self.call({"kind": "load", "name": name, "path": path})
        except ProtocolError:
            try:
                self.call({"kind": "unload", "name": name})
            except ProtocolError:
                pass  # the ranks that refused the load have nothing to unload
            raise

    def hint(self, adapter_ids: list[str]) -> None:
        payload = wire.encode_json({"kind": "hint", "adapters": adapter_ids})
        with self.lock:
            for rank in range(1, self.layout.world):
                self._send(rank, [wire.TELL, payload.numel()], payload)

    def stats(self) -> list[dict]:
        """What each rank holds, rank 0 first."""
        return [rank_stats(self.store, 0), *self.call({"kind": "stats"})]

    # -- deltas ----------------------------------------------------------------

    def delta(self, layer: int, target: Target, x: torch.Tensor, adapters: list[str], row_adapter: torch.Tensor,
              expert: torch.Tensor | None) -> torch.Tensor | None:
        """A batch's deltas in row order, computed by the ranks that own them
        (rank 0's part here, with its store); None if some rank is not ready."""
        parts = [self._part(rank, rows, x, adapters, row_adapter, expert)
                 for rank, rows in self.layout.owners(layer, target, expert)]
        results: dict[int, torch.Tensor | None] = {}
        failure: Exception | None = None
        with self.lock:
            for p in parts:
                if p.rank:
                    self._send_delta(layer, target, p)
            for p in parts:
                if not p.rank:
                    try:
                        results[0] = store_delta(self.store, layer, target, p.x, p.adapters, p.row_adapter,
                                                 p.expert)
                    except Exception as e:  # answer every rank first, then raise
                        failure = e
            for p in parts:
                if p.rank:
                    try:
                        ready = self._answer(p.rank) is not None
                        results[p.rank] = self._recv_delta(p.rank, len(p.x), target) if ready else None
                    except ProtocolError as e:
                        failure = failure or e
        if failure is not None:
            raise failure
        if any(y is None for y in results.values()):
            return None
        dev = self.store.bank.device
        if len(parts) == 1 and parts[0].rows is None:
            return results[parts[0].rank].to(dev)
        y = torch.empty(len(x), out_dim(self.store.spec, target), dtype=self.store.bank.dtype, device=dev)
        for p in parts:
            y[p.rows.to(dev)] = results[p.rank].to(dev)
        return y

    def _recv_delta(self, rank: int, rows: int, target: Target) -> torch.Tensor:
        with self._talking_to(rank):
            return self.channel.recv_tensor(rank, [rows, out_dim(self.store.spec, target)], self.store.bank.dtype)

    def _part(self, rank: int, rows: torch.Tensor | None, x: torch.Tensor, adapters: list[str],
              row_adapter: torch.Tensor, expert: torch.Tensor | None) -> _Part:
        pick = (lambda t: t) if rows is None else (lambda t: t[rows])
        used, index = torch.unique(pick(row_adapter), return_inverse=True)
        local_expert = None if expert is None else self.layout.local_expert(pick(expert))
        return _Part(rank, rows, pick(x), [adapters[i] for i in used.tolist()], index, local_expert)

    def _send_delta(self, layer: int, target: Target, p: _Part) -> None:
        ids = wire.encode_text("\n".join(p.adapters))
        tensors = [p.row_adapter.long()] + ([p.expert.long()] if p.expert is not None else [])
        tensors += [p.x.to(self.store.bank.dtype), ids]
        header = [wire.DELTA, layer, wire.TARGETS.index(target), len(p.x), ids.numel(), int(p.expert is not None)]
        self._send(p.rank, header, wire.pack(tensors))
