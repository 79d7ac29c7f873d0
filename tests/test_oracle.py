"""Greedy outputs equal transformers + PEFT token for token, dense and MoE,
each adapter alone and in mixed batches of different ranks and prompt lengths."""

from __future__ import annotations

import pytest
import torch

from loraserve import LLM, SamplingParams
from tests.conftest import DENSE, MOE
from tests.oracle import greedy, logprobs_along

ADAPTERS = ["r4", "r8", "r16"]
PROMPTS = [[1, 2, 3, 4, 5, 6, 7], list(range(100, 153)), [5, 9, 13], list(range(3000, 3021))]
NUM_TOKENS = 32
LOGPROB_ATOL = 1e-4  # fp32 log-probabilities of the first sampled step


@pytest.mark.parametrize("family", DENSE + MOE)
def test_mixed_batch_matches_oracle(tiny, family, device):
    root = tiny(family)
    model_dir = str(root / "model")
    adapters = {n: str(root / "adapters" / n) for n in ADAPTERS}
    llm = LLM(model_dir, dtype="float32", adapters=adapters, device=str(device))
    assert_mixed_batch_matches(llm, model_dir, adapters, family)


def assert_mixed_batch_matches(llm: LLM, model_dir: str, oracle_adapters: dict[str, str], family: str) -> None:
    """Every (prompt, adapter) pair, all in one batch (base and three ranks interleaved): the
    oracle's tokens, and its first step's log-probabilities, with `oracle_adapters` in PEFT."""
    cases = [(p, a) for p in PROMPTS for a in [None, *ADAPTERS]]
    sp = SamplingParams(max_tokens=NUM_TOKENS, temperature=0.0, ignore_eos=True, logprobs=3)
    outs = llm.generate([p for p, _ in cases], sp, adapter=[a for _, a in cases])
    for (prompt, adapter), out in zip(cases, outs):
        ref_tokens, ref_logprobs = greedy(model_dir, oracle_adapters.get(adapter), prompt, NUM_TOKENS)
        assert out.token_ids == ref_tokens, f"{family} adapter={adapter} prompt len {len(prompt)}"
        top = out.top_logprobs[0]
        ref = ref_logprobs[list(top)]
        assert torch.allclose(torch.tensor(list(top.values())), ref, atol=LOGPROB_ATOL)
        assert out.logprobs[0] == pytest.approx(ref_logprobs[ref_tokens[0]].item(), abs=LOGPROB_ATOL)


@pytest.mark.parametrize("family", ["llama", "qwen3_moe"])
def test_adapters_change_the_output(tiny, family, device):
    """The oracle test would pass trivially if adapters did nothing."""
    root = tiny(family)
    llm = LLM(str(root / "model"), dtype="float32", adapters={n: str(root / "adapters" / n) for n in ADAPTERS},
              device=str(device))
    sp = SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True)
    outs = llm.generate([PROMPTS[1]] * 4, sp, adapter=[None, *ADAPTERS])
    assert len({tuple(o.token_ids) for o in outs}) == 4


def test_demo_model_matches_oracle(demo, device):
    model_dir = str(demo / "model")
    names = ["chat", "sql", "poet"]
    llm = LLM(model_dir, dtype="float32", adapters={n: str(demo / "adapters" / n) for n in names}, device=str(device))
    tok = llm.engine.tokenizer
    prompt = tok.chat_tokens([{"role": "user", "content": "What is the capital of France?"}])
    sp = SamplingParams(max_tokens=NUM_TOKENS, temperature=0.0, ignore_eos=True)
    outs = llm.generate([prompt] * 4, sp, adapter=[None, *names])
    assert "Paris" in outs[0].text
    for out, name in zip(outs, [None, *names]):
        ref, _ = greedy(model_dir, None if name is None else str(demo / "adapters" / name), prompt, NUM_TOKENS)
        assert out.token_ids == ref, name


BF16_LOGPROB_ATOL = 0.1  # bf16 keeps ~3 significant digits; the fp32 oracle is the reference


@pytest.mark.parametrize("family", ["llama", "qwen3_moe"])
def test_bfloat16_stays_close_to_the_fp32_oracle(tiny, family, device):
    root = tiny(family)
    model_dir = str(root / "model")
    llm = LLM(model_dir, adapters={"r8": str(root / "adapters" / "r8")}, dtype="bfloat16", device=str(device))
    sp = SamplingParams(max_tokens=1, temperature=0.0, ignore_eos=True, logprobs=5)
    for adapter in (None, "r8"):
        out = llm.generate([PROMPTS[1]], sp, adapter=adapter)[0]
        _, ref = greedy(model_dir, None if adapter is None else str(root / "adapters" / adapter), PROMPTS[1], 1)
        top = out.top_logprobs[0]
        assert torch.allclose(torch.tensor(list(top.values())), ref[list(top)], atol=BF16_LOGPROB_ATOL)


@pytest.mark.parametrize("family", DENSE)
def test_bfloat16_decodes_stay_close_to_the_fp32_oracle(tiny, family):
    """bf16 decode steps in a mixed batch (on a CPU with bf16 dot products: our bf16 panel
    projections, attention reading the bf16 cache in place, the LoRA kernel over bf16 rows):
    every step's top log-probabilities within bf16's tolerance of the fp32 oracle's, fed the
    same tokens. Dense models: in the tiny MoE ones a router's near-tie can pick another expert
    in bf16 than in fp32, and the steps after differ by more than rounding (0.19 on qwen3_moe's
    second step with every CPU kernel off too)."""
    root = tiny(family)
    model_dir, adapter_dir = str(root / "model"), str(root / "adapters" / "r8")
    llm = LLM(model_dir, adapters={"r8": adapter_dir}, dtype="bfloat16")
    sp = SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True, logprobs=5)
    adapters = [None, "r8", "r8", None]
    outs = llm.generate(PROMPTS, sp, adapter=adapters)
    for prompt, adapter, out in zip(PROMPTS, adapters, outs):
        ref = logprobs_along(model_dir, None if adapter is None else adapter_dir, prompt, out.token_ids)
        assert len(out.top_logprobs) == 6
        for step, top in enumerate(out.top_logprobs):
            assert torch.allclose(torch.tensor(list(top.values())), ref[step, list(top)], atol=BF16_LOGPROB_ATOL), step


@pytest.mark.parametrize("family", ["llama", "qwen3_moe"])
def test_bf16_adapter_copies_match_the_oracle_with_rounded_weights(tiny, family, tmp_path):
    """`lora_dtype="bfloat16"` under an fp32 model (a CPU feature): the adapters are stored at
    half the bytes and the math stays fp32 (on any CPU), so the output is PEFT's with each
    adapter weight rounded to bf16, token for token. (The tiny adapters' scalings are powers of two, so
    rounding B before or after scaling is the same.)"""
    from safetensors.torch import load_file, save_file

    root = tiny(family)
    model_dir = str(root / "model")
    adapters, rounded = {}, {}
    for name in ADAPTERS:
        src, dst = root / "adapters" / name, tmp_path / name
        dst.mkdir()
        (dst / "adapter_config.json").write_text((src / "adapter_config.json").read_text())
        tensors = load_file(src / "adapter_model.safetensors")
        save_file({k: t.bfloat16().float() for k, t in tensors.items()}, dst / "adapter_model.safetensors")
        adapters[name], rounded[name] = str(src), str(dst)
    llm = LLM(model_dir, dtype="float32", lora_dtype="bfloat16", adapters=adapters)
    full = LLM(model_dir, dtype="float32", adapters={"r8": adapters["r8"]}).engine.adapters.by_name["r8"]
    half = llm.engine.adapters.by_name["r8"]
    assert half.num_bytes * 2 == full.num_bytes and llm.engine.lora.bank.dtype == torch.bfloat16
    assert llm.engine.lora.bank.compute_dtype == torch.float32
    assert_mixed_batch_matches(llm, model_dir, rounded, family)
