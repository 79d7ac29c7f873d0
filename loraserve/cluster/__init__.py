"""Scale-out on Ray Serve: many engine replicas behind one OpenAI endpoint.

`deploy.py` starts (or joins) Ray, deploys `EngineReplica`s (`replica.py`) as a
Serve deployment whose request router (`router.py`) calls the project's routing
policy (`loraserve/router`), and serves the same FastAPI app as the single
process server over `ReplicaSetClient` (`client.py`), the engine client
interface spoken over Ray calls. The adapter set lives in one named actor
(`adapter_set.py`), so a replica started later gets the current set.

Ray is an optional extra (`pip install loraserve[cluster]`); nothing outside
this package imports it.
"""
