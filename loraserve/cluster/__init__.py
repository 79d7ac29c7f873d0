"""Scale-out on Ray Serve: many engine replicas behind one OpenAI endpoint.

`deploy.py` starts (or joins) Ray, deploys `EngineReplica`s (`replica.py`) as a
Serve deployment whose request router (`router.py`) calls the project's routing
policy (`loraserve/router`), and serves the same FastAPI app as the single
process server over `ReplicaSetClient` (`client.py`), the engine client
interface: requests and their outputs over each replica's ZeroMQ channel
(`channel.py`), adapter loads and stats over Serve calls. The adapter set
lives in one named actor (`adapter_set.py`), so a replica started later gets
the current set. With `--lora-server-ranks`, the LoRA server's ranks are Ray
actors too (`lora_server.py`).

Ray is an optional extra (`pip install loraserve[cluster]`); nothing outside
this package imports it.
"""

import os

# Serve's latency switches, read when ray.serve is first imported (so here, before any module of this
# package imports it): user code on the replica's own event loop (ours never blocks it: the engine steps
# on its own thread) and the request router on the caller's loop, two thread hops less per request and
# per streamed item. Replicas get the same through their actors' environment (deploy.py).
SERVE_ENV = {"RAY_SERVE_RUN_USER_CODE_IN_SEPARATE_THREAD": "0", "RAY_SERVE_RUN_ROUTER_IN_SEPARATE_LOOP": "0"}
for _key, _value in SERVE_ENV.items():
    os.environ.setdefault(_key, _value)

