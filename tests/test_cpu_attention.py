"""The CPU decode kernel (`model/cpu_attention.py`) reads KV blocks in place and
attends as the reference and as the gather path it replaces."""

from __future__ import annotations

import pytest
import torch

from loraserve.gpu import reference as ref
from loraserve.model import cpu_attention
from loraserve.model.attention import build_metadata, paged_attention


@pytest.mark.parametrize("page, window, hq, hkv, lens", [
    (4, None, 4, 2, [1, 7, 1, 1]),    # decodes beside a chunked prefill: the decode group is not the identity
    (16, 6, 9, 3, [1, 7, 1, 1]),      # a sliding window shorter than some contexts; SmolLM2's 9 / 3 heads
    (1, 3, 2, 2, [1, 1, 1, 1]),       # an all-decode step (the identity group), one token per block
    (16, None, 8, 1, [1, 1, 1, 1]),   # multi-query
])
def test_decodes_read_blocks_in_place_as_the_reference(monkeypatch, page, window, hq, hkv, lens):
    assert cpu_attention.kernel() is not None  # built on this machine (it has a C++ compiler)
    calls = []
    kernel = cpu_attention.kernel()
    monkeypatch.setattr(cpu_attention, "kernel", lambda: lambda *a: calls.append(1) or kernel(*a))
    g = torch.Generator().manual_seed(page + hq)
    d, num_blocks = 16, 192 // page
    ctx = [5, 0, 9, 30]
    width = max(-(-(c + n) // page) for c, n in zip(ctx, lens))
    tables = [torch.randperm(num_blocks, generator=g)[:width].tolist() for _ in lens]
    meta = build_metadata(list(zip(tables, ctx, lens)), page, window, torch.device("cpu"))
    rows = [sum(lens[:i]) for i in range(len(lens))]
    q = torch.randn(sum(lens), hq, d, generator=g)
    k, v = torch.randn(sum(lens), hkv, d, generator=g), torch.randn(sum(lens), hkv, d, generator=g)
    kv = torch.randn(2, num_blocks, page, hkv, d, generator=g)

    out = paged_attention(q, k, v, kv.clone(), meta)
    assert calls == [1]
    written = kv.clone()
    written.view(2, -1, hkv, d)[0][meta.slot_mapping] = k
    written.view(2, -1, hkv, d)[1][meta.slot_mapping] = v
    expected = ref.paged_attention(q, written, rows, ctx, lens, tables, window)
    assert torch.allclose(out, expected, atol=1e-5)

    monkeypatch.setattr(cpu_attention, "available", lambda q, kv: False)
    gathered = paged_attention(q, k, v, kv.clone(), meta)
    assert torch.allclose(out, gathered, atol=1e-5) and calls == [1]


def test_other_dtypes_gather():
    """bf16 (and any non-float32 cache) takes the gather path."""
    q, kv = torch.zeros(1, 2, 16, dtype=torch.bfloat16), torch.zeros(2, 4, 4, 2, 16, dtype=torch.bfloat16)
    assert not cpu_attention.available(q, kv)
    assert cpu_attention.available(q.float(), kv.float())


def test_a_stale_build_lock_is_cleared_and_a_fresh_one_kept(monkeypatch, tmp_path):
    """A build killed midway leaves torch's lock file, on which every later build would
    wait forever: one older than STALE_LOCK_S goes; a fresh one (a build under way in
    another process) stays, for torch to wait on."""
    import os
    import time
    from types import SimpleNamespace

    import torch.utils.cpp_extension as ext

    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    monkeypatch.setattr(ext, "load_inline", lambda *a, **k: SimpleNamespace(paged_decode="the op"))
    lock = os.path.join(ext._get_build_directory(cpu_attention._name(), verbose=False), "lock")
    open(lock, "w").close()
    old = time.time() - cpu_attention.STALE_LOCK_S - 1
    os.utime(lock, (old, old))
    path = os.environ.get("PATH")
    assert cpu_attention._build() == "the op" and not os.path.exists(lock)
    assert os.environ.get("PATH") == path  # (ninja's directory only during the build)
    open(lock, "w").close()
    assert cpu_attention._build() == "the op" and os.path.exists(lock)
