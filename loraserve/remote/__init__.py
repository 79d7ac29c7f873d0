"""Disaggregated LoRA (InfiniLoRA), what instances and the LoRA server share,
and the instance's side: `protocol.py` (the messages), `transport.py`
(ZeroMQ behind a small interface), `nixl_transport.py` (one-sided writes of
results), `config.py`, `backend.py` (the `LoraBackend` the model calls) and
`client.py` (control calls and liveness). The server is `lora_server/`.
"""
