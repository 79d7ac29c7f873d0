"""One decoder-only transformer for every supported family (gpt-fast spirit).

Legend for shape comments: T = tokens in the step, H = hidden size,
Hq/Hkv = query/KV heads, D = head dim, E = experts, K = experts per token,
I = (expert) intermediate size, V = vocab.

Weights are fused where inputs are shared (q|k|v, gate|up) so each step makes
fewer, larger matmuls, and kept in the checkpoint's [out, in] order (as
nn.Linear) inside a `Linear` (`model/linear.py`), which keeps each in the layout
its device multiplies fastest. LoRA enters
through a `LoraBackend` (`model/lora.py`): each adapted projection submits its
input before the base matmul and waits for the delta into its output after.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from loraserve.gpu.segments import group_ends
from loraserve.kernels import combine_rows, segmented_mm
from loraserve.model.attention import AttnMetadata, paged_attention
from loraserve.model.linear import Linear
from loraserve.model.lora import LoraBackend, Routing
from loraserve.model.ops import add_rms_norm, rms_norm, rope_, silu_mul
from loraserve.model.spec import ModelSpec
from loraserve.model.targets import Target


@dataclass
class DenseMLP:
    gate_up: Linear  # [2I, H]
    down: Linear  # [H, I]


@dataclass
class MoE:
    router: torch.Tensor  # [E, H]
    gate_up: torch.Tensor  # [E, 2I, H]
    down: torch.Tensor  # [E, H, I]
    shared: DenseMLP | None = None
    shared_gate: torch.Tensor | None = None  # [1, H]


@dataclass
class Layer:
    input_norm: torch.Tensor  # [H]
    qkv: Linear  # [Hq*D + 2*Hkv*D, H], with Qwen2's bias
    o: Linear  # [H, Hq*D]
    q_norm: torch.Tensor | None  # [D]
    k_norm: torch.Tensor | None
    post_norm: torch.Tensor  # [H]
    mlp: DenseMLP | MoE


def project(lora: LoraBackend | None, layer: int, target: Target, x: torch.Tensor, w: Linear) -> torch.Tensor:
    """w(x) plus the LoRA delta of (layer, target), if any."""
    handle = lora.submit(layer, target, x) if lora is not None else None
    y = w(x)
    if handle is not None:
        lora.wait(handle, y)
    return y


def rope_inv_freq(spec: ModelSpec) -> torch.Tensor:
    d = spec.head_dim
    inv = 1.0 / (spec.rope_theta ** (torch.arange(0, d, 2, dtype=torch.float64) / d))
    scaling = spec.rope_scaling or {}
    kind = scaling.get("rope_type", scaling.get("type"))
    if kind == "linear":
        inv = inv / scaling["factor"]
    elif kind == "llama3":
        factor = scaling["factor"]
        low, high = scaling.get("low_freq_factor", 1.0), scaling.get("high_freq_factor", 4.0)
        old_ctx = scaling["original_max_position_embeddings"]
        wavelen = 2 * math.pi / inv
        smooth = (old_ctx / wavelen - low) / (high - low)
        scaled = torch.where(wavelen > old_ctx / low, inv / factor, inv)
        mid = (wavelen <= old_ctx / low) & (wavelen >= old_ctx / high)
        inv = torch.where(mid, (1 - smooth) * inv / factor + smooth * inv, scaled)
    return inv.float()


class Transformer:
    def __init__(self, spec: ModelSpec, embed: torch.Tensor, layers: list[Layer],
                 norm: torch.Tensor, lm_head: Linear, max_positions: int) -> None:
        self.spec = spec
        self.embed = embed  # [V, H]
        self.layers = layers
        self.norm = norm
        self.lm_head = lm_head  # [V, H]; over the embedding itself when tied
        freqs = torch.outer(torch.arange(max_positions, dtype=torch.float32), rope_inv_freq(spec))
        self.cos = freqs.cos().to(embed.device)  # [P, D/2]
        self.sin = freqs.sin().to(embed.device)

    @property
    def dtype(self) -> torch.dtype:
        return self.embed.dtype

    @property
    def device(self) -> torch.device:
        return self.embed.device

    def forward(self, input_ids: torch.Tensor, meta: AttnMetadata, kv_cache: torch.Tensor,
                lora: LoraBackend | None, sample_rows: torch.Tensor) -> torch.Tensor:
        """input_ids: [T]; kv_cache: [L, 2, blocks, block_size, Hkv, D];
        sample_rows: [N] rows whose next-token logits are wanted. Returns [N, V] fp32 logits."""
        s = self.spec
        x = F.embedding(input_ids, self.embed)  # [T, H], the residual stream, added to in place
        cos, sin = self.cos[meta.positions], self.sin[meta.positions]  # [T, D/2]
        # each layer's residual add is fused with the norm after it: the next layer's, or the final one
        norms = [layer.input_norm for layer in self.layers[1:]] + [self.norm]
        h = add_rms_norm(x, None, self.layers[0].input_norm, s.rms_norm_eps)
        for i, layer in enumerate(self.layers):
            qkv = project(lora, i, Target.QKV, h, layer.qkv)  # [T, (Hq + 2Hkv) D]
            qk, v = qkv.split([s.q_size + s.kv_size, s.kv_size], dim=-1)
            qk = qk.view(-1, s.num_heads + s.num_kv_heads, s.head_dim)  # q heads, then k heads
            if layer.q_norm is not None:
                qk = torch.cat([rms_norm(qk[:, :s.num_heads], layer.q_norm, s.rms_norm_eps),
                                rms_norm(qk[:, s.num_heads:], layer.k_norm, s.rms_norm_eps)], dim=1)
            q, k = rope_(qk, cos, sin).split([s.num_heads, s.num_kv_heads], dim=1)
            v = v.view(-1, s.num_kv_heads, s.head_dim)
            attn = paged_attention(q, k, v, kv_cache[i], meta).view(-1, s.q_size)
            o = project(lora, i, Target.O, attn, layer.o)
            h = add_rms_norm(x, o, layer.post_norm, s.rms_norm_eps)
            y = self._moe(i, layer.mlp, h, lora) if isinstance(layer.mlp, MoE) else self._mlp(i, layer.mlp, h, lora)
            h = add_rms_norm(x, y, norms[i], s.rms_norm_eps)
        return self.lm_head(h[sample_rows]).float()

    def _mlp(self, i: int, mlp: DenseMLP, h: torch.Tensor, lora: LoraBackend | None,
             targets: tuple[Target, Target] = (Target.GATE_UP, Target.DOWN)) -> torch.Tensor:
        gate_up = project(lora, i, targets[0], h, mlp.gate_up)  # [T, 2I]
        return project(lora, i, targets[1], silu_mul(gate_up), mlp.down)

    def _moe(self, i: int, moe: MoE, h: torch.Tensor, lora: LoraBackend | None) -> torch.Tensor:
        s = self.spec
        num_tokens, k = h.shape[0], s.num_experts_per_tok
        probs = F.softmax(F.linear(h, moe.router).float(), dim=-1)  # [T, E]
        weights, experts = torch.topk(probs, k, dim=-1)  # [T, K]
        if s.norm_topk_prob:
            weights = weights / weights.sum(-1, keepdim=True)
        weights = weights.to(h.dtype)
        token = torch.arange(num_tokens, device=h.device).repeat_interleave(k)  # [T*K]
        order = torch.argsort(experts.flatten(), stable=True)  # (token, expert) pairs by expert
        routing = Routing(token[order], experts.flatten()[order], weights.flatten()[order])
        offs = group_ends(routing.expert, s.num_experts)
        xs = h[routing.token]  # [T*K, H]
        gate_up, _ = self._experts(lora, i, Target.EXPERTS_GATE_UP, xs, moe.gate_up, offs, routing)  # [T*K, 2I]
        y, combined = self._experts(lora, i, Target.EXPERTS_DOWN, silu_mul(gate_up), moe.down, offs, routing)
        out = combine_rows(y, routing.token, routing.weight, num_tokens)  # y: [T*K, H]
        if combined is not None:  # the LoRA deltas, combined over each token's experts by the backend
            token, delta = combined
            out.index_add_(0, token, delta.to(out.dtype))
        if moe.shared is not None:
            shared = self._mlp(i, moe.shared, h, lora, (Target.SHARED_GATE_UP, Target.SHARED_DOWN))
            if moe.shared_gate is not None:
                shared = torch.sigmoid(F.linear(h, moe.shared_gate)) * shared
            out = out + shared
        return out

    @staticmethod
    def _experts(lora: LoraBackend | None, i: int, target: Target, x: torch.Tensor, w: torch.Tensor,
                 offs: torch.Tensor, routing: Routing) -> tuple[torch.Tensor, tuple | None]:
        """Each row through its expert's weights ([E, out, in]) plus its LoRA delta; and the
        deltas the backend combined per token instead (see `LoraBackend.wait`), if it did."""
        handle = lora.submit(i, target, x, routing) if lora is not None else None
        y = segmented_mm(x, w.transpose(1, 2), offs)
        return y, (lora.wait(handle, y) if handle is not None else None)
