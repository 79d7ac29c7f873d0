"""Disaggregated LoRA (InfiniLoRA): base-model instances without adapters, and
one LoRA server that holds every adapter and computes every delta.

Read in this order: `protocol.py` (the messages), `transport.py` (ZeroMQ
behind a small interface), `server.py` (the loop: batching across instances),
`store.py` (the server's adapters: registry, tiered cache, slots filled layer
by layer), `compute.py` (one batched kernel), `client.py` (the instance side:
the `LoraBackend` the model calls, and liveness).
"""
