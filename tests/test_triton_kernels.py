"""The GPU path's own Triton kernels equal their torch references, run on the
CPU by Triton's interpreter (tiny shapes), and the model and engine give the
CPU path's results through them. On a CPU (the default) conftest sets
TRITON_INTERPRET=1 before triton loads; a GPU runs the same tests with
`--device cuda`, compiled."""

from __future__ import annotations

import os

import pytest
import torch

import loraserve.gpu
from loraserve.gpu import reference as ref
from loraserve.gpu.attention_kernels import decode_attention, prefill_attention
from loraserve.gpu.experts import experts_mm
from loraserve.gpu.lora_kernels import expand_add, segment_mm
from loraserve.gpu.paged import build_paged
from loraserve.gpu.segments import Tiles, device_tiles, group_bounds, group_ends, host_tiles
from loraserve.model.attention import flatten


def i32(values, device):
    return torch.tensor(values, dtype=torch.int32, device=device)


@pytest.mark.parametrize("page, window", [(4, None), (4, 6), (16, None), (1, 3)])
def test_paged_attention_reads_blocks_in_place(device, page, window):
    """Decodes and chunked prefills (GQA, blocks in any order, some sequences
    starting mid-cache) equal the gather-then-attend reference."""
    g = torch.Generator().manual_seed(page)
    hq, hkv, d, num_blocks = 4, 2, 16, 80 // page
    kv = torch.randn(2, num_blocks, page, hkv, d, generator=g)
    ctx, lens = [5, 0, 9, 3, 0], [1, 7, 1, 20, 1]
    rows = [sum(lens[:i]) for i in range(len(lens))]
    width = max(-(-(c + n) // page) for c, n in zip(ctx, lens))
    tables = [torch.randperm(num_blocks, generator=g)[:width].tolist() for _ in lens]
    q = torch.randn(sum(lens), hq, d, generator=g)
    expected = ref.paged_attention(q, kv, rows, ctx, lens, tables, window)
    out = torch.full_like(q, float("nan"), device=device)
    qd, kvd = q.to(device), kv.to(device)
    rows_t, ctx_t, lens_t, tab = i32(rows, device), i32(ctx, device), i32(lens, device), i32(tables, device)
    decode_attention(qd, kvd, out, i32([0, 2, 4], device), rows_t, ctx_t, tab, window, max(ctx) + 1)
    prefill_attention(qd, kvd, out, i32([1, 3], device), rows_t, ctx_t, lens_t, tab, max(lens), window)
    assert torch.allclose(out.cpu(), expected, atol=1e-5)


@pytest.mark.parametrize("window", [None, 100])
def test_long_decodes_split_their_keys_and_combine(device, window):
    """Flash-decoding: 150 and 70 keys in three splits of 64 keys (the second
    sequence's last split empty, and under the window the first's first split
    partly masked), combined from the partial softmax states: the one-pass result."""
    g = torch.Generator().manual_seed(7)
    page, num_blocks = 4, 90
    kv = torch.randn(2, num_blocks, page, 2, 16, generator=g)
    q = torch.randn(2, 4, 16, generator=g)
    ctx, tables = [149, 69], [torch.randperm(num_blocks, generator=g)[:44].tolist() for _ in range(2)]
    expected = ref.paged_attention(q, kv, [0, 1], ctx, [1, 1], tables, window)
    args = (i32([0, 1], device), i32([0, 1], device), i32(ctx, device), i32(tables, device), window, 150)
    for splits in (3, 1):
        out = torch.zeros(2, 4, 16, device=device)
        decode_attention(q.to(device), kv.to(device), out, *args, splits=splits)
        assert torch.allclose(out.cpu(), expected, atol=1e-5), splits


def test_step_tables_attend_as_the_reference(device):
    """build_paged's tables (one upload) drive both kernels: positions, slot mapping and output as the reference."""
    g = torch.Generator().manual_seed(1)
    page, num_blocks = 4, 16
    seqs = [([3, 1], 5, 1), ([7, 0, 2], 0, 9), ([4], 2, 1)]
    kv = torch.randn(2, num_blocks, page, 2, 16, generator=g)
    q = torch.randn(11, 4, 16, generator=g)
    pos, slots, step = build_paged(seqs, flatten(seqs, page), page, None, device)
    assert pos.tolist() == [5, *range(9), 2] and slots.dtype == torch.int64
    assert slots.tolist() == [1 * 4 + 1, *(b * 4 + o for b in (7, 0, 2) for o in range(4))][:10] + [4 * 4 + 2]
    expected = ref.paged_attention(q, kv, [0, 1, 10], [5, 0, 2], [1, 9, 1], [s[0] for s in seqs], None)
    assert torch.allclose(step.attend(q.to(device), kv.to(device)).cpu(), expected, atol=1e-5)


STARTS, ENDS, INDEX = [0, 3, 3, 20], [3, 3, 20, 30], [4, 0, 2, 1]
"""Four groups of 3, 0, 17 and 10 rows (one spanning two tiles), in any bank order."""


def tiles_of(kind: str, device) -> Tiles:
    """The groups' row tiles, built on the host (as for a step's adapters) or on
    the device (as for routed rows)."""
    if kind == "host":
        return Tiles(*(i32(t, device) for t in host_tiles([e - s for s, e in zip(STARTS, ENDS)])))
    tiles = device_tiles(i32(STARTS, device), i32(ENDS, device), 30)
    assert tiles.size == 2 + 4 and sorted(tiles.group.tolist()) == [-1, -1, 0, 2, 2, 3]  # empty group: no tile
    return tiles


def test_host_and_device_tiles_agree(device):
    host, dev = tiles_of("host", device), tiles_of("device", device)
    real = dev.group >= 0
    assert dev.group[real].tolist() == host.group.tolist() and dev.first[real].tolist() == host.first.tolist()
    assert host.first.tolist() == [0, 3, 19, 20] and host.ends.tolist() == ENDS


@pytest.mark.parametrize("kind, split_k", [("host", 1), ("device", 1), ("device", 3)])
def test_segment_mm_multiplies_each_group_by_its_own_matrix(device, kind, split_k):
    """Groups in any bank order, an empty one, and a per-group column count (an
    adapter's own rank); the inner dimension in one pass or split three ways."""
    g = torch.Generator().manual_seed(2)
    x, w = torch.randn(30, 72, generator=g), torch.randn(5, 72, 40, generator=g)
    cols = torch.tensor([40, 33, 17, 0, 40], dtype=torch.int32)  # by bank row
    y = segment_mm(x.to(device), w.to(device), tiles_of(kind, device), i32(INDEX, device), (cols.to(device), 5),
                   split_k=split_k)
    expected = ref.segment_mm(x, w, STARTS, ENDS, INDEX, [int(cols[i]) for i in INDEX])
    assert torch.allclose(y.cpu(), expected, atol=1e-4)
    assert y[20:, 33:].abs().sum() == 0  # past group 3's columns: left as they were


def test_expand_uses_each_slices_own_rank_rows(device):
    """A fused q|k|v expand in the layout of `targets.out_edges`: each output slice gets its
    own shrink columns (slice j's from j * slice_cols) times B's rows of the group's rank; what
    lies past a group's rank, in B or in the shrink, is never read (NaN here to prove it)."""
    g = torch.Generator().manual_seed(3)
    c = 4
    shrunk = torch.randn(30, 3 * c, generator=g)
    b = torch.randn(5, c, 50, generator=g)
    units = [[(0, 4)] * 3, [(0, 3)] * 3, [(0, 2)] * 3, [(0, 0)] * 3, [(0, 4)] * 3]
    bounds = [20, 35]
    for i, unit in enumerate(units):
        b[i, unit[0][1]:] = float("nan")
    for start, end, i in zip(STARTS, ENDS, INDEX):
        for j in range(3):
            shrunk[start:end, j * c + units[i][j][1]:(j + 1) * c] = float("nan")
    table = i32([[v for u in unit for v in u] + [2 * c + unit[0][1]] for unit in units], device)
    out = torch.randn(30, 50, generator=g)
    expected = ref.expand_add(shrunk.nan_to_num(0.0), b.nan_to_num(0.0), out, STARTS, ENDS, INDEX,
                              [units[i] for i in INDEX], bounds, c)
    got = out.to(device)
    expand_add(shrunk.to(device), b.to(device), got, tiles_of("device", device), i32(INDEX, device), table, 100,
               tuple(bounds), c)
    assert torch.allclose(got.cpu(), expected, atol=1e-4)


def test_experts_mm_and_device_offsets(device):
    """The MoE experts' matmul from device offsets (no bincount) equals a loop over experts."""
    g = torch.Generator().manual_seed(4)
    experts = torch.tensor([0, 0, 2, 2, 2, 3, 5, 5])
    offs = group_ends(experts.to(device), 6)
    assert offs.tolist() == torch.bincount(experts, minlength=6).cumsum(0).tolist()
    starts, ends = group_bounds(experts.to(device), 6)
    assert starts.tolist() == [0, 2, 2, 5, 6, 6] and ends.tolist() == offs.tolist()
    x, w = torch.randn(8, 16, generator=g), torch.randn(6, 20, 16, generator=g)
    y = experts_mm(x.to(device), w.to(device).transpose(1, 2), offs)
    expected = torch.stack([w[e] @ x[i] for i, e in enumerate(experts.tolist())])
    assert torch.allclose(y.cpu(), expected, atol=1e-4)


@pytest.mark.parametrize("family", ["llama", "mixtral"])
def test_the_model_gives_the_same_logits_through_the_triton_path(tiny, device, family, monkeypatch):
    """Paged attention, per-rank LoRA (dense and per-expert) and the experts' matmul,
    all through the Triton kernels: the torch path's logits, a mixed batch of two
    adapters of different ranks, base rows, a prefill and decodes."""
    from loraserve.lora.adapter import load_adapter
    from loraserve.lora.backend import LocalLoraBackend
    from loraserve.model.attention import build_metadata
    from loraserve.model.loader import load_model

    root = tiny(family)
    model = load_model(root / "model", torch.float32, device)
    spec = model.spec
    adapters = {n: load_adapter(root / "adapters" / n, spec, 64) for n in ("r4", "r16")}
    seqs = [(None, [0, 1], 5, 1), ("r4", [2], 3, 1), ("r16", [3, 4, 5], 0, 9), ("r4", [6, 7], 4, 3)]
    ids = torch.tensor([3, 14, 15, 92, 65, 35, 89, 79, 32, 38, 46, 26, 43, 38], device=device)
    kv0 = torch.randn(spec.num_layers, 2, 8, 4, spec.num_kv_heads, spec.head_dim,
                      generator=torch.Generator().manual_seed(5)).to(device)
    logits = {}
    for path in ("torch", "triton"):
        monkeypatch.setattr(loraserve.gpu, "FORCE", path == "triton")
        backend = LocalLoraBackend(spec, 3, torch.float32, model.device, {a.id: a for a in adapters.values()},
                                   read_blocks=None)
        for name in ("r16", "r4"):  # slots 0 and 1, the ranks apart
            backend.slots.acquire(adapters[name].id)
            backend.bank.load(backend.slots.slot_of(adapters[name].id), adapters[name])
        order = backend.begin([None if a is None else adapters[a].id for a, *_ in seqs], [s[3] for s in seqs], [])
        ordered = [seqs[i] for i in order]
        starts = torch.tensor([0, *torch.tensor([s[3] for s in seqs]).cumsum(0).tolist()])
        rows = torch.cat([torch.arange(starts[i], starts[i + 1]) for i in order]).to(device)
        meta = build_metadata([(b, c, n) for _, b, c, n in ordered], 4, spec.sliding_window, model.device)
        kv = kv0.clone()
        sample = torch.tensor([0, 1, 10, 13], device=device)
        with torch.inference_mode():
            logits[path] = (model.forward(ids[rows], meta, kv, backend, sample).cpu(), kv.cpu())
    assert torch.allclose(logits["triton"][0], logits["torch"][0], atol=1e-4)
    assert torch.allclose(logits["triton"][1], logits["torch"][1], atol=1e-4)  # the same KV written


def test_the_engine_generates_the_same_tokens_through_the_triton_path(tiny, device, monkeypatch):
    """Prefill, decode, adapters in and out of slots: the whole engine on the Triton path."""
    from loraserve import LLM, SamplingParams

    root = tiny("qwen3_moe")
    prompts = [list(range(10, 17)), list(range(40, 45)), [5, 9, 13]]
    sp = SamplingParams(max_tokens=5, temperature=0.0, ignore_eos=True)
    tokens = {}
    for path in ("torch", "triton"):
        monkeypatch.setattr(loraserve.gpu, "FORCE", path == "triton")
        llm = LLM(str(root / "model"), dtype="float32", device=str(device),
                  adapters={n: str(root / "adapters" / n) for n in ("r4", "r8")})
        tokens[path] = [o.token_ids for o in llm.generate(prompts, sp, adapter=["r8", None, "r4"])]
    assert tokens["triton"] == tokens["torch"]


def test_the_cpu_path_never_imports_triton(tiny):
    import subprocess
    import sys

    root = tiny("qwen3_moe")
    code = ("import sys, torch\n"
            "from loraserve import LLM, SamplingParams\n"
            f"llm = LLM({str(root / 'model')!r}, adapters={{'r8': {str(root / 'adapters' / 'r8')!r}}})\n"
            "llm.generate([[1, 2, 3]], SamplingParams(max_tokens=2), adapter='r8')\n"
            "assert 'triton' not in sys.modules, 'the CPU path imported triton'\n")
    env = {k: v for k, v in os.environ.items() if k not in ("LORASERVE_KERNELS",)}
    subprocess.run([sys.executable, "-c", code], check=True, timeout=300, env=env)


def test_half_precision_inputs_accumulate_in_fp32(device):
    """fp16 operands (16-bit like the GPU's bf16, which Triton's interpreter
    cannot multiply: its tl.dot on bf16 returns garbage, on a GPU it is fine)
    give the fp32 references within fp16 rounding."""
    g = torch.Generator().manual_seed(6)
    half = torch.float16
    kv = torch.randn(2, 12, 4, 2, 16, generator=g)
    q = torch.randn(9, 4, 16, generator=g)
    rows, ctx, lens, tables = [0, 1], [6, 3], [1, 8], [[5, 1, 7], [2, 9, 0]]
    out = torch.zeros(9, 4, 16, dtype=half, device=device)
    qd, kvd = q.to(device, half), kv.to(device, half)
    rows_t, ctx_t, lens_t, tab = i32(rows, device), i32(ctx, device), i32(lens, device), i32(tables, device)
    decode_attention(qd, kvd, out, i32([0], device), rows_t, ctx_t, tab, None, 7)
    prefill_attention(qd, kvd, out, i32([1], device), rows_t, ctx_t, lens_t, tab, 8, None)
    expected = ref.paged_attention(q.to(half).float(), kv.to(half).float(), rows, ctx, lens, tables, None)
    assert torch.allclose(out.cpu().float(), expected, atol=3e-3)
    x, w = torch.randn(30, 24, generator=g), torch.randn(5, 24, 40, generator=g)
    y = segment_mm(x.to(device, half), w.to(device, half), tiles_of("host", device), i32(INDEX, device))
    expected = ref.segment_mm(x.to(half).float(), w.to(half).float(), STARTS, ENDS, INDEX, [40] * 4)
    assert y.dtype == half and torch.allclose(y.cpu().float(), expected, atol=2e-2, rtol=1e-2)
