"""Disaggregated LoRA (InfiniLoRA), what instances and the LoRA server share,
and the instance's side: `protocol.py` (the messages), `transport.py`
(ZeroMQ behind a small interface), `config.py`, `client.py` (the
`LoraBackend` the model calls, and liveness). The server is `lora_server/`.
"""
