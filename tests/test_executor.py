"""Mechanism pieces of the executor that the scheduler does not exercise."""

from __future__ import annotations

import torch

from loraserve.engine.tier_memory import TierMemory, _runs
from loraserve.model.spec import ModelSpec


def test_copy_blocks_between_tiers_round_trips(tiny):
    spec = ModelSpec.from_dir(tiny("llama") / "model")
    ex = TierMemory(spec, num_blocks=6, block_size=4, dtype=torch.float32, device=torch.device("cpu"),
                    num_host_blocks=3)
    device, host = ex.tiers["device"], ex.tiers["host"]
    device.copy_(torch.randn_like(device))
    ex.copy_blocks("device", "host", [(4, 0), (1, 2)])
    assert torch.equal(host[:, :, 0], device[:, :, 4]) and torch.equal(host[:, :, 2], device[:, :, 1])
    expected = device[:, :, 4].clone()
    device.zero_()
    ex.copy_blocks("host", "device", [(0, 5)])
    assert torch.equal(device[:, :, 5], expected)
    assert device[:, :, :5].abs().sum() == 0  # nothing else was touched
    # runs of consecutive blocks are copied as one slice: 2, 3 -> 0, 1 is a run, 5 -> 2 is not
    assert _runs([(2, 0), (3, 1), (5, 2)]) == [(2, 0, 2), (5, 2, 1)]
    assert _runs([(4, 0), (5, 2), (6, 3)]) == [(4, 0, 1), (5, 2, 2)]  # both sides must go on
    device.copy_(torch.randn_like(device))
    ex.copy_blocks("device", "host", [(2, 0), (3, 1), (5, 2)])
    assert torch.equal(host, device[:, :, [2, 3, 5]])


def test_unloaded_adapter_goes_when_its_last_request_is_aborted(tiny):
    from loraserve import LLM, SamplingParams

    root = tiny("llama")
    engine = LLM(str(root / "model"), dtype="float32", adapters={"r8": str(root / "adapters" / "r8")}).engine
    req = engine.add_request([1, 2, 3], SamplingParams(max_tokens=50, ignore_eos=True), adapter="r8")
    engine.step()
    engine.remove_adapter("r8")
    assert engine.adapter_loaded(req.adapter)  # still running on its weights
    engine.abort(req.request_id)  # no further step runs
    assert not engine.adapter_loaded(req.adapter)
    assert engine.slots.resident() == {}
