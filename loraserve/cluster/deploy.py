"""Start (or join) Ray, deploy the engine replicas on Serve, and hand back the
endpoint's client: what `loraserve serve --replicas N` runs before it serves
the usual app over that client.

Serve runs no HTTP proxy of its own: the endpoint is this process's uvicorn
serving `server/app.py` (one API implementation). Requests go straight to the
replicas' data channels (`channel.py`); control calls go through a handle,
whose request router (`ReplicaRouter`, which also chooses each request's
replica) lives here, where the endpoint reads its counters.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, replace

import ray
from ray import serve
from ray.serve.config import RequestRouterConfig

from loraserve.cluster import SERVE_ENV
from loraserve.cluster.adapter_set import AdapterSet
from loraserve.cluster.lora_server import LoraServerActor
from loraserve.cluster.client import ReplicaSetClient
from loraserve.cluster.replica import EngineReplica
from loraserve.cluster.router import ReplicaRouter
from loraserve.config import EngineConfig
from loraserve.remote.config import LoraServerConfig, RemoteLoraConfig
from loraserve.router import POLICIES

NAMESPACE = "loraserve"
DEPLOYMENT = "engine"


@dataclass(frozen=True)
class ClusterOptions:
    replicas: int = 2
    ray_address: str | None = None
    """An existing Ray cluster to join ("auto", or ray://HOST:PORT); None starts a local instance."""

    replica_cpus: float | None = None
    """CPUs each replica asks Ray for (and its torch threads); None: this machine's cores / replicas."""

    replica_gpus: float = 0.0
    routing: str = "affinity"
    """A policy of `loraserve.router.POLICIES`."""

    stats_period_s: float = 0.5
    """How often each replica reports its residency and load to the routers."""

    app: str = "loraserve"
    """The Serve application's name (several endpoints may share one Ray cluster under different names)."""

    lora_server: LoraServerConfig | None = None
    """The disaggregated layout: a LoRA server of these EP×PP ranks as a Ray actor, which every replica
    calls for its deltas (`remote` says how; its endpoint is filled in here)."""

    remote: dict | None = None
    """RemoteLoraConfig's fields but the endpoint (how the replicas call the server)."""

    lora_server_gpus: float = 0.0
    """GPUs per LoRA server rank."""

    lora_dirs: tuple[str, ...] = ()
    """Where the LoRA server may read runtime loads from."""

    def __post_init__(self) -> None:
        if self.replicas < 1:
            raise ValueError(f"--replicas must be at least 1, got {self.replicas}")
        if self.routing not in POLICIES:
            raise ValueError(f"unknown routing policy {self.routing!r}; choose from {', '.join(POLICIES)}")
        if self.replica_cpus is not None and self.replica_cpus <= 0:
            raise ValueError(f"--replica-cpus must be positive, got {self.replica_cpus}")

    @property
    def cpus(self) -> float:
        return self.replica_cpus or max(1.0, (os.cpu_count() or 1) / self.replicas)


def start_cluster(config: EngineConfig, adapters: dict[str, str], opts: ClusterOptions,
                  max_waiting: int = 1024) -> ReplicaSetClient:
    """Deploy `opts.replicas` engines serving `adapters` and return the endpoint's
    client; blocks until every replica has loaded its model."""
    if not ray.is_initialized():
        server = opts.lora_server.ep * opts.lora_server.pp if opts.lora_server is not None else 0
        local = {} if opts.ray_address else {"num_cpus": max(os.cpu_count() or 1, opts.cpus * opts.replicas + server)}
        ray.init(address=opts.ray_address, namespace=NAMESPACE, include_dashboard=False, log_to_driver=False,
                 logging_level=logging.WARNING, **local)
    serve.start(proxy_location="Disabled")
    set_name = f"{opts.app}-adapters"
    _kill_actor(set_name)  # a set left by an endpoint that died: the new one is the truth
    adapter_set = ray.remote(AdapterSet).options(name=set_name, namespace=NAMESPACE, num_cpus=0).remote(
        {name: str(path) for name, path in adapters.items()})
    lora_server = None
    if opts.lora_server is not None:
        lora_server = start_lora_server(opts, set_name)
        endpoint = ray.get(lora_server.endpoint.remote(), timeout=300)
        config = replace(config, lora_server=RemoteLoraConfig(endpoint, **(opts.remote or {})))
    scheduler = config.scheduler
    deployment = serve.deployment(EngineReplica, name=DEPLOYMENT).options(
        num_replicas=opts.replicas,
        # the engine queues and refuses (429) by itself; Serve only has to never hold a request back
        max_ongoing_requests=max_waiting + scheduler.max_num_seqs + 16,
        ray_actor_options={"num_cpus": opts.cpus, "num_gpus": opts.replica_gpus,
                           "runtime_env": {"env_vars": {k: os.environ[k] for k in SERVE_ENV}}},
        health_check_period_s=2.0, health_check_timeout_s=30.0, graceful_shutdown_timeout_s=10.0,
        request_router_config=RequestRouterConfig(
            request_router_class=ReplicaRouter, request_router_kwargs={"policy": opts.routing},
            request_routing_stats_period_s=opts.stats_period_s, request_routing_stats_timeout_s=10.0))
    threads = max(1, int(opts.cpus))
    serve.run(deployment.bind(config, set_name, NAMESPACE, threads, max_waiting), name=opts.app,
                       route_prefix=None)
    describe = ray.get(adapter_set.described.remote(), timeout=60)  # the handle is for the server's event loop
    client = ReplicaSetClient(opts.app, DEPLOYMENT, adapter_set, describe)
    client.lora_server = lora_server
    return client


def start_lora_server(opts: ClusterOptions, adapter_set: str):
    """Start the LoRA server's rank 0 (it starts the other ranks; Ray restarts it if it dies). Keep the
    handle: an actor that is not detached goes when its last handle does."""
    name = f"{opts.app}-lora-server"
    _kill_actor(name)
    return ray.remote(LoraServerActor).options(
        name=name, namespace=NAMESPACE, max_restarts=-1, max_task_retries=-1, num_cpus=1,
        num_gpus=opts.lora_server_gpus).remote(opts.lora_server, list(opts.lora_dirs), adapter_set, NAMESPACE,
                                               opts.lora_server_gpus)


def stop_cluster(opts: ClusterOptions) -> None:
    """Delete the application; a local Ray instance this process started goes with it."""
    try:
        serve.delete(opts.app)
        for name in (f"{opts.app}-lora-server", f"{opts.app}-adapters"):
            _kill_actor(name)
    finally:
        if not opts.ray_address:
            serve.shutdown()
            ray.shutdown()


def _kill_actor(name: str) -> None:
    """Kill our named actor, if there is one."""
    try:
        ray.kill(ray.get_actor(name, namespace=NAMESPACE))
    except ValueError:
        pass

