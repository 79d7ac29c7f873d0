"""Every refused adapter or model says why, naming the file, tensor or field."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from loraserve import LLM, SamplingParams
from loraserve.kernels import fused_delta
from loraserve.lora.adapter import AdapterError, content_hash, load_adapter
from loraserve.model.loader import load_model
from loraserve.model.spec import ModelError, ModelSpec
from loraserve.model.targets import Target, out_edges

WEIGHTS = "adapter_model.safetensors"


@pytest.fixture()
def adapter_copy(tiny, tmp_path):
    """A writable copy of the tiny llama's rank-8 adapter and the model's spec."""
    root = tiny("llama")
    dst = tmp_path / "ad"
    shutil.copytree(root / "adapters" / "r8", dst)
    return dst, ModelSpec.from_dir(root / "model")


def edit_weights(path, fn):
    tensors = load_file(path / WEIGHTS)
    fn(tensors)
    save_file(tensors, path / WEIGHTS)


def edit_config(path, **changes):
    cfg = json.loads((path / "adapter_config.json").read_text())
    cfg.update(changes)
    (path / "adapter_config.json").write_text(json.dumps(cfg))


def test_good_adapter_loads_with_its_rank(adapter_copy):
    path, spec = adapter_copy
    adapter = load_adapter(path, spec, max_rank=64)
    assert adapter.rank == 8
    a, b = adapter.weights[(0, "qkv")]
    assert a.shape == (64, 24) and b.shape == (8, 64 + 32 + 32)  # q|k|v: A side by side, B in their columns


def test_wrong_base_shapes(adapter_copy):
    path, spec = adapter_copy
    key = next(k for k in load_file(path / WEIGHTS) if "q_proj.lora_A" in k)
    edit_weights(path, lambda t: t.__setitem__(key, torch.zeros(8, 96)))
    with pytest.raises(AdapterError, match=r"q_proj has lora_A \(8, 96\).*wrong base model"):
        load_adapter(path, spec, max_rank=64)


def test_unknown_target_module(adapter_copy):
    path, spec = adapter_copy
    edit_config(path, target_modules=["q_proj", "lm_head"])
    with pytest.raises(AdapterError, match=r"unknown target modules \['lm_head'\]"):
        load_adapter(path, spec, max_rank=64)


def test_unknown_module_tensor(adapter_copy):
    path, spec = adapter_copy
    edit_weights(path, lambda t: t.update({
        "base_model.model.model.layers.0.mlp.act_fn.lora_A.weight": torch.zeros(8, 64),
        "base_model.model.model.layers.0.mlp.act_fn.lora_B.weight": torch.zeros(64, 8)}))
    with pytest.raises(AdapterError, match=r"unknown target module 'mlp.act_fn'"):
        load_adapter(path, spec, max_rank=64)


def test_rank_above_maximum(adapter_copy):
    path, spec = adapter_copy
    with pytest.raises(AdapterError, match="rank 8 of layer 0 .* exceeds max_lora_rank 4"):
        load_adapter(path, spec, max_rank=4)


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_nan_or_inf_weights(adapter_copy, bad):
    path, spec = adapter_copy
    key = next(k for k in load_file(path / WEIGHTS) if "layers.1.mlp.down_proj.lora_B" in k)
    edit_weights(path, lambda t: t[key].__setitem__((0, 0), bad))
    with pytest.raises(AdapterError, match="NaN or Inf in the weights of layer 1 mlp.down_proj"):
        load_adapter(path, spec, max_rank=64)


@pytest.mark.parametrize("missing", ["adapter_config.json", WEIGHTS])
def test_missing_files(adapter_copy, missing):
    path, spec = adapter_copy
    (path / missing).unlink()
    with pytest.raises(AdapterError, match=f"missing {missing}"):
        load_adapter(path, spec, max_rank=64)


def test_missing_directory(adapter_copy):
    _, spec = adapter_copy
    with pytest.raises(AdapterError, match="no such directory"):
        load_adapter("/nonexistent/adapter", spec, max_rank=64)


def test_dora_rejected(adapter_copy):
    path, spec = adapter_copy
    edit_config(path, use_dora=True)
    with pytest.raises(AdapterError, match="DoRA is not supported"):
        load_adapter(path, spec, max_rank=64)


def test_config_rank_must_match_the_tensors(adapter_copy):
    """PEFT refuses an adapter whose config says another rank than its tensors
    have; so do we (it used to load and behave as the tensors' rank)."""
    path, spec = adapter_copy
    edit_config(path, r=16)
    with pytest.raises(AdapterError, match=r"says rank 16 for model\.layers\.\d+\.\S+_proj, but its lora_A has "
                                           r"8 rows: rank 8"):
        load_adapter(path, spec, max_rank=64)
    edit_config(path, r=16, rank_pattern={"q_proj": 8, "k_proj": 8, "v_proj": 8, "o_proj": 8, "gate_proj": 8,
                                          "up_proj": 8, "down_proj": 8})
    assert load_adapter(path, spec, max_rank=64).rank == 8  # rank_pattern is honoured, as PEFT does


@pytest.mark.parametrize("name", ["../x", "x" * 257, 'quo"te', "new\nline", "sp ace", "a/../b", ".hidden", ""])
def test_adapter_names_outside_the_allowed_set(tiny, name):
    from loraserve.lora.registry import check_name

    with pytest.raises(AdapterError, match="is not allowed"):
        check_name(name)


@pytest.mark.parametrize("name", ["poet", "org/model-name", "sql_lora:v2", "a.b@c+d", "x" * 256])
def test_adapter_names_vllm_users_use(name):
    from loraserve.lora.registry import check_name

    check_name(name)


def test_identity_is_content_not_name(adapter_copy, tmp_path):
    path, _ = adapter_copy
    twin, other = tmp_path / "twin", tmp_path / "other"
    shutil.copytree(path, twin)
    shutil.copytree(path, other)
    assert content_hash(path) == content_hash(twin)
    edit_weights(twin, lambda t: next(v for k, v in t.items() if "lora_B" in k).add_(1e-3))
    assert content_hash(path) != content_hash(twin)
    edit_config(other, lora_alpha=99)  # the config is part of the identity too
    assert content_hash(path) != content_hash(other)


def test_same_bytes_under_two_names_is_one_adapter(tiny):
    root = tiny("llama")
    r8 = str(root / "adapters" / "r8")
    llm = LLM(str(root / "model"), dtype="float32", adapters={"a": r8, "b": r8})
    assert llm.engine.adapters.by_name["a"] is llm.engine.adapters.by_name["b"]
    sp = SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True)
    a, b = llm.generate([[3, 4, 5]] * 2, sp, adapter=["a", "b"])
    assert a.token_ids == b.token_ids


def test_per_expert_adapter_equals_fused_form(tiny, tmp_path):
    """Mixtral-era adapters (experts.{e}.w1 ...) load to the same weights as the
    PEFT target_parameters form they are rewritten from."""
    root = tiny("mixtral")
    spec = ModelSpec.from_dir(root / "model")
    fused_path = root / "adapters" / "r8"
    tensors = load_file(fused_path / WEIGHTS)
    num_experts, out = spec.num_experts, {}
    for key, t in tensors.items():
        if ".experts." not in key:
            out[key] = t
            continue
        if ".lora_B." in key:
            continue
        prefix = key.split(".experts.")[0].replace(".mlp", ".block_sparse_moe")
        b = tensors[key.replace("lora_A", "lora_B")]
        r = t.shape[0] // num_experts
        a3, b3 = t.reshape(num_experts, r, -1), b.reshape(b.shape[0], r, num_experts)
        if b.shape[0] == 2 * spec.moe_intermediate_size:  # gate_up: w1 = gate, w3 = up, sharing A
            names = [("w1", slice(0, spec.moe_intermediate_size)), ("w3", slice(spec.moe_intermediate_size, None))]
        else:
            names = [("w2", slice(None))]
        for e in range(num_experts):
            for name, rows in names:
                out[f"{prefix}.experts.{e}.{name}.lora_A.weight"] = a3[e].clone()
                out[f"{prefix}.experts.{e}.{name}.lora_B.weight"] = b3[rows, :, e].clone()
    per_expert = tmp_path / "per_expert"
    per_expert.mkdir()
    shutil.copy(fused_path / "adapter_config.json", per_expert)
    save_file(out, per_expert / WEIGHTS)
    fused = load_adapter(fused_path, spec, 64)
    split = load_adapter(per_expert, spec, 64)
    x = torch.randn(5, spec.hidden_size)
    for layer in range(spec.num_layers):
        (af, bf), (as_, bs) = fused.weights[(layer, "experts_gate_up")], split.weights[(layer, "experts_gate_up")]
        for e in range(num_experts):  # same delta, though split stores gate and up with separate A
            edges = out_edges(spec, Target.EXPERTS_GATE_UP)
            assert torch.allclose(fused_delta(x, af[e], bf[e], edges), fused_delta(x, as_[e], bs[e], edges), atol=1e-5)


# -- models ------------------------------------------------------------------

@pytest.fixture()
def model_copy(tiny, tmp_path):
    dst = tmp_path / "model"
    shutil.copytree(tiny("llama") / "model", dst)
    return dst


def test_unknown_architecture(model_copy):
    cfg = json.loads((model_copy / "config.json").read_text())
    cfg["architectures"] = ["GPT2LMHeadModel"]
    (model_copy / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ModelError, match=r"unsupported architecture \['GPT2LMHeadModel'\]; supported: "):
        load_model(model_copy, torch.float32)


def test_missing_tensor(model_copy):
    tensors = load_file(model_copy / "model.safetensors")
    del tensors["model.layers.1.self_attn.k_proj.weight"]
    save_file(tensors, model_copy / "model.safetensors")
    with pytest.raises(ModelError, match="missing tensor 'model.layers.1.self_attn.k_proj.weight'"):
        load_model(model_copy, torch.float32)


def test_shape_mismatch(model_copy):
    tensors = load_file(model_copy / "model.safetensors")
    tensors["model.layers.2.mlp.up_proj.weight"] = torch.zeros(100, 64)
    save_file(tensors, model_copy / "model.safetensors")
    with pytest.raises(ModelError, match=r"'model.layers.2.mlp.up_proj.weight' has shape \(100, 64\), expected \(128, 64\)"):
        load_model(model_copy, torch.float32)


def test_no_weights(model_copy):
    (model_copy / "model.safetensors").unlink()
    with pytest.raises(ModelError, match="no \\*.safetensors weights found"):
        load_model(model_copy, torch.float32)
