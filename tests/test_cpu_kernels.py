"""The compiled CPU kernels (`model/cpu_kernels.py`): decode attention reads KV
blocks in place and attends as the reference and as the gather path it
replaces; the glue ops (`model/ops.py`) compute what torch's ops do."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from loraserve.gpu import reference as ref
from loraserve.model import cpu_kernels, ops
from loraserve.model.attention import build_metadata, paged_attention


@pytest.mark.parametrize("page, window, hq, hkv, lens, d", [
    (4, None, 4, 2, [1, 7, 1, 1], 16),    # decodes beside a chunked prefill: the decode group is not the identity
    (16, 6, 9, 3, [1, 7, 1, 1], 64),      # a sliding window shorter than some contexts; SmolLM2's heads
    (1, 3, 2, 2, [1, 1, 1, 1], 32),       # an all-decode step (the identity group), one token per block
    (16, None, 8, 1, [1, 1, 1, 1], 16),   # multi-query
    (4, None, 7, 1, [1, 1, 1, 1], 64),    # a group of 7 heads: passes of 4 and 3
    (8, None, 10, 2, [1, 7, 1, 1], 128),  # D = 128, groups of 5: passes of 2, 2 and 1
    (8, 5, 6, 2, [1, 1, 1, 1], 80),       # a head dimension that is not a multiple of 16
])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_decodes_read_blocks_in_place_as_the_reference(monkeypatch, page, window, hq, hkv, lens, d, dtype):
    """fp32 and bf16 caches (computed in fp32, the output rounded once to bf16), over head
    dimensions the kernel keeps in registers (16 to 128) and one it does not."""
    module = cpu_kernels.kernels()
    assert module is not None  # built on this machine (it has a C++ compiler)
    calls = []
    monkeypatch.setattr(cpu_kernels, "kernels", lambda: SimpleNamespace(
        paged_decode=lambda *a: calls.append(1) or module.paged_decode(*a), write_kv=module.write_kv))
    g = torch.Generator().manual_seed(page + hq)
    num_blocks = 192 // page
    ctx = [5, 0, 9, 30]
    width = max(-(-(c + n) // page) for c, n in zip(ctx, lens))
    tables = [torch.randperm(num_blocks, generator=g)[:width].tolist() for _ in lens]
    meta = build_metadata(list(zip(tables, ctx, lens)), page, window, torch.device("cpu"))
    rows = [sum(lens[:i]) for i in range(len(lens))]
    q = torch.randn(sum(lens), hq, d, generator=g).to(dtype)
    k, v = torch.randn(sum(lens), hkv, d, generator=g).to(dtype), torch.randn(sum(lens), hkv, d, generator=g).to(dtype)
    kv = torch.randn(2, num_blocks, page, hkv, d, generator=g).to(dtype)
    tol = 1e-5 if dtype == torch.float32 else 2e-2  # a bf16 output's rounding: values up to ~2, steps of 2^-7

    out = paged_attention(q, k, v, kv.clone(), meta)
    assert calls == [1]
    written = kv.clone()
    written.view(2, -1, hkv, d)[0][meta.slot_mapping] = k
    written.view(2, -1, hkv, d)[1][meta.slot_mapping] = v
    expected = ref.paged_attention(q.float(), written.float(), rows, ctx, lens, tables, window)
    assert out.dtype == dtype and torch.allclose(out.float(), expected, atol=tol)

    monkeypatch.setattr(cpu_kernels, "attention_available", lambda q, kv: False)
    gathered = paged_attention(q, k, v, kv.clone(), meta)
    assert torch.allclose(out.float(), gathered.float(), atol=2 * tol) and calls == [1]


def test_other_dtypes_gather():
    """fp32 and bf16 caches are read in place; fp16 (and a cache whose dtype is not q's) takes the gather path."""
    q, kv = torch.zeros(1, 2, 16, dtype=torch.bfloat16), torch.zeros(2, 4, 4, 2, 16, dtype=torch.bfloat16)
    assert cpu_kernels.attention_available(q, kv) and cpu_kernels.attention_available(q.float(), kv.float())
    assert not cpu_kernels.attention_available(q.half(), kv.half())
    assert not cpu_kernels.attention_available(q.float(), kv)


def test_a_stale_build_lock_is_cleared_and_a_fresh_one_kept(monkeypatch, tmp_path):
    """A build killed midway leaves torch's lock file, on which every later build would
    wait forever: one older than STALE_LOCK_S goes; a fresh one (a build under way in
    another process) stays, for torch to wait on."""
    import os
    import time
    import torch.utils.cpp_extension as ext

    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    monkeypatch.setattr(ext, "load_inline", lambda *a, **k: "the module")
    lock = os.path.join(ext._get_build_directory(cpu_kernels._name(), verbose=False), "lock")
    open(lock, "w").close()
    old = time.time() - cpu_kernels.STALE_LOCK_S - 1
    os.utime(lock, (old, old))
    path = os.environ.get("PATH")
    assert cpu_kernels._build() == "the module" and not os.path.exists(lock)
    assert os.environ.get("PATH") == path  # (ninja's directory only during the build)
    open(lock, "w").close()
    assert cpu_kernels._build() == "the module" and os.path.exists(lock)


def test_a_bad_block_table_is_refused_not_read():
    """Bounds are checked as the kernel walks the tables (no reductions over them first)."""
    module = cpu_kernels.kernels()
    q, kv = torch.zeros(2, 2, 16), torch.zeros(2, 4, 4, 2, 16)
    good = torch.tensor([[0, 1], [2, 3]])
    assert module.paged_decode(q, kv, good, torch.tensor([5, 8]), 0.25, 0).shape == (2, 2, 16)
    for tables, lens in ((torch.tensor([[0, 1], [2, 4]]), torch.tensor([5, 8])),  # block 4 of 4
                         (torch.tensor([[0, -1], [2, 3]]), torch.tensor([5, 8])),
                         (good, torch.tensor([0, 8])), (good, torch.tensor([5, 9]))):  # lengths past the table
        with pytest.raises(RuntimeError, match="out of range"):
            module.paged_decode(q, kv, tables, lens, 0.25, 0)
    with pytest.raises(RuntimeError, match="slot out of range"):
        module.write_kv(kv, torch.tensor([0, 32]), torch.zeros(2, 2, 16), torch.zeros(2, 2, 16))
    with pytest.raises(RuntimeError, match="one layer's"):  # no V half to write into
        module.write_kv(kv[:1], torch.tensor([0, 1]), torch.zeros(2, 2, 16), torch.zeros(2, 2, 16))
    with pytest.raises(RuntimeError, match="CPU tensors only"):  # a device pointer is never read as a host one
        module.add_rms_norm(torch.zeros(2, 16), None, torch.zeros(16, device="meta"), 1e-6)


def test_write_kv_puts_strided_rows_in_their_slots():
    g = torch.Generator().manual_seed(3)
    kv = torch.randn(2, 6, 4, 3, 8, generator=g)
    qkv = torch.randn(5, (4 + 3 + 3) * 8, generator=g)  # k and v are views into a step's q|k|v, as in the model
    k, v = qkv[:, 32:56].view(5, 3, 8), qkv[:, 56:].view(5, 3, 8)
    slots = torch.tensor([7, 0, 23, 12, 13])
    expected = kv.clone()
    expected.view(2, -1, 3, 8)[0].index_copy_(0, slots, k)
    expected.view(2, -1, 3, 8)[1].index_copy_(0, slots, v)
    cpu_kernels.kernels().write_kv(kv, slots, k, v)
    assert torch.equal(kv, expected)


@pytest.mark.parametrize("rows", [1, 3, 200])  # one decode, a few, a prefill spread over threads
def test_glue_ops_compute_what_torch_does(rows):
    assert cpu_kernels.fused_available(torch.zeros(1))
    g = torch.Generator().manual_seed(rows)
    h, heads, d, inter = 96, 5, 16, 40
    x, delta, w = torch.randn(rows, h, generator=g), torch.randn(rows, h, generator=g), torch.randn(h, generator=g)
    expected_x = x + delta
    expected = F.rms_norm(expected_x, (h,), w, 1e-6)
    out = ops.add_rms_norm(x, delta, w, 1e-6)
    assert torch.equal(x, expected_x)  # the residual stream, updated in place
    assert torch.allclose(out, expected, rtol=1e-5, atol=1e-6)
    assert torch.allclose(ops.add_rms_norm(x, None, w, 1e-6), F.rms_norm(x, (h,), w, 1e-6), rtol=1e-5, atol=1e-6)

    qkv = torch.randn(rows, (heads + 2) * d, generator=g)
    qk = qkv[:, :heads * d].view(rows, heads, d)  # a strided view, as the model's
    angles = torch.rand(rows, d // 2, generator=g) * 50
    cos, sin = angles.cos(), angles.sin()
    x1, x2 = qk.chunk(2, dim=-1)
    rotated = torch.cat((x1 * cos[:, None] - x2 * sin[:, None], x2 * cos[:, None] + x1 * sin[:, None]), dim=-1)
    untouched = qkv[:, heads * d:].clone()
    assert ops.rope_(qk, cos, sin) is qk
    assert torch.allclose(qk, rotated, atol=1e-6) and torch.equal(qkv[:, heads * d:], untouched)

    gate_up = torch.randn(rows, 2 * inter, generator=g) * 8
    gate_up[0, :3] = torch.tensor([-200.0, 200.0, 0.0])  # exp overflows for the first: silu is -0, not NaN
    expected = F.silu(gate_up[:, :inter]) * gate_up[:, inter:]
    assert torch.allclose(ops.silu_mul(gate_up), expected, rtol=1e-6, atol=1e-6)


def test_glue_kernels_in_bf16_round_as_torch_ops(monkeypatch):
    """bf16 keeps HF's roundings (norm in fp32, rounded, then scaled; silu rounded before the product)."""
    g = torch.Generator().manual_seed(7)
    rows, h, heads, d, inter = 5, 64, 3, 16, 24
    x, delta = torch.randn(rows, h, generator=g).bfloat16(), torch.randn(rows, h, generator=g).bfloat16()
    w = torch.randn(h, generator=g).bfloat16()
    qkv = torch.randn(rows, (heads + 2) * d, generator=g).bfloat16()
    angles = torch.rand(rows, d // 2, generator=g) * 50
    gate_up = (torch.randn(rows, 2 * inter, generator=g) * 4).bfloat16()

    def run():
        xs, q = x.clone(), qkv.clone()
        out = ops.add_rms_norm(xs, delta, w, 1e-5)
        ops.rope_(q[:, :heads * d].view(rows, heads, d), angles.cos(), angles.sin())
        return xs, out, q, ops.silu_mul(gate_up)

    assert cpu_kernels.fused_available(x)
    compiled = run()
    monkeypatch.setattr(cpu_kernels, "fused_available", lambda t: False)
    reference = run()
    assert all(c.dtype == torch.bfloat16 for c in compiled)
    assert torch.equal(compiled[0], reference[0])  # the residual add: one rounding, the same
    for c, r in zip(compiled[1:], reference[1:]):  # float32 sums in another order: at most one bf16 step apart
        assert torch.allclose(c.float(), r.float(), rtol=2 ** -7, atol=1e-6)
    assert (compiled[1] != reference[1]).float().mean() < 0.05


def test_other_dtypes_take_torch_ops():
    x = torch.randn(2, 32, dtype=torch.float16)
    assert not cpu_kernels.fused_available(x)
    w = torch.randn(32, dtype=torch.float16)
    before = x.clone()
    out = ops.add_rms_norm(x, before, w, 1e-5)
    assert torch.equal(x, before + before)
    assert torch.equal(out, w * F.rms_norm((before + before).float(), (32,), None, 1e-5).to(torch.float16))
