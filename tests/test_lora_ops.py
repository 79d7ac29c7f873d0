"""The batched kernels (LoRA deltas, the base-model matmul) agree with the plain forms they replace."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from loraserve.kernels import fused_delta, lora_delta, padded_lora_delta
from loraserve.lora import batch as lora_batch
from loraserve.lora.batch import LoraBatch
from loraserve.model import cpu_kernels
from loraserve.model import linear as linear_module
from loraserve.model.linear import PACK_BF16, SMALL_BATCH, Linear
from loraserve.model.targets import Target


def naive(x, a, b, counts, edges=None):
    rows, start = [], 0
    for s, c in enumerate(counts):
        rows.append(fused_delta(x[start:start + c], a[s], b[s], edges))
        start += c
    return torch.cat(rows)


def test_the_fused_layout_is_the_block_diagonal_product():
    """A fused projection's delta (`targets.out_edges`) equals x @ A @ B with B block-diagonal,
    the form it replaces: slice j of the output from A's j-th rank columns only."""
    g = torch.Generator().manual_seed(0)
    x, a, b = torch.randn(5, 24, generator=g), torch.randn(24, 3 * 4, generator=g), torch.randn(4, 40, generator=g)
    edges = (0, 16, 28, 40)
    block = torch.zeros(12, 40)
    for j in range(3):
        block[4 * j:4 * (j + 1), edges[j]:edges[j + 1]] = b[:, edges[j]:edges[j + 1]]
    assert torch.allclose(fused_delta(x, a, b, edges), x @ a @ block, atol=1e-5)


@pytest.mark.parametrize("edges", [None, (0, 16, 28, 40)])
@pytest.mark.parametrize("counts", [[4, 4, 4, 4], [0, 3, 1, 7], [5, 0, 0, 0], [1, 1, 0, 2]])
def test_segmented_and_padded_match_the_loop(counts, edges):
    g = torch.Generator().manual_seed(sum(counts))
    width = 1 if edges is None else len(edges) - 1
    x = torch.randn(sum(counts), 24, generator=g)
    a = torch.randn(len(counts), 24, width * 6, generator=g)
    b = torch.randn(len(counts), 6, 40, generator=g)
    expected = naive(x, a, b, counts, edges)
    offs = torch.tensor(counts).cumsum(0).to(torch.int32)
    assert torch.allclose(lora_delta(x, a, b, offs, edges=edges), expected, atol=1e-5)
    pad = max(counts)
    index = None if all(c == pad for c in counts) else torch.tensor(
        [s * pad + i for s, c in enumerate(counts) for i in range(c)])
    assert torch.allclose(padded_lora_delta(x, a, b, pad, index, edges=edges), expected, atol=1e-5)
    # the in-place forms add into what is there, in its dtype
    for dtype in (torch.float32, torch.bfloat16):
        start = torch.randn(expected.shape, generator=g).to(dtype)
        for fn in (lambda out: lora_delta(x, a, b, offs, out=out, edges=edges),
                   lambda out: padded_lora_delta(x, a, b, pad, index, out=out, edges=edges)):
            out = start.clone()
            assert fn(out) is out and out.dtype == dtype
            tol = 1e-5 if dtype == torch.float32 else 1e-2  # bf16 keeps ~3 significant digits
            assert torch.allclose(out.float(), start.float() + expected, atol=tol, rtol=tol)


@pytest.mark.parametrize("threads", [None, 1])
@pytest.mark.parametrize("counts", [[4, 9, 3, 0, 1], [1, 203, 2, 0, 66], [1, 64, 0, 0, 0], [64, 64, 0, 1, 0]])
@pytest.mark.parametrize("edges", [(0, 40), (0, 64, 80, 96), (0, 130, 167)])
def test_the_compiled_kernel_reads_each_group_at_its_own_rank(edges, counts, threads):
    """The CPU kernel over segments of 0-9 rows (a decode) or up to 203 (a prefill's, cut into
    tasks of 64 rows shared between threads, also unevenly and on one thread), groups of ranks
    8, 5, 0 and 3 in a bank of rank 8, and slices of widths that take every tile size (64, 16,
    4, one column): each group gets x @ A[:, its rank columns per slice] @ B[:its rank rows],
    added in place. What lies past a group's rank (here not zeros) is never read."""
    kernels = cpu_kernels.kernels()
    assert kernels is not None, "the CPU kernels build on every machine CI runs on"
    if threads is not None:
        before = torch.get_num_threads()
        torch.set_num_threads(threads)
    try:
        _check_the_compiled_kernel(kernels, edges, counts)
    finally:
        if threads is not None:
            torch.set_num_threads(before)


def _at_ranks(a, b, ranks, width):
    """fp32 copies of a bank's A [G, K, width R] and B [G, R, N] with what lies past each group's rank zeroed."""
    rank = b.shape[1]
    masked_a, masked_b = a.float().clone(), b.float().clone()
    for s, r in enumerate(ranks):
        masked_b[s, r:] = 0
        for j in range(width):
            masked_a[s, :, j * rank + r:(j + 1) * rank] = 0
    return masked_a, masked_b


def _check_the_compiled_kernel(kernels, edges, counts):
    g = torch.Generator().manual_seed(len(edges))
    width, rank, ranks = len(edges) - 1, 8, [8, 5, 0, 3, 8]
    x = torch.randn(sum(counts) + 2, 24, generator=g)  # two rows past the last segment: left alone
    a = torch.randn(len(counts), 24, width * rank, generator=g)
    b = torch.randn(len(counts), rank, edges[-1], generator=g)
    masked_a, masked_b = _at_ranks(a, b, ranks, width)
    expected = naive(x[:sum(counts)], masked_a, masked_b, counts, edges)
    out = torch.randn(x.shape[0], edges[-1], generator=g)
    start = out.clone()
    offs = torch.tensor(counts).cumsum(0).to(torch.int32)
    kernels.lora_segments(x, a, b, offs, torch.tensor(ranks, dtype=torch.int32), list(edges), out)
    assert torch.allclose(out[:sum(counts)], start[:sum(counts)] + expected, atol=1e-4)
    assert torch.equal(out[sum(counts):], start[sum(counts):])
    with pytest.raises(RuntimeError, match="out of range"):
        kernels.lora_segments(x, a, b, offs + 3, torch.tensor(ranks, dtype=torch.int32), list(edges), out)
    with pytest.raises(RuntimeError, match="out of range"):
        kernels.lora_segments(x, a, b, offs, torch.tensor([9, 0, 0, 0, 0], dtype=torch.int32), list(edges), out)
    with pytest.raises(RuntimeError, match="shapes do not match"):
        kernels.lora_segments(x, a, b, offs, torch.tensor(ranks, dtype=torch.int32), [0, edges[-1] - 1], out)
    # bf16 weights (--lora-dtype bfloat16) widen exactly: the sums of their fp32 values (to the last bits the
    # compiler's reordering of a sum may change), not those of the weights before rounding
    wide, narrow = torch.zeros_like(out), torch.zeros_like(out)
    kernels.lora_segments(x, a.bfloat16(), b.bfloat16(), offs, torch.tensor(ranks, dtype=torch.int32), list(edges),
                          narrow)
    kernels.lora_segments(x, a.bfloat16().float(), b.bfloat16().float(), offs, torch.tensor(ranks, dtype=torch.int32),
                          list(edges), wide)
    assert torch.allclose(narrow, wide, rtol=1e-6, atol=1e-5)
    assert (narrow - (out - start)).abs().max() > 100 * (narrow - wide).abs().max()
    with pytest.raises(RuntimeError, match="both float32 or both bfloat16"):
        kernels.lora_segments(x, a, b.bfloat16(), offs, torch.tensor(ranks, dtype=torch.int32), list(edges), out)
    # bf16 rows (a bf16 model's x and out) widen exactly too, and out is rounded once, after the fp32 update
    xb, ob = x.bfloat16(), start.bfloat16()
    wide = ob.float()
    kernels.lora_segments(xb.float(), a, b, offs, torch.tensor(ranks, dtype=torch.int32), list(edges), wide)
    kernels.lora_segments(xb, a, b, offs, torch.tensor(ranks, dtype=torch.int32), list(edges), ob)
    assert torch.equal(ob, wide.bfloat16()) and not torch.equal(ob, start.bfloat16())
    with pytest.raises(RuntimeError, match="x and out must be both float32 or both bfloat16"):
        kernels.lora_segments(xb, a, b, offs, torch.tensor(ranks, dtype=torch.int32), list(edges), out)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_compiled_kernel_gives_a_row_the_same_bits_in_any_tile(dtype):
    """SmolLM2's shapes at rank 16 (q|k|v: a 48-column shrink; gate|up: 32): a long segment's rows go
    8 at a time on AVX-512, the rest 4, 2 or 1 at a time. Each row gets its own x @ A @ B at its
    group's rank, and the same bits as when it is a segment of its own."""
    kernels = cpu_kernels.kernels()
    assert kernels is not None, "the CPU kernels build on every machine CI runs on"
    g = torch.Generator().manual_seed(16)
    counts, ranks = [20, 9, 64, 11], [16, 13, 16, 7]
    for edges in ((0, 64, 80, 96), (0, 96, 192)):
        width = len(edges) - 1
        x = torch.randn(sum(counts), 40, generator=g)
        a = torch.randn(len(counts), 40, width * 16, generator=g).to(dtype)
        b = torch.randn(len(counts), 16, edges[-1], generator=g).to(dtype)
        masked_a, masked_b = _at_ranks(a, b, ranks, width)
        out = torch.zeros(sum(counts), edges[-1])
        offs = torch.tensor(counts).cumsum(0).to(torch.int32)
        rk = torch.tensor(ranks, dtype=torch.int32)
        kernels.lora_segments(x, a, b, offs, rk, list(edges), out)
        assert torch.allclose(out, naive(x, masked_a, masked_b, counts, edges), atol=1e-3, rtol=1e-4)
        starts = [0] + offs.tolist()[:-1]
        for grp, start in enumerate(starts):
            for row in (start, start + 7, start + 8, start + counts[grp] - 1):
                alone = torch.zeros(1, edges[-1])
                one = torch.zeros(len(counts), dtype=torch.int32)
                one[grp:] = 1
                kernels.lora_segments(x[row:row + 1], a, b, one, rk, list(edges), alone)
                assert torch.equal(alone[0], out[row]), (edges, grp, row)


@pytest.mark.parametrize("weights", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("compiled", [True, False])
@pytest.mark.parametrize("counts, padded", [
    ([0, 0, 1, 1, 1, 0, 0, 0], True),     # a decode step on slots 2-4 of 8: only those take part
    ([0, 1, 0, 0, 0, 0, 0, 1], False),    # two rows seven slots apart: segmented
    ([0, 0, 0, 12, 1, 2, 0, 0], False),   # a prefill-heavy step: segmented
    ([3, 3, 0, 0, 0, 0, 0, 0], True),
    ([2, 8, 8, 0, 0, 0, 0, 0], True),     # ragged decode-sized segments: padded
    ([16, 512, 512, 0, 0, 0, 0, 0], False),  # a prefill beside a prefix-cache hit: segmented
    ([128, 128, 0, 0, 0, 0, 0, 0], True),  # even segments: padded, in place
    ([200, 200, 0, 0, 0, 0, 0, 0], False),  # even but long: segmented
])
def test_lora_batch_uses_only_the_slots_with_rows(monkeypatch, counts, padded, compiled, weights):
    """Base rows first, then adapter rows by slot: every row gets its own slot's delta, base rows
    none; through the compiled CPU kernel (segments of up to 16 rows) or torch's matmuls, from
    fp32 weights or bf16 ones (fp32 math: where bf16 is emulated, `bank.compute_dtype`)."""
    if not compiled:
        monkeypatch.setattr(lora_batch, "COMPILED_MAX_ROWS", 0)
    g = torch.Generator().manual_seed(len(counts) + sum(counts))
    num_base, slots, key, qkv = 2, len(counts), (0, Target.O), (0, Target.QKV)
    a = {key: torch.randn(slots, 16, 4, generator=g).to(weights)}
    b = {key: torch.randn(slots, 4, 12, generator=g).to(weights)}
    ranks = {key: torch.full((slots,), 4, dtype=torch.int32)}
    adapter = SimpleNamespace(weights={key: None})  # only the keys matter here
    edges = {key: [0, 12], qkv: [0, 12]}
    bank = SimpleNamespace(num_slots=slots, a=a, b=b, slots=[adapter] * slots, ranks=ranks, device=torch.device("cpu"),
                           dtype=weights, compute_dtype=torch.float32, edges=edges,
                           view=lambda k, s: (a[k][s], b[k][s], ranks[k][s], edges[k]))
    token_group = torch.tensor([0] * num_base + [s + 1 for s, c in enumerate(counts) for _ in range(c)])
    batch = LoraBatch(bank, counts, num_base, token_group)
    live = [s for s, c in enumerate(counts) if c]
    assert batch.slots == slice(live[0], live[-1] + 1) and batch.padded == padded
    x = torch.randn(num_base + sum(counts), 16, generator=g)
    out = torch.zeros(x.shape[0], 12)
    batch.add(*key, x, out)
    expected = torch.cat([torch.zeros(num_base, 12), naive(x[num_base:], a[key].float(), b[key].float(), counts)])
    assert torch.allclose(out, expected, atol=1e-5)
    # a target no adapter of the step has is skipped (its bank rows are zeros; here they are not, to tell)
    a[qkv], b[qkv], ranks[qkv] = a[key], b[key], ranks[key]
    batch.add(*qkv, x, out)
    assert torch.allclose(out, expected, atol=1e-5)


@pytest.mark.parametrize("rows", [1, 2, 7, SMALL_BATCH, SMALL_BATCH + 1, 300])
@pytest.mark.parametrize("with_bias", [False, True])
@pytest.mark.parametrize("transposed", [False, True])
def test_linear_forms_match_f_linear(monkeypatch, rows, with_bias, transposed):
    """Every branch of the base-model matmul (one row, the w @ x.T form of AVX2 CPUs, F.linear)
    computes x @ w.T + bias, whichever machine class runs the test."""
    monkeypatch.setattr(linear_module, "TRANSPOSED_FORM", transposed)
    g = torch.Generator().manual_seed(rows)
    x, w = torch.randn(rows, 48, generator=g), torch.randn(80, 48, generator=g)
    bias = torch.randn(80, generator=g) if with_bias else None
    y = Linear(w, bias)(x)
    assert y.shape == (rows, 80) and y.is_contiguous()
    assert torch.allclose(y, torch.nn.functional.linear(x, w, bias), atol=1e-4)


def bf16_form(w: torch.Tensor) -> str:
    """The form a bf16 weight takes: our panels where the CPU has bf16 dot products (and the kernels
    build), oneDNN's packed weight where it can reorder one (AVX-512, AVX-NE-CONVERT), else plain."""
    return "panels" if linear_module.can_take("panels", w) else "packed" if PACK_BF16 else "plain"


@pytest.mark.parametrize("rows", [0, 1, 5, 300])
def test_bf16_linear_matches_f_linear(rows):
    """bf16 weights take their fastest form (no extra copy); the product is F.linear's either way,
    up to the output's rounding to bf16."""
    g = torch.Generator().manual_seed(rows)
    x = torch.randn(rows, 64, generator=g).bfloat16()
    w, bias = torch.randn(96, 64, generator=g).bfloat16(), torch.randn(96, generator=g).bfloat16()
    lin = Linear(w, bias)
    assert lin.form == bf16_form(w) and lin.num_bytes == (96 * 64 + 96) * 2
    y = lin(x)
    ref = torch.nn.functional.linear(x.float(), w.float(), bias.float())
    assert y.dtype == torch.bfloat16 and y.shape == (rows, 96)
    assert torch.allclose(y.float(), ref, atol=0.1, rtol=0.02)  # bf16 output rounding
    assert Linear(w, bias, form="plain").form == "plain"


@pytest.mark.parametrize("form", linear_module.FORMS)
@pytest.mark.parametrize("rows", [0, 1, 3, 8, 13, 32, 300])
@pytest.mark.parametrize("with_bias", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_every_linear_form_computes_x_w_t(form, rows, with_bias, dtype):
    """Each form computes x @ w.T + bias where this machine can run it (out = 83: a last panel
    of 3 columns; in = 50), and is refused with a clear error where it cannot. bf16 products
    are exact in fp32, so a bf16 form is the fp32 sum of the bf16 values, rounded once."""
    g = torch.Generator().manual_seed(rows)
    x, w = torch.randn(rows, 50, generator=g).to(dtype), torch.randn(83, 50, generator=g).to(dtype)
    bias = torch.randn(83, generator=g).to(dtype) if with_bias else None
    if not linear_module.can_take(form, w):
        with pytest.raises(ValueError, match=form):
            Linear(w, bias, form=form)
        return
    y = Linear(w, bias, form=form)(x)
    assert y.shape == (rows, 83) and y.is_contiguous() and y.dtype == dtype
    ref = torch.nn.functional.linear(x.float(), w.float(), None if bias is None else bias.float())
    if dtype == torch.float32:
        assert torch.allclose(y, ref, atol=1e-4)
    else:  # within a bf16 rounding of the exact sum (oneDNN and MKL may round partial sums: a little more)
        assert torch.allclose(y.float(), ref, atol=0.05, rtol=0.01)


def test_bf16_panels_round_the_fp32_sum_once():
    """Where the CPU has bf16 dot products, a bf16 panel product is the fp32 sum of exact bf16
    products (in k order), rounded once to bf16: against that reference at most one bf16 step
    off (the sum's order differs), and mostly equal; an odd number of input features, which
    its pairs of k cannot take, is refused."""
    g = torch.Generator().manual_seed(1)
    x, w = torch.randn(20, 576, generator=g).bfloat16(), torch.randn(100, 576, generator=g).bfloat16()
    if not linear_module.can_take("panels", w):
        assert cpu_kernels.kernels() is None or not cpu_kernels.kernels().bf16_panels()
        return
    x[:5, 1::2] = 0  # pairs (x[k], 0): as 32 bits, a denormal float, which an fp32 op could flush to zero
    x[5:10, ::2] = 1e-30
    y = Linear(w, form="panels")(x)
    ref = (x.double() @ w.double().T).float().bfloat16()
    steps = (y.view(torch.int16).int() - ref.view(torch.int16).int()).abs()
    assert steps.max() <= 1 and (steps == 0).float().mean() > 0.95
    odd = torch.randn(8, 5).bfloat16()
    assert not linear_module.can_take("panels", odd)
    with pytest.raises(ValueError, match="panels"):
        Linear(odd, form="panels")


def test_fp32_takes_the_panels_on_avx512_with_the_kernels():
    """Which form `Linear` picks by itself: panels for fp32 where the CPU has AVX-512 and the
    kernels build, oneDNN's packed weight else on AVX-512, plain on AVX2 (its w @ x.T form)."""
    w = torch.randn(40, 24)
    avx512 = not linear_module.TRANSPOSED_FORM
    expected = ("panels" if cpu_kernels.kernels() is not None else "packed" if linear_module.can_take("packed", w)
                else "plain") if avx512 else "plain"
    assert Linear(w).form == expected
    assert Linear(w.bfloat16()).form == bf16_form(w.bfloat16())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_panel_rows_do_not_depend_on_the_batch(dtype):
    """The panel kernel sums each output over k in order, whatever tile or row block its row
    falls in (in = 1536: row blocks of 40 rows in fp32, 80 in bf16), so a row's result is the
    same bits alone or in a batch, and whichever thread computes it; non-contiguous rows (a
    slice of a wider tensor) read the same. bf16 where the CPU has bf16 dot products."""
    assert cpu_kernels.kernels() is not None  # built on this machine (it has a C++ compiler)
    g = torch.Generator().manual_seed(0)
    w, bias = torch.randn(200, 1536, generator=g).to(dtype), torch.randn(200, generator=g).to(dtype)
    if not linear_module.can_take("panels", w):
        assert dtype == torch.bfloat16 and not cpu_kernels.kernels().bf16_panels()
        return
    lin = Linear(w, bias, form="panels")
    wide = torch.randn(200, 1600, generator=g).to(dtype)
    x = wide[:, :1536]
    batch = lin(x)
    assert torch.equal(batch, lin(x.contiguous()))
    for i in (0, 7, 8, 39, 40, 41, 79, 80, 81, 199):
        assert torch.equal(batch[i:i + 1], lin(x[i:i + 1])), i
    ref = torch.nn.functional.linear(x.float(), w.float(), bias.float())
    assert torch.allclose(batch.float(), ref, atol=1e-3 if dtype == torch.float32 else 0.3, rtol=0.01)
    before = torch.get_num_threads()
    torch.set_num_threads(8)  # more threads than 4 tasks each (5 tasks of 3 panels): the row blocks are shared too
    try:
        assert torch.equal(lin(x), batch)
    finally:
        torch.set_num_threads(before)
