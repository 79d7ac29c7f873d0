"""safetensors checkpoint → Transformer, failing early with the tensor's name."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import torch
from safetensors import safe_open

from loraserve.model.linear import Linear
from loraserve.model.spec import ModelError, ModelSpec
from loraserve.model.transformer import DenseMLP, Layer, MoE, Transformer

log = logging.getLogger(__name__)


class _Checkpoint:
    """Name → tensor over one or many safetensors files, checking shapes."""

    def __init__(self, model_dir: Path, dtype: torch.dtype, device: torch.device) -> None:
        files = sorted(model_dir.glob("*.safetensors"))
        if not files:
            raise ModelError(f"{model_dir}: no *.safetensors weights found")
        self.where: dict[str, Path] = {}
        for f in files:
            with safe_open(f, "pt") as st:
                for k in st.keys():
                    self.where[k] = f
        self.dtype, self.device = dtype, device
        self.used: set[str] = set()
        self._open: dict[Path, object] = {}

    def has(self, name: str) -> bool:
        return name in self.where

    def get(self, name: str, shape: tuple[int, ...]) -> torch.Tensor:
        if name not in self.where:
            raise ModelError(f"missing tensor {name!r} in the checkpoint")
        f = self.where[name]
        if f not in self._open:
            self._open[f] = safe_open(f, "pt")
        t = self._open[f].get_tensor(name)
        if tuple(t.shape) != tuple(shape):
            raise ModelError(f"tensor {name!r} has shape {tuple(t.shape)}, expected {tuple(shape)}")
        self.used.add(name)
        return t.to(device=self.device, dtype=self.dtype)

    def first(self, names: list[str], shape: tuple[int, ...]) -> torch.Tensor:
        """The first of several names the same tensor goes by in different checkpoints."""
        for n in names:
            if n in self.where:
                return self.get(n, shape)
        raise ModelError(f"missing tensor {names[0]!r} in the checkpoint")


def load_model(model_dir: str | Path, dtype: torch.dtype, device: torch.device | str = "cpu",
               max_positions: int | None = None) -> Transformer:
    model_dir = Path(model_dir)
    spec = ModelSpec.from_dir(model_dir)
    ck = _Checkpoint(model_dir, dtype, torch.device(device))
    s = spec
    h = s.hidden_size
    embed = ck.get("model.embed_tokens.weight", (s.vocab_size, h))
    layers = [_layer(ck, s, i) for i in range(s.num_layers)]
    norm = ck.get("model.norm.weight", (h,))
    if s.tie_word_embeddings and not ck.has("lm_head.weight"):
        lm_head = Linear(embed)  # panels or packed: a second copy, as the embedding lookup reads the plain one
    else:
        lm_head = Linear(ck.get("lm_head.weight", (s.vocab_size, h)))
    unused = sorted(k for k in set(ck.where) - ck.used if not k.endswith("rotary_emb.inv_freq"))
    if unused:
        log.warning("%s: %d tensors not used, e.g. %s", model_dir, len(unused), unused[:3])
    return Transformer(spec, embed, layers, norm, lm_head, max_positions or s.max_position_embeddings)


def _layer(ck: _Checkpoint, s: ModelSpec, i: int) -> Layer:
    p = f"model.layers.{i}."
    h, d = s.hidden_size, s.head_dim
    qkv = torch.cat([
        ck.get(p + "self_attn.q_proj.weight", (s.q_size, h)),
        ck.get(p + "self_attn.k_proj.weight", (s.kv_size, h)),
        ck.get(p + "self_attn.v_proj.weight", (s.kv_size, h)),
    ])
    qkv_bias = torch.cat([
        ck.get(p + "self_attn.q_proj.bias", (s.q_size,)),
        ck.get(p + "self_attn.k_proj.bias", (s.kv_size,)),
        ck.get(p + "self_attn.v_proj.bias", (s.kv_size,)),
    ]) if s.qkv_bias else None
    o_bias = ck.get(p + "self_attn.o_proj.bias", (h,)) if s.o_bias else None
    return Layer(
        input_norm=ck.get(p + "input_layernorm.weight", (h,)),
        qkv=Linear(qkv, qkv_bias),
        o=Linear(ck.get(p + "self_attn.o_proj.weight", (h, s.q_size)), o_bias),
        q_norm=ck.get(p + "self_attn.q_norm.weight", (d,)) if s.qk_norm else None,
        k_norm=ck.get(p + "self_attn.k_norm.weight", (d,)) if s.qk_norm else None,
        post_norm=ck.get(p + "post_attention_layernorm.weight", (h,)),
        mlp=_moe(ck, s, i) if s.is_moe_layer(i) else _dense(ck, p + "mlp.", h, s.intermediate_size),
    )


def _dense(ck: _Checkpoint, p: str, h: int, inter: int) -> DenseMLP:
    gate_up = torch.cat([ck.get(p + "gate_proj.weight", (inter, h)), ck.get(p + "up_proj.weight", (inter, h))])
    return DenseMLP(gate_up=Linear(gate_up), down=Linear(ck.get(p + "down_proj.weight", (h, inter))))


def _moe(ck: _Checkpoint, s: ModelSpec, i: int) -> MoE:
    h, e, inter = s.hidden_size, s.num_experts, s.moe_intermediate_size
    mixtral = s.family == "mixtral" and ck.has(f"model.layers.{i}.block_sparse_moe.gate.weight")
    p = f"model.layers.{i}." + ("block_sparse_moe." if mixtral else "mlp.")
    router = ck.get(p + "gate.weight", (e, h))
    if ck.has(p + "experts.gate_up_proj"):  # fused 3D layout (transformers >= 5 in memory)
        gate_up = ck.get(p + "experts.gate_up_proj", (e, 2 * inter, h))
        down = ck.get(p + "experts.down_proj", (e, h, inter))
    else:
        names = ("w1", "w3", "w2") if mixtral else ("gate_proj", "up_proj", "down_proj")
        gate_up = torch.stack([torch.cat([
            ck.get(f"{p}experts.{x}.{names[0]}.weight", (inter, h)),
            ck.get(f"{p}experts.{x}.{names[1]}.weight", (inter, h))]) for x in range(e)])
        down = torch.stack([ck.get(f"{p}experts.{x}.{names[2]}.weight", (h, inter)) for x in range(e)])
    moe = MoE(router=router, gate_up=gate_up, down=down)
    if s.shared_expert_intermediate_size:
        moe.shared = _dense(ck, p + "shared_expert.", h, s.shared_expert_intermediate_size)
        moe.shared_gate = ck.get(p + "shared_expert_gate.weight", (1, h))
    return moe


def read_generation_eos(model_dir: str | Path) -> tuple[int, ...]:
    """EOS ids from generation_config.json (chat models often add end-of-turn ids there)."""
    path = Path(model_dir) / "generation_config.json"
    if not path.is_file():
        return ()
    eos = json.loads(path.read_text()).get("eos_token_id")
    return tuple(eos) if isinstance(eos, list) else ((eos,) if eos is not None else ())
