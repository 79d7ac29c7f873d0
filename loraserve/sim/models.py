"""Model presets for the simulator (HF config fields of published models) and
the size of a LoRA adapter on them.

The simulator sizes everything from a ModelSpec, the same one the engine
builds from config.json, so a real model directory works as well as a preset.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from loraserve.model.spec import ModelSpec
from loraserve.model.targets import Target, in_dim, layer_targets, out_dim

_LLAMA = {"architectures": ["LlamaForCausalLM"], "rms_norm_eps": 1e-5, "tie_word_embeddings": False}

PRESETS: dict[str, dict] = {
    "llama3-8b": {**_LLAMA, "vocab_size": 128256, "hidden_size": 4096, "num_hidden_layers": 32,
                  "num_attention_heads": 32, "num_key_value_heads": 8, "intermediate_size": 14336,
                  "rope_theta": 500000.0, "max_position_embeddings": 8192},
    "codellama-34b": {**_LLAMA, "vocab_size": 32000, "hidden_size": 8192, "num_hidden_layers": 48,
                      "num_attention_heads": 64, "num_key_value_heads": 8, "intermediate_size": 22016,
                      "rope_theta": 1000000.0, "max_position_embeddings": 16384},
    "llama3-70b": {**_LLAMA, "vocab_size": 128256, "hidden_size": 8192, "num_hidden_layers": 80,
                   "num_attention_heads": 64, "num_key_value_heads": 8, "intermediate_size": 28672,
                   "rope_theta": 500000.0, "max_position_embeddings": 8192},
    "mixtral-8x7b": {"architectures": ["MixtralForCausalLM"], "vocab_size": 32000, "hidden_size": 4096,
                     "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 8,
                     "intermediate_size": 14336, "num_local_experts": 8, "num_experts_per_tok": 2,
                     "rope_theta": 1000000.0, "max_position_embeddings": 32768},
    "qwen3-30b-a3b": {"architectures": ["Qwen3MoeForCausalLM"], "vocab_size": 151936, "hidden_size": 2048,
                      "num_hidden_layers": 48, "num_attention_heads": 32, "num_key_value_heads": 4,
                      "head_dim": 128, "intermediate_size": 6144, "moe_intermediate_size": 768,
                      "num_experts": 128, "num_experts_per_tok": 8, "norm_topk_prob": True,
                      "rope_theta": 1000000.0, "max_position_embeddings": 40960},
    "qwen1.5-moe-a2.7b": {"architectures": ["Qwen2MoeForCausalLM"], "vocab_size": 151936, "hidden_size": 2048,
                          "num_hidden_layers": 24, "num_attention_heads": 16, "num_key_value_heads": 16,
                          "intermediate_size": 5632, "moe_intermediate_size": 1408, "num_experts": 60,
                          "num_experts_per_tok": 4, "shared_expert_intermediate_size": 5632,
                          "max_position_embeddings": 8192},
    # InfiniLoRA's models (papers.md 2.7). GPT-OSS-20B, DBRX and the paper's scaled MoE are not
    # architectures the engine runs: they are Mixtral-shaped sizing specs (attention + top-k experts of
    # three projections) with the published dimensions, enough for the simulator's roofline and LoRA
    # sizes. GPT-OSS-20B takes the paper's 32 layers (its published config has 24); the scaled MoE's
    # widths are ours (the paper gives only 18 layers and 32 experts on 4 GPUs).
    "gpt-oss-20b": {"architectures": ["MixtralForCausalLM"], "vocab_size": 201088, "hidden_size": 2880,
                    "num_hidden_layers": 32, "num_attention_heads": 64, "num_key_value_heads": 8, "head_dim": 64,
                    "intermediate_size": 2880, "num_local_experts": 32, "num_experts_per_tok": 4,
                    "rope_theta": 150000.0, "max_position_embeddings": 131072},
    "dbrx": {"architectures": ["MixtralForCausalLM"], "vocab_size": 100352, "hidden_size": 6144,
             "num_hidden_layers": 40, "num_attention_heads": 48, "num_key_value_heads": 8,
             "intermediate_size": 10752, "num_local_experts": 16, "num_experts_per_tok": 4,
             "rope_theta": 500000.0, "max_position_embeddings": 32768},
    "scaled-moe": {"architectures": ["MixtralForCausalLM"], "vocab_size": 32000, "hidden_size": 6144,
                   "num_hidden_layers": 18, "num_attention_heads": 48, "num_key_value_heads": 8,
                   "intermediate_size": 12288, "num_local_experts": 32, "num_experts_per_tok": 2,
                   "rope_theta": 1000000.0, "max_position_embeddings": 32768},
}


@dataclass(frozen=True)
class Deployment:
    """How the paper deploys a model: its LoRA rank and the GPUs of one base-model instance."""

    model: str
    rank: int
    gpus: int


INFINILORA_MODELS: dict[str, Deployment] = {d.model: d for d in (
    Deployment("gpt-oss-20b", 64, 1), Deployment("qwen3-30b-a3b", 32, 2), Deployment("mixtral-8x7b", 64, 2),
    Deployment("dbrx", 64, 4), Deployment("scaled-moe", 64, 4))}
"""The five MoE models of InfiniLoRA's evaluation (papers.md 2.7); adapters cover attention and every expert."""

PAPER_LORA_DTYPE_BYTES = 4
"""Bytes per adapter weight that InfiniLoRA's one stated adapter size implies: "Qwen3-30B-A3B
reaches 6.18 GB" is, to the digit, its rank-32 LoRA on every expert's three projections
(1.661e9 weights) at 4 bytes a weight, 6.1875 GiB; at bf16's 2 bytes it would be 3.09. (Rank 64
in bf16 gives the same bytes, but the evaluation's Qwen3 rank is 32.) Adapters trained in mixed
precision are saved in fp32, and the paper's sizes say they are served so. Its reproduction
(benchmarks/infinilora_sim.py) runs at this size and, as a second reading, at 2 bytes."""


def model_spec(name_or_dir: str) -> ModelSpec:
    """A preset by name, or a model directory's config.json."""
    if name_or_dir in PRESETS:
        return ModelSpec.from_config(PRESETS[name_or_dir])
    if Path(name_or_dir, "config.json").is_file():
        return ModelSpec.from_dir(name_or_dir)
    raise ValueError(f"unknown model {name_or_dir!r}: one of {', '.join(PRESETS)} or a directory with config.json")


def lora_params(spec: ModelSpec, rank: int, targets: frozenset[Target] = frozenset(Target)) -> int:
    """Parameters of a rank-r adapter on `targets` (by default every projection,
    each expert's included): r·(d_in + d_out) per adapted sub-projection."""
    total = 0
    for layer in range(spec.num_layers):
        for t in layer_targets(spec, layer):
            if t in targets:
                copies = spec.num_experts if t.is_expert else 1
                total += copies * (t.width * in_dim(spec, t) + out_dim(spec, t))
    return rank * total


def linear_params(spec: ModelSpec) -> tuple[int, int, int]:
    """(dense params read by every token, params of one expert, expert count) summed
    over layers. lm_head and embeddings are counted apart by the cost model."""
    h = spec.hidden_size
    attn = h * spec.q_size * 2 + h * spec.kv_size * 2
    dense, expert = 0, 0
    for layer in range(spec.num_layers):
        dense += attn
        if spec.is_moe_layer(layer):
            dense += h * spec.num_experts + 3 * h * spec.shared_expert_intermediate_size
            expert += 3 * h * spec.moe_intermediate_size
        else:
            dense += 3 * h * spec.intermediate_size
    return dense, expert, spec.num_experts
