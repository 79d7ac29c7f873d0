"""The LoRA server's wire format: exact round trips, and refusals before any byte is read."""

from __future__ import annotations

import json

import pytest
import torch

from loraserve.model.spec import ModelSpec
from loraserve.model.targets import Target, layer_targets
from loraserve.remote.protocol import PROTOCOL_VERSION, ProtocolError, decode, encode, position


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.int32])
def test_tensors_round_trip_bit_for_bit(dtype):
    t = (torch.randn(5, 7) * 100).to(dtype)
    msg = decode([bytes(f) for f in encode({"kind": "result", "id": 3}, [t, t[:0]])])
    assert msg.kind == "result" and msg.header["id"] == 3
    assert msg.tensors[0].dtype == dtype and torch.equal(msg.tensors[0], t)
    assert msg.tensors[1].shape == (0, 7)


def frames(header: dict, *payload: bytes) -> list[bytes]:
    return [json.dumps({"v": PROTOCOL_VERSION, **header}).encode(), *payload]


@pytest.mark.parametrize("raw,status,words", [
    ([], 400, "empty"),
    ([b"\x00\xff"], 400, "not JSON"),
    ([b"[1, 2]"], 400, "JSON object"),
    ([json.dumps({"v": 99, "kind": "ping"}).encode()], 426, "version"),
    (frames({"kind": "result", "tensors": [["float32", [2]]]}), 400, "1 tensors, 0 frames"),
    (frames({"kind": "result", "tensors": [["float32", [2]]]}, b"\0" * 7), 400, "7 bytes"),
    (frames({"kind": "result", "tensors": [["complex64", [2]]]}, b"\0" * 16), 400, "bad dtype"),
    (frames({"kind": "result", "tensors": [["float32", [-1]]]}, b""), 400, "bad dtype or shape"),
    (frames({"kind": "result", "tensors": [["float32", [1 << 40, 1 << 40]]]}, b""), 400, "bad dtype or shape"),
])
def test_malformed_messages_are_refused(raw, status, words):
    with pytest.raises(ProtocolError) as e:
        decode(raw)
    assert e.value.status == status and words in str(e.value)


def test_positions_follow_the_forward_pass():
    spec = ModelSpec.from_config({"architectures": ["Qwen2MoeForCausalLM"], "num_attention_heads": 4,
                                  "num_key_value_heads": 2, "hidden_size": 64, "num_hidden_layers": 2,
                                  "intermediate_size": 128, "moe_intermediate_size": 32, "num_experts": 4,
                                  "num_experts_per_tok": 2, "shared_expert_intermediate_size": 64,
                                  "vocab_size": 100, "max_position_embeddings": 64, "rms_norm_eps": 1e-6})
    order = [position(spec, layer, t) for layer in range(2) for t in layer_targets(spec, layer)]
    assert order == sorted(order) and len(set(order)) == len(order)
    assert layer_targets(spec, 0)[2:4] == [Target.EXPERTS_GATE_UP, Target.EXPERTS_DOWN]
