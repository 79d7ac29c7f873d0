"""Model presets for the simulator (HF config fields of published models) and
the size of a LoRA adapter on them.

The simulator sizes everything from a ModelSpec, the same one the engine
builds from config.json, so a real model directory works as well as a preset.
"""

from __future__ import annotations

from pathlib import Path

from loraserve.model.spec import ModelSpec

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
}

TARGETS = ("q", "k", "v", "o", "gate", "up", "down")


def model_spec(name_or_dir: str) -> ModelSpec:
    """A preset by name, or a model directory's config.json."""
    if name_or_dir in PRESETS:
        return ModelSpec.from_config(PRESETS[name_or_dir])
    if Path(name_or_dir, "config.json").is_file():
        return ModelSpec.from_dir(name_or_dir)
    raise ValueError(f"unknown model {name_or_dir!r}: one of {', '.join(PRESETS)} or a directory with config.json")


def _mlp_shapes(spec: ModelSpec, layer: int) -> tuple[int, int]:
    """(intermediate size, number of copies) of the MLP LoRA targets in a layer:
    on MoE layers one LoRA per expert (and one for the shared expert)."""
    if spec.is_moe_layer(layer):
        return spec.moe_intermediate_size, spec.num_experts + (1 if spec.shared_expert_intermediate_size else 0)
    return spec.intermediate_size, 1


def lora_params(spec: ModelSpec, rank: int, targets: tuple[str, ...] = TARGETS) -> int:
    """Parameters of a rank-r adapter: r·(d_in + d_out) per targeted projection."""
    h, q, kv = spec.hidden_size, spec.q_size, spec.kv_size
    attn = {"q": h + q, "k": h + kv, "v": h + kv, "o": q + h}
    total = 0
    for layer in range(spec.num_layers):
        inter, copies = _mlp_shapes(spec, layer)
        total += sum(attn[t] for t in targets if t in attn)
        total += copies * sum(h + inter for t in targets if t in ("gate", "up", "down"))
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
