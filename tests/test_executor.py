"""Mechanism pieces of the executor that the scheduler does not exercise."""

from __future__ import annotations

import torch

from loraserve.engine.torch_executor import TorchExecutor
from loraserve.model.loader import load_model


def test_copy_blocks_between_tiers_round_trips(tiny):
    model = load_model(tiny("llama") / "model", torch.float32)
    ex = TorchExecutor(model, num_blocks=6, block_size=4, num_slots=2, adapters={}, seed=0, num_host_blocks=3)
    device, host = ex.tiers["device"], ex.tiers["host"]
    device.copy_(torch.randn_like(device))
    ex.copy_blocks("device", "host", [(4, 0), (1, 2)])
    assert torch.equal(host[:, :, 0], device[:, :, 4]) and torch.equal(host[:, :, 2], device[:, :, 1])
    expected = device[:, :, 4].clone()
    device.zero_()
    ex.copy_blocks("host", "device", [(0, 5)])
    assert torch.equal(device[:, :, 5], expected)
    assert device[:, :, :5].abs().sum() == 0  # nothing else was touched
