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


def test_expert_rows_travel_once_per_token_where_they_can():
    """A token's gate|up input is the same whichever expert it is routed to: the
    wire carries it once and a gather index per (token, expert) row. Down's
    inputs differ per expert and go as they are, but its deltas come back one
    per token: the server combines them with the routing weights (`combine_rows`),
    and the model adds them after its own combine."""
    from types import SimpleNamespace

    from loraserve.model.lora import Routing
    from loraserve.remote.backend import ServerRows

    spec = ModelSpec.from_config({"architectures": ["MixtralForCausalLM"], "num_attention_heads": 4,
                                  "num_key_value_heads": 2, "hidden_size": 16, "num_hidden_layers": 1,
                                  "intermediate_size": 32, "num_local_experts": 4, "num_experts_per_tok": 2,
                                  "vocab_size": 100, "max_position_embeddings": 64, "rms_norm_eps": 1e-6})
    layout = [((0, Target.EXPERTS_GATE_UP), 0, 0), ((0, Target.EXPERTS_DOWN), 0, 0)]
    rows = ServerRows(spec, {"a": SimpleNamespace(layout=layout), "b": SimpleNamespace(layout=layout)})
    assert rows.begin(["b", None, "a"], [2, 2, 3], []) == [1, 2, 0]  # base first, then by adapter
    h = torch.randn(7, 16)  # 2 base tokens, 3 of a, 2 of b
    experts = torch.tensor([[0, 1], [1, 2], [2, 3], [0, 3], [1, 3], [0, 2], [2, 1]])
    order = torch.argsort(experts.flatten(), stable=True)
    routing = Routing(torch.arange(7).repeat_interleave(2)[order], experts.flatten()[order], torch.ones(14))
    routing.weight = torch.rand(14)
    pairs = h[routing.token]
    up = rows.rows(0, Target.EXPERTS_GATE_UP, pairs, routing)
    assert up.xs.shape == (5, 16) and len(up.row_adapter) == len(up.expert) == len(up.gather) == 10  # 5 tokens
    assert torch.equal(up.xs[up.gather.long()], pairs[up.rows]) and up.gather.dtype == torch.int32
    assert torch.equal(up.row_adapter, torch.tensor([0 if t < 5 else 1 for t in routing.token[up.rows].tolist()],
                                                    dtype=torch.int32))
    assert up.tokens is None

    down = rows.rows(0, Target.EXPERTS_DOWN, torch.randn(14, 32), routing)
    assert down.xs.shape == (10, 32) and down.gather is None
    assert down.tokens.tolist() == [2, 3, 4, 5, 6] and down.scatter.dtype == torch.int32
    assert torch.equal(down.tokens[down.scatter.long()], routing.token[down.rows])
    assert torch.equal(down.weight, routing.weight[down.rows])
    # what the server sends back, added after the model's combine, equals the deltas added before it
    from loraserve.kernels import combine_rows

    delta = torch.randn(10, 16, dtype=torch.float64)
    y = torch.randn(14, 16, dtype=torch.float64)
    before = y.clone().index_add_(0, down.rows, delta)
    per_pair = torch.zeros(7, 16, dtype=torch.float64).index_add_(0, routing.token, before * routing.weight[:, None].double())
    token, combined = rows.add(y, combine_rows(delta, down.scatter, down.weight, 5), down)
    after = torch.zeros(7, 16, dtype=torch.float64).index_add_(0, routing.token, y * routing.weight[:, None].double())
    assert torch.allclose(after.index_add_(0, token, combined), per_pair)
