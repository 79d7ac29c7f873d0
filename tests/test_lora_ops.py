"""The batched LoRA kernels agree with the per-row loop they replace."""

from __future__ import annotations

import pytest
import torch

from loraserve.lora.ops import lora_delta, padded_lora_delta


def naive(x, a, b, counts):
    rows, start = [], 0
    for s, c in enumerate(counts):
        rows.append(x[start:start + c] @ a[s] @ b[s])
        start += c
    return torch.cat(rows)


@pytest.mark.parametrize("counts", [[4, 4, 4, 4], [0, 3, 1, 7], [5, 0, 0, 0], [1, 1, 0, 2]])
def test_segmented_and_padded_match_the_loop(counts):
    g = torch.Generator().manual_seed(sum(counts))
    x = torch.randn(sum(counts), 24, generator=g)
    a = torch.randn(len(counts), 24, 6, generator=g)
    b = torch.randn(len(counts), 6, 40, generator=g)
    expected = naive(x, a, b, counts)
    offs = torch.tensor(counts).cumsum(0).to(torch.int32)
    assert torch.allclose(lora_delta(x, a, b, offs), expected, atol=1e-5)
    pad = max(counts)
    index = None if all(c == pad for c in counts) else torch.tensor(
        [s * pad + i for s, c in enumerate(counts) for i in range(c)])
    assert torch.allclose(padded_lora_delta(x, a, b, pad, index), expected, atol=1e-5)
