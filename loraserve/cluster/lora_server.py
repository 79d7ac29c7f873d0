"""The disaggregated layout on Ray: the LoRA server (InfiniLoRA) as a Ray actor
that the engine replicas reach over its usual socket.

The actor runs the whole server: rank 0 here, ranks 1..EP·PP-1 as its own
processes on the same node (as `loraserve lora-server --ep --pp` starts
them), so it asks Ray for every rank's CPUs and GPUs. It listens on a port
fixed by the deployment, so that Ray, restarting a dead server (it restarts
it without limit), brings it back at the same address: the instances
reconnect by themselves (a restarted server's new incarnation makes them
re-read its catalogue). It loads the adapter set when it starts, so a
restart also brings back what was loaded at runtime.
"""

from __future__ import annotations

import logging
import os
import threading

import ray

from loraserve.lora_server.server import LoraServer
from loraserve.remote.config import LoraServerConfig

log = logging.getLogger(__name__)


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


class LoraServerActor:
    def __init__(self, config: LoraServerConfig, port: int, lora_dirs: list[str], adapter_set: str,
                 namespace: str) -> None:
        host = ray.util.get_node_ip_address()
        self.server = LoraServer(config, f"tcp://{host}:{port}", lora_dirs)
        _, adapters = ray.get(ray.get_actor(adapter_set, namespace=namespace).current.remote())
        for name, path in adapters.items():
            try:
                self.server.load(name, path)
            except Exception as e:  # one unreadable adapter must not keep the server down
                log.error("LoRA server: cannot load adapter %s from %s: %s", name, path, e)
        self.thread = threading.Thread(target=self.server.serve_forever, name="loraserve-lora-server", daemon=True)
        self.thread.start()

    def endpoint(self) -> str:
        return self.server.endpoint

    def pid(self) -> int:
        return os.getpid()

    def __del__(self) -> None:
        server = getattr(self, "server", None)
        if server is not None:
            server.stop.set()
            self.thread.join(timeout=10)
