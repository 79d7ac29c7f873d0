"""The LoRA server (InfiniLoRA): every adapter in one place, deltas computed
for many base-model instances. What travels and how is `remote/`; this
package is the server's side: `server.py` (the loop: batching across
instances), `store.py` (adapters: registry, tiered cache, slots filled layer
by layer), `compute.py` (one batched kernel), `metrics.py`.
"""
