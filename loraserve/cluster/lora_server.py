"""The disaggregated layout on Ray: the LoRA server (InfiniLoRA) as Ray actors
that the engine replicas reach over its usual socket.

Rank 0 (`LoraServerActor`) runs the server's front: the instances' socket, the
catalogue, the batching. Ranks 1..EP·PP-1 are `LoraRankActor`s it starts
(`RayRanks`, the parallel server's launcher), each asking Ray for one CPU and
the rank's GPUs, so Ray may place them on any node; they meet rank 0 on its
node's address. They are rank 0's actors: they die with it, and a rank that
dies breaks the group, which stops rank 0 (`_serve` exits its process), so
Ray restarts the whole server (without limit).

Rank 0 picks its port on its own node when it first starts and records its
endpoint in the adapter set actor; a restart on the same node listens there
again, so the instances reconnect by themselves (a restarted server's new
incarnation makes them re-read its catalogue). A restart on another node
(its node lost) listens elsewhere, and the instances do not follow: they
keep answering 503 for adapter requests until the endpoint is restarted. It
loads the adapter set when it starts, so a restart also brings back what was
loaded at runtime.

On GPUs the ranks exchange tensors through host memory over gloo: each actor
sees only its own GPU, which `wire.Channel` does not take for one GPU per rank
(NCCL between Ray actors is not wired yet).
"""

from __future__ import annotations

import logging
import os
import threading
import time

import ray

from loraserve.lora_server.rank import config_from_json, config_json, run
from loraserve.lora_server.server import LoraServer
from loraserve.remote.config import LoraServerConfig

log = logging.getLogger(__name__)

RETRY_S = 5.0
"""Pause before a failed restart exits to be restarted again."""


def parse_ranks(text: str) -> tuple[int, int]:
    """"EPxPP" (or EP×PP) → (ep, pp)."""
    parts = text.lower().replace("×", "x").split("x")
    try:
        ep, pp = (int(p) for p in parts)
    except ValueError:
        raise ValueError(f"--lora-server-ranks takes EPxPP, e.g. 2x1, got {text!r}") from None
    if ep < 1 or pp < 1:
        raise ValueError(f"--lora-server-ranks: EP and PP must be at least 1, got {text!r}")
    return ep, pp


class LoraRankActor:
    """A rank > 0 of the server (`lora_server/rank.py`), in a Ray actor."""

    def run(self, rank: int, world: int, host: str, port: int, timeout_s: float, config: str) -> int:
        return run(rank, world, host, port, timeout_s, config_from_json(config), ray.util.get_node_ip_address())


class RayRanks:
    """The parallel server's launcher on Ray (`lora_server.parallel.RankLauncher`)."""

    def __init__(self, gpus: float) -> None:
        self.gpus = gpus
        self.host = ray.util.get_node_ip_address()
        self.actors: dict[int, object] = {}
        self.runs: dict[int, ray.ObjectRef] = {}

    def start(self, rank: int, world: int, port: int, timeout_s: float, config: LoraServerConfig) -> None:
        actor = ray.remote(LoraRankActor).options(num_cpus=1, num_gpus=self.gpus).remote()
        self.actors[rank] = actor
        self.runs[rank] = actor.run.remote(rank, world, self.host, port, timeout_s, config_json(config))

    def exited(self, rank: int) -> int | None:
        ready, _ = ray.wait([self.runs[rank]], timeout=0)
        if not ready:
            return None
        try:
            return ray.get(ready[0])
        except ray.exceptions.RayError:  # the actor died
            return -1

    def stop(self, grace_s: float) -> None:
        ray.wait(list(self.runs.values()), num_returns=len(self.runs), timeout=grace_s)
        for actor in self.actors.values():
            ray.kill(actor)


class LoraServerActor:
    def __init__(self, config: LoraServerConfig, lora_dirs: list[str], adapter_set: str, namespace: str,
                 rank_gpus: float) -> None:
        try:
            self._start(config, lora_dirs, adapter_set, namespace, rank_gpus)
        except Exception:
            if not ray.get_runtime_context().was_current_actor_reconstructed:
                raise  # at deploy: the error is the operator's to read
            # Ray does not restart an actor whose constructor raised: exit, so that it tries again (the
            # last incarnation's ranks may still hold their GPUs, or its port may be taken for a moment)
            log.exception("the LoRA server could not restart; exiting to be restarted again in %g s", RETRY_S)
            time.sleep(RETRY_S)  # a failure that persists (its port taken) must not spin
            os._exit(1)

    def _start(self, config: LoraServerConfig, lora_dirs: list[str], adapter_set: str, namespace: str,
               rank_gpus: float) -> None:
        host = ray.util.get_node_ip_address()
        adapters_actor = ray.get_actor(adapter_set, namespace=namespace)
        before = ray.get(adapters_actor.server_endpoint.remote())
        listen = before if before is not None and before.startswith(f"tcp://{host}:") else f"tcp://{host}:0"
        self.server = LoraServer(config, listen, lora_dirs, launcher=RayRanks(rank_gpus))
        ray.get(adapters_actor.server_endpoint.remote(self.server.endpoint))
        _, adapters = ray.get(adapters_actor.current.remote())
        for name, path in adapters.items():
            try:
                self.server.load(name, path)
            except Exception as e:  # one unreadable adapter must not keep the server down
                log.error("LoRA server: cannot load adapter %s from %s: %s", name, path, e)
        self.thread = threading.Thread(target=self._serve, name="loraserve-lora-server", daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        try:
            self.server.serve_forever()
        except BaseException:
            log.exception("the LoRA server stopped")
        if not self.server.stop.is_set():  # a rank is gone, or a fault: Ray restarts the whole server
            os._exit(1)

    def endpoint(self) -> str:
        return self.server.endpoint

    def pid(self) -> int:
        return os.getpid()

    def __del__(self) -> None:
        server = getattr(self, "server", None)
        if server is not None:
            server.stop.set()
            self.thread.join(timeout=10)
