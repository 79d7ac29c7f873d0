"""What the GPU path changes outside its kernels, checked where a CPU can
check it (and on the test device where one is given): tier copies, the LoRA
bank's expert targets, the device tier's budget, sampling on the device."""

from __future__ import annotations

import dataclasses

import torch

from loraserve.cli import build_parser, engine_config
from loraserve.config import CacheConfig, EngineConfig, SchedulerConfig
from loraserve.engine.memory_budget import bank_bytes, device_tier_bytes, sized_cache, step_bytes
from loraserve.engine.sampler import sample
from loraserve.engine.tier_memory import COPY_CHUNK_BYTES, TierMemory
from loraserve.engine.torch_mover import TorchMover
from loraserve.cache.mover import CopyJob
from loraserve.lora.adapter import load_adapter
from loraserve.lora.bank import LoraBank
from loraserve.model.spec import ModelSpec
from loraserve.model.targets import Target
from loraserve.sampling import SamplingParams


def test_tier_copies_round_trip_through_the_mover(tiny, device):
    """Device blocks out to the host tier and back into other device blocks,
    through the mover's own stream (on CUDA: pinned staging, events): the
    bytes arrive, the others are untouched."""
    spec = ModelSpec.from_dir(tiny("llama") / "model")
    memory = TierMemory(spec, 8, 4, torch.float32, device, num_host_blocks=6)
    dev = memory.tiers["device"]
    dev.copy_(torch.randn(dev.shape, generator=torch.Generator().manual_seed(0)))
    original = dev.cpu().clone()
    mover = TorchMover(memory, read_adapter=None)
    try:
        mover.submit(CopyJob(1, "device", "host", (5, 1, 2), (0, 4, 3), 0))
        mover.wait(1)
        assert torch.equal(memory.tiers["host"][:, :, [0, 4, 3]], original[:, :, [5, 1, 2]])
        dev[:, :, [5, 1, 2]] = 0
        mover.submit(CopyJob(2, "host", "device", (3, 0), (6, 7), 0))
        mover.wait(2)
        after = dev.cpu().clone()
        assert torch.equal(after[:, :, [6, 7]], original[:, :, [2, 5]])
        assert torch.equal(after[:, :, [0, 3, 4]], original[:, :, [0, 3, 4]])
        assert sorted(mover.poll()) == [1, 2]
    finally:
        mover.close()


def test_attention_only_adapters_allocate_no_expert_bank(tiny):
    """An MoE model's expert targets are E times the others: a bank of
    attention-only adapters has none; the first expert adapter adds them,
    and the adapters already in slots keep their weights."""
    root = tiny("qwen3_moe")
    spec = ModelSpec.from_dir(root / "model")
    full = load_adapter(root / "adapters" / "r16", spec, 64)
    attention = dataclasses.replace(full, id="attention-only",
                                    weights={k: w for k, w in full.weights.items() if not k[1].is_expert})
    bank = LoraBank(spec, 3, torch.float32, torch.device("cpu"))
    bank.load(0, attention)
    assert not any(t.is_expert for _, t in bank.a) and not bank.experts
    small = bank.num_bytes
    bank.load(1, full)
    assert bank.experts and (0, Target.EXPERTS_GATE_UP) in bank.a
    assert bank.num_bytes == bank_bytes(spec, 3, 16, 4) > 4 * small  # what the budget counts is what it holds
    a, _ = attention.weights[(0, Target.QKV)]
    assert torch.equal(bank.a[(0, Target.QKV)][0, :, :a.shape[-1]], a)
    assert bank.a[(0, Target.EXPERTS_GATE_UP)][1::4].abs().sum() == 0  # slot 0's expert rows: zeros


def test_a_banks_cached_views_follow_its_writes(tiny):
    """`LoraBank.view` keeps each key's last views until the bank is written: a load into a
    slot (an expert key's group ranks are a copy) and a load that grows the rank (new tensors)
    both show in the next view."""
    root = tiny("qwen3_moe")
    spec = ModelSpec.from_dir(root / "model")
    r8, r16 = (load_adapter(root / "adapters" / n, spec, 64) for n in ("r8", "r16"))
    bank = LoraBank(spec, 3, torch.float32, torch.device("cpu"))
    bank.load(0, r8)
    key, experts = (0, Target.QKV), (0, Target.EXPERTS_GATE_UP)
    a, _, ranks, _ = bank.view(experts, slice(0, None))
    assert bank.view(experts, slice(0, None))[0] is a  # kept
    assert ranks.tolist() == [0, 8, 0, 0] * spec.num_experts
    bank.load(1, r8)  # same rank: same tensors, new group ranks
    assert bank.view(experts, slice(0, None))[2].tolist() == [0, 8, 8, 0] * spec.num_experts
    bank.load(2, r16)  # rank 16: the bank is reallocated
    a16, b16, _, _ = bank.view(key, slice(0, 3))
    assert a16.shape[-1] == 3 * 16 and b16.shape[1] == 16 and a16.data_ptr() == bank.a[key].data_ptr()
    assert bank.view(key, slice(1, 3))[0].data_ptr() == bank.a[key][1].data_ptr()  # another range: its own view


def test_the_device_tier_is_what_is_left_after_the_bank_and_a_step(tiny):
    spec = ModelSpec.from_dir(tiny("qwen3_moe") / "model")
    assert device_tier_bytes(10 << 30, 0.5, 1 << 30) == int((4 << 30) * 0.95)
    assert device_tier_bytes(1 << 30, 0.5, 1 << 30) == 0
    # a step of 2048 tokens and 64 sequences: at least its logits and its hidden states
    assert step_bytes(spec, 2048, 64, 16, 4) > 64 * spec.vocab_size * 4 + 2048 * spec.hidden_size * 4
    config = EngineConfig(model="m", max_lora_rank=32, cache=CacheConfig(device_fraction=0.9),
                          scheduler=SchedulerConfig(max_loras=4, max_num_batched_tokens=512, max_num_seqs=16))
    reserved = bank_bytes(spec, 4, 32, 2) + step_bytes(spec, 512, 16, 32, 2) + 2 * COPY_CHUNK_BYTES
    sized = sized_cache(config, spec, 2, 8 << 30)
    assert sized.device_bytes == int((0.9 * (8 << 30) - reserved) * 0.95) and sized.device_fraction == 0.9
    assert sized_cache(config, spec, 2, reserved).device_bytes == 1  # nothing left: the engine refuses to start


def test_a_fractional_cuda_device_tier_is_sized_after_loading():
    """`--device-cache 0.6` on CUDA reaches the engine as a fraction (it measures
    free memory once the weights are in), not bytes measured before them; this
    runs on CPU-only torch, where measuring would raise."""
    args = build_parser().parse_args(["serve", "--device", "cuda", "--device-cache", "0.6"])
    cache = engine_config(args, "m").cache
    assert cache.device_fraction == 0.6
    sized = engine_config(build_parser().parse_args(["serve", "--device-cache", "1GiB"]), "m").cache
    assert sized == dataclasses.replace(cache, device_bytes=1 << 30, device_fraction=0.0)


def test_seeded_rows_draw_from_their_own_device_generator(device):
    """Per-request generators on the logits' device: a seeded row draws the
    same tokens whatever else is in the batch, and another seed draws others."""
    logits = torch.randn(4, 300, generator=torch.Generator().manual_seed(1)).to(device)
    seeded = SamplingParams(temperature=1.0, seed=7)
    free = SamplingParams(temperature=1.0, top_k=50, top_p=0.9)

    def draws(params, rows, seed=7):
        gens = [torch.Generator(device).manual_seed(seed) for _ in params]
        return [[t.token_id for t in sample(logits[rows], params, gens)][0] for _ in range(12)]

    alone = draws([seeded], [0])
    assert draws([seeded, free, free], [0, 1, 2]) == alone
    assert draws([seeded], [0], seed=8) != alone


def test_a_greedy_step_with_a_broken_row_takes_the_most_likely_tokens(device):
    """On a GPU the greedy tokens and the NaN check come back in one transfer;
    a NaN row still falls back to its most likely finite token."""
    logits = torch.randn(3, 50, generator=torch.Generator().manual_seed(2))
    logits[1, [4, 9]] = float("nan")
    greedy = [SamplingParams(temperature=0.0)] * 3
    got = [t.token_id for t in sample(logits.to(device), greedy, [None] * 3)]
    assert got == logits.nan_to_num(nan=float("-inf")).argmax(-1).tolist() and got[1] not in (4, 9)
    clean = logits.nan_to_num(0.0)
    assert [t.token_id for t in sample(clean.to(device), greedy, [None] * 3)] == clean.argmax(-1).tolist()
