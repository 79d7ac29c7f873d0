"""The batched kernels (LoRA deltas, the base-model matmul) agree with the plain forms they replace."""

from __future__ import annotations

import pytest
import torch

from loraserve.lora.ops import lora_delta, padded_lora_delta
from loraserve.model.transformer import SMALL_BATCH, linear


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


@pytest.mark.parametrize("rows", [1, 2, 7, SMALL_BATCH, SMALL_BATCH + 1, 300])
@pytest.mark.parametrize("with_bias", [False, True])
def test_linear_forms_match_f_linear(rows, with_bias):
    """Every branch of the base-model matmul (one row, the w @ x.T form, F.linear) computes x @ w.T + bias."""
    g = torch.Generator().manual_seed(rows)
    x, w = torch.randn(rows, 48, generator=g), torch.randn(80, 48, generator=g)
    bias = torch.randn(80, generator=g) if with_bias else None
    y = linear(x, w, bias)
    assert y.shape == (rows, 80) and y.is_contiguous()
    assert torch.allclose(y, torch.nn.functional.linear(x, w, bias), atol=1e-4)
