"""transformers + PEFT as the reference for every adapter."""

from __future__ import annotations

from functools import lru_cache

import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM


@lru_cache(maxsize=8)
def reference_model(model_dir: str, adapter_dir: str | None):
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    if adapter_dir is not None:
        model = PeftModel.from_pretrained(model, adapter_dir)
    return model.eval()


def greedy(model_dir: str, adapter_dir: str | None, prompt: list[int], n: int) -> tuple[list[int], torch.Tensor]:
    """The oracle's greedy continuation and the log-probabilities of its first step."""
    # a plain loop rather than generate(): generate's min_new_tokens would mask EOS
    model = reference_model(model_dir, adapter_dir)
    tokens, first = [], None
    with torch.no_grad():
        out = model(torch.tensor([prompt]), use_cache=True)
        for _ in range(n):
            logits = out.logits[0, -1].float()
            first = torch.log_softmax(logits, -1) if first is None else first
            tokens.append(int(logits.argmax()))
            out = model(torch.tensor([[tokens[-1]]]), past_key_values=out.past_key_values, use_cache=True)
    return tokens, first


def logprobs_along(model_dir: str, adapter_dir: str | None, prompt: list[int], tokens: list[int]) -> torch.Tensor:
    """The oracle's log-probabilities before each of `tokens`, fed the prompt and `tokens` (another
    system's continuation): [len(tokens), vocab]."""
    model = reference_model(model_dir, adapter_dir)
    with torch.no_grad():
        logits = model(torch.tensor([prompt + tokens[:-1]])).logits[0, len(prompt) - 1:].float()
    return torch.log_softmax(logits, -1)
