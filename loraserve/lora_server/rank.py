"""A rank > 0 of a parallel LoRA server: `python -m loraserve.lora_server.rank`.

Rank 0 starts it (`parallel.py`), as a process of its own or, on Ray, as an
actor (`cluster/lora_server.py` calls `run`), and is the only peer it talks to. It holds
its shard of every adapter in its own `AdapterStore` (so its own tiered cache,
slots and bank) and answers, in order: deltas for its rows (or "not ready",
and rank 0 asks again later: nothing here ever waits for a load), control
calls (load, unload, stats) and hints. Between messages a helper thread
fills hinted adapters' slots a layer at a time, as rank 0's loop does in its
idle time: the message loop itself only ever blocks in a receive (a gloo
receive cannot be polled), and the two take turns on the store under a lock.

It exits on STOP, when rank 0's connection closes or times out (rank 0 pings
idle ranks), or when its parent process is gone.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import signal
import sys
import threading
import time

import torch

from loraserve.cache.config import CacheConfig
from loraserve.clock import MonotonicClock
from loraserve.lora_server import wire
from loraserve.lora_server.compute import store_delta
from loraserve.lora_server.shard import Layout
from loraserve.lora_server.store import AdapterStore
from loraserve.model.spec import ModelSpec
from loraserve.model.targets import in_dim
from loraserve.remote.config import LoraServerConfig
from loraserve.remote.protocol import ProtocolError, refusal
from loraserve.threads import compute_alone

log = logging.getLogger(__name__)


def rank_stats(store: AdapterStore, rank: int) -> dict:
    """What a rank holds: its shard, and the bytes of it in the cache and the bank."""
    shard, st = store.shard, store.stats()
    ids = {info.id for info in store.listing()}
    return {"rank": rank, "layers": [shard.layers.start, shard.layers.stop], "ep_rank": shard.ep_rank,
            "experts": shard.num_experts(store.spec), "bank_keys": len(store.bank.keys),
            "adapter_bytes": sum(store.registry.get(i).num_bytes for i in ids),
            **{k: st[k] for k in ("bank_bytes", "slot_adapters", "layers_loaded", "slot_hits", "slot_misses")}}


def config_json(config: LoraServerConfig) -> str:
    return json.dumps(dataclasses.asdict(config))


def config_from_json(text: str) -> LoraServerConfig:
    fields = json.loads(text)
    return LoraServerConfig(**{**fields, "cache": CacheConfig(**fields["cache"])})


class Rank:
    def __init__(self, rank: int, store: AdapterStore, channel: wire.Channel) -> None:
        self.rank = rank
        self.store = store
        self.channel = channel
        self.lock = threading.Lock()
        """The store's: the message loop's and the filler's turns."""
        self.stopped = threading.Event()

    def serve(self) -> None:
        filler = threading.Thread(target=self._fill, name=f"loraserve-rank{self.rank}-fill", daemon=True)
        filler.start()
        try:
            while True:
                op, *fields = self.channel.recv_header(0)
                if op == wire.STOP:
                    return
                if op == wire.DELTA:
                    self._delta(*fields[:5])
                elif op in (wire.CALL, wire.TELL):
                    request = wire.decode_json(self.channel.recv_bytes(0, fields[0]))
                    self._control(request, answer=op == wire.CALL)
                elif op != wire.PING:
                    raise RuntimeError(f"rank {self.rank}: unknown op {op} from rank 0")
        finally:
            self.stopped.set()
            filler.join(timeout=5)

    def _fill(self) -> None:
        """Idle work: one layer of a hinted adapter per turn; a short nap while
        none can go in yet (its copy to the device travels), a longer one with
        nothing hinted."""
        compute_alone()  # the message loop's thread keeps the OpenMP team (loraserve/threads.py)
        while not self.stopped.is_set():
            with self.lock:
                progressed = self.store.advance()
            if not progressed:
                self.stopped.wait(0.002 if self.store.prefetch else 0.05)

    def _delta(self, layer: int, target_index: int, rows: int, id_bytes: int, has_expert: int) -> None:
        target, store = wire.TARGETS[target_index], self.store
        specs = [(torch.int64, [rows])] * (1 + has_expert)
        specs += [(store.bank.dtype, [rows, in_dim(store.spec, target)]), (torch.uint8, [id_bytes])]
        parts = wire.unpack(self.channel.recv_bytes(0, wire.packed_size(specs)), specs)
        row_adapter, expert = parts[0], parts[1] if has_expert else None
        adapters = wire.decode_text(parts[-1]).split("\n")
        try:
            with self.lock:
                y = store_delta(store, layer, target, parts[-2], adapters, row_adapter, expert)
        except ProtocolError as e:
            return self._fail(e.status, str(e))
        except Exception as e:  # a bug: rank 0 answers the instances, this rank goes on
            log.exception("rank %d: a delta of layer %d %s failed", self.rank, layer, target)
            return self._fail(500, f"rank {self.rank}: {type(e).__name__}: {e}")
        if y is None:
            self.channel.send(0, [wire.NOT_READY])
        else:
            self.channel.send(0, [wire.OK], y)

    def _control(self, request: dict, answer: bool) -> None:
        try:
            with self.lock:
                reply = self._apply(request)
        except Exception as e:
            status, text, _ = refusal(e)
            if status == 500:
                log.exception("rank %d: %s failed", self.rank, request.get("kind"))
            failure = (status, f"rank {self.rank}: {text}" if status == 500 else text)
        else:
            if answer:
                payload = wire.encode_json(reply)
                self.channel.send(0, [wire.OK, payload.numel()], payload)
            return
        if answer:
            self._fail(*failure)

    def _apply(self, request: dict) -> dict:
        kind, store = request.get("kind"), self.store
        if kind == "hint":
            store.hint(request["adapters"])
            return {}
        if kind == "load":
            return {"adapter": store.add(request["name"], request["path"]).id}
        if kind == "unload":
            store.remove(request["name"])
            return {}
        if kind == "stats":
            return rank_stats(store, self.rank)
        raise ProtocolError(f"unknown control {kind!r}")

    def _fail(self, status: int, message: str) -> None:
        payload = wire.encode_text(message)
        self.channel.send(0, [wire.FAILED, status, payload.numel()], payload)


def _watch_parent(parent: int) -> None:
    """Exit when rank 0's process is gone (a blocked receive may not notice)."""
    while True:
        time.sleep(1.0)
        if os.getppid() != parent:
            os._exit(1)


def run(rank: int, world: int, host: str, port: int, timeout_s: float, config: LoraServerConfig,
        own_host: str = "127.0.0.1") -> int:
    """Serve as `rank` until rank 0 says stop (0) or is gone (1). `host`:`port`: rank 0's store;
    `own_host`: this rank's address as the others reach it."""
    device = wire.rank_device(config.device, rank)
    config = dataclasses.replace(config, device=str(device))
    spec = ModelSpec.from_dir(config.model)
    store = AdapterStore(spec, config, MonotonicClock(), Layout.of(config.ep, config.pp, spec).shard(rank))
    try:
        tcp = wire.join(host, port, timeout_s)
        tcp.set(f"up/{rank}", "1")
        channel = wire.Channel(tcp, rank, world, device, timeout_s, own_host)
        Rank(rank, store, channel).serve()
    except RuntimeError as e:  # rank 0 closed the connection, or went silent
        log.error("stopping: %s", str(e).splitlines()[0][:300])
        return 1
    finally:
        store.close()
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="a rank > 0 of a parallel LoRA server (started by rank 0)")
    p.add_argument("--rank", type=int, required=True)
    p.add_argument("--world", type=int, required=True)
    p.add_argument("--port", type=int, required=True, help="rank 0's TCPStore on 127.0.0.1")
    p.add_argument("--timeout", type=float, required=True)
    p.add_argument("--config", required=True, help="the server's LoraServerConfig as JSON")
    p.add_argument("--parent", type=int, required=True, help="rank 0's process id")
    args = p.parse_args(argv)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # a ^C is rank 0's to handle; it stops us
    logging.basicConfig(level=logging.WARNING, format=f"rank {args.rank}: %(levelname)s %(name)s: %(message)s")
    threading.Thread(target=_watch_parent, args=(args.parent,), daemon=True).start()
    return run(args.rank, args.world, "127.0.0.1", args.port, args.timeout, config_from_json(args.config))

if __name__ == "__main__":
    sys.exit(main())
