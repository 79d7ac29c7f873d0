"""The GPU check: is the CUDA path correct, and how close to the machine's limits is it?

Runs on a bare GPU machine with Python 3.12 and whatever CUDA torch (and the
triton it ships with) is there, in well under 10 minutes:

1. the test suite's device-taking tests on CUDA (`pytest --device cuda`): the
   oracle (transformers + PEFT) for a dense and an MoE tiny model, paging,
   the cache engine with swapping, sampling, the GPU path's tests and the
   Triton kernels against their torch references (compiled, not interpreted);
2. the host tier: pinned at its size (to the page), and a device -> host -> device
   round trip of blocks through the mover's stream;
3. the device tier sized from a fraction of memory after the weights load;
4. decode throughput of a Llama-3-8B-shaped model (random bf16 weights) at
   batch 1 and 64, base model only and with 8 rank-16 adapters mixed, against
   the HBM-bandwidth and tensor-core rooflines (peaks measured in the same run);
5. host synchronisations in one decode step (forward alone, and the whole step
   with sampling), counted with the profiler.

It imports only what each part needs: a part whose package is missing (pytest,
transformers) is reported as not run, with the reason. pyzmq (the LoRA server
transport) is stubbed when absent; nothing here uses it.

    make gpu-check                                  # or:
    python benchmarks/gpu_check.py --out benchmarks/results/gpu_check

Needs the tiny test models under $LORASERVE_TEST_CACHE (default .cache/test-models:
tiny-llama and tiny-qwen3_moe, built on a CPU machine with `make test`).
Writes gpu_check.json and gpu_check.md (a short table) into --out.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import subprocess
import sys
import time
import types
import xml.etree.ElementTree as ET
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
if importlib.util.find_spec("zmq") is None:  # the LoRA server's transport, imported by the engine, unused here
    sys.modules["zmq"] = types.ModuleType("zmq")

HBM_SPEC = {"H200": 4.8e12, "H100": 3.35e12, "A100": 2.0e12}
"""Datasheet HBM bandwidth (bytes/s) by GPU name, beside the measured one."""
BF16_SPEC = {"H200": 989e12, "H100": 989e12, "A100": 312e12}
"""Datasheet dense bf16 tensor-core FLOP/s."""

PYTEST_ZMQ_STUB = "import sys, types, importlib.util\n" \
    "if importlib.util.find_spec('zmq') is None: sys.modules['zmq'] = types.ModuleType('zmq')\n" \
    "import pytest\nsys.exit(pytest.main(sys.argv[1:]))\n"
TESTS = ["tests/test_triton_kernels.py", "tests/test_gpu_path.py", "tests/test_oracle.py", "tests/test_paging.py",
         "tests/test_cache_engine.py", "tests/test_sampling.py"]
TEST_FILTER = "not demo and not mistral and not qwen2 and not mixtral and not never_imports_triton"
"""The tests of the two carried tiny models (llama, qwen3_moe): the others would be built there first;
and not the CPU path's own check (CI's), whose subprocess would need pyzmq."""


DEVICE = "cuda"
"""`--smoke` runs the throughput part on a CPU with a tiny shape: a check of this script, not of a GPU."""


def timed(fn, repeats: int, warmup: int = 3) -> float:
    """Mean seconds of fn() on the GPU, by CUDA events."""
    for _ in range(warmup):
        fn()
    if DEVICE == "cpu":
        t = time.perf_counter()
        for _ in range(repeats):
            fn()
        return (time.perf_counter() - t) / repeats
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    torch.cuda.synchronize()
    start.record()
    for _ in range(repeats):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / 1e3 / repeats


def machine() -> dict:
    props = torch.cuda.get_device_properties(0)
    try:
        import triton
        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    return {"gpu": props.name, "capability": list(torch.cuda.get_device_capability(0)),
            "memory_GiB": round(props.total_memory / 2**30, 1), "sms": props.multi_processor_count,
            "torch": torch.__version__, "cuda": torch.version.cuda, "triton": triton_version,
            "python": platform.python_version(), "host": platform.node()}


def peaks() -> dict:
    """Measured device-copy bandwidth (read + write) and bf16 matmul FLOP/s, with the datasheet's."""
    x = torch.empty(2 * 2**30, dtype=torch.uint8, device="cuda")
    y = torch.empty_like(x)
    copy_s = timed(lambda: y.copy_(x), 10)
    a = torch.randn(8192, 8192, dtype=torch.bfloat16, device="cuda")
    b = torch.randn(8192, 8192, dtype=torch.bfloat16, device="cuda")
    mm_s = timed(lambda: a @ b, 10)
    name = torch.cuda.get_device_properties(0).name
    spec = next((k for k in HBM_SPEC if k in name), None)
    return {"hbm_measured_Bps": 2 * 2**31 / copy_s, "bf16_measured_flops": 2 * 8192**3 / mm_s,
            "hbm_spec_Bps": HBM_SPEC.get(spec), "bf16_spec_flops": BF16_SPEC.get(spec)}


def run_tests(out: Path, timeout: int) -> dict:
    missing = [m for m in ("pytest", "transformers", "peft") if importlib.util.find_spec(m) is None]
    if missing:
        return {"ran": False, "why": f"not installed: {', '.join(missing)}"}
    xml = out / "gpu_tests.xml"
    cmd = [sys.executable, "-c", PYTEST_ZMQ_STUB, "-q", "-p", "no:cacheprovider", "--device", "cuda",
           "-k", TEST_FILTER, f"--junitxml={xml}", *TESTS]
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    env.pop("TRITON_INTERPRET", None)
    t = time.perf_counter()
    try:
        proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"ran": True, "timed_out": True, "seconds": timeout}
    result = {"ran": True, "exit_code": proc.returncode, "seconds": round(time.perf_counter() - t, 1),
              "tail": proc.stdout[-3000:] + proc.stderr[-2000:]}
    if xml.exists():
        suite = ET.parse(xml).getroot()
        suite = suite.find("testsuite") if suite.tag == "testsuites" else suite
        result.update({k: int(suite.get(k, 0)) for k in ("tests", "failures", "errors", "skipped")})
        result["failed"] = [f"{c.get('classname')}::{c.get('name')}" for c in suite.iter("testcase")
                            if c.find("failure") is not None or c.find("error") is not None]
    return result


def host_reserved() -> int | None:
    """Bytes torch's caching host allocator holds (None where this torch does not say)."""
    try:
        stats = torch.cuda.host_memory_stats()
    except (AttributeError, RuntimeError):
        return None
    return next((stats[k] for k in ("reserved_bytes.all.current", "reserved_bytes.current") if k in stats), None)


def host_tier() -> dict:
    """Pinned at its size, to the page (not the caching host allocator's power of two),
    and a round trip through the mover on its stream."""
    from loraserve.engine.tier_memory import TierMemory
    from loraserve.model.spec import ModelSpec

    spec = ModelSpec("LlamaForCausalLM", "llama", 1000, 512, 4, 8, 8, 64, 1024, 1e-5, 1e4, None, 2048, False,
                     False, False, False, None)
    before = host_reserved()
    memory = TierMemory(spec, 64, 16, torch.bfloat16, torch.device("cuda"), num_host_blocks=1500)  # 197 MB
    host = memory.tiers["host"]
    nbytes = host.numel() * host.element_size()
    after = host_reserved()
    result = {"host_bytes": nbytes, "pinned": bool(host.is_pinned()),
              "caching_host_allocator_grew_by": None if after is None or before is None else after - before}
    from loraserve.cache.mover import CopyJob
    from loraserve.engine.torch_mover import TorchMover

    dev = memory.tiers["device"]
    original = torch.randn(dev.shape, device="cuda").to(dev.dtype)
    dev.zero_()
    torch.cuda.synchronize()
    import loraserve.engine.tier_memory as tier_memory

    chunk, tier_memory.COPY_CHUNK_BYTES = tier_memory.COPY_CHUNK_BYTES, 3 * memory.block_bytes  # 20 blocks: 7 chunks
    mover = TorchMover(memory, read_adapter=None)
    try:
        src = list(range(0, 60, 3))
        # the blocks are written on the compute stream after a ~50 ms stall and the copy is asked for at
        # once: a mover that did not wait for the compute stream would copy zeros
        torch.cuda._sleep(100_000_000)
        dev.copy_(original)
        mover.submit(CopyJob(1, "device", "host", tuple(src), tuple(range(1400, 1420)), 0))
        mover.wait(1)
        original = original.cpu()
        out_ok = torch.equal(host[:, :, 1400:1420], original[:, :, src])
        mover.submit(CopyJob(2, "host", "device", tuple(range(1400, 1420)), tuple(range(20)), 0))
        mover.wait(2)
        back_ok = torch.equal(dev[:, :, :20].cpu(), original[:, :, src])
    finally:
        mover.close()
        tier_memory.COPY_CHUNK_BYTES = chunk
    result.update({"device_to_host_ok": out_ok, "host_to_device_ok": back_ok})
    return result


def device_tier() -> dict:
    """A fractional device tier is sized after the weights load, less the bank and a step."""
    from loraserve import LLM
    from loraserve.config import CacheConfig

    cache = Path(os.environ.get("LORASERVE_TEST_CACHE", ROOT / ".cache" / "test-models"))
    llm = LLM(str(cache / "tiny-llama" / "model"), device="cuda", cache=CacheConfig(device_fraction=0.05))
    tier = llm.engine.memory.tiers["device"]
    free_after = torch.cuda.mem_get_info()[0]
    return {"device_tier_bytes": tier.numel() * tier.element_size(), "free_after_bytes": free_after,
            "num_blocks": llm.engine.num_blocks}


# -- decode throughput against the rooflines --------------------------------------------------------------------

CONTEXT, RANK, NUM_ADAPTERS = 512, 16, 8
SYNC_CALLS = {"cudaStreamSynchronize", "cudaDeviceSynchronize", "cudaEventSynchronize", "cudaMemcpy",
              "aten::_local_scalar_dense"}
"""Profiler events that block the host on the GPU (a pageable copy shows as cudaMemcpy)."""


def llama8b_spec(tiny: bool = False):
    from loraserve.model.spec import ModelSpec

    if tiny:
        return ModelSpec("LlamaForCausalLM", "llama", 1000, 128, 2, 4, 2, 32, 256, 1e-5, 5e5, None, 8192,
                         False, False, False, False, None)
    return ModelSpec("LlamaForCausalLM", "llama", 128256, 4096, 32, 32, 8, 128, 14336, 1e-5, 5e5, None, 8192,
                     False, False, False, False, None)


def random_model(spec, dtype):
    """Random weights in the model's own structures."""
    from loraserve.model.linear import Linear
    from loraserve.model.transformer import DenseMLP, Layer, Transformer

    def w(*shape):
        return torch.randn(*shape, dtype=dtype, device=DEVICE) * 0.02

    def proj(*shape):
        return Linear(w(*shape))

    ones = torch.ones(spec.hidden_size, dtype=dtype, device=DEVICE)
    h, i = spec.hidden_size, spec.intermediate_size
    layers = [Layer(input_norm=ones, qkv=proj(spec.q_size + 2 * spec.kv_size, h), o=proj(h, spec.q_size),
                    q_norm=None, k_norm=None, post_norm=ones, mlp=DenseMLP(gate_up=proj(2 * i, h), down=proj(h, i)))
              for _ in range(spec.num_layers)]
    return Transformer(spec, w(spec.vocab_size, h), layers, ones, proj(spec.vocab_size, h), CONTEXT + 64)


def random_adapter(spec, dtype, i: int):
    """Rank-16 LoRA on every projection, in the engine's fused layout (`targets.out_edges`)."""
    from loraserve.lora.adapter import LoraAdapter
    from loraserve.model.targets import in_dim, layer_targets, out_dim

    weights = {}
    for layer in range(spec.num_layers):
        for t in layer_targets(spec, layer):
            a = torch.randn(in_dim(spec, t), t.width * RANK, dtype=dtype, device=DEVICE) * 0.01
            b = torch.randn(RANK, out_dim(spec, t), dtype=dtype, device=DEVICE) * 0.01
            weights[(layer, t)] = (a, b)
    return LoraAdapter(f"adapter{i}", f"a{i}", "", RANK, 2.0 * RANK, False, (), weights)


def lora_cost(adapter) -> tuple[int, int]:
    """(bytes read, FLOPs per row) of one adapter's deltas: A and B whole (the layout holds no zeros)."""
    elems = sum(a.numel() + b.numel() for a, b in adapter.weights.values())
    return elems * adapter.weights[next(iter(adapter.weights))][0].element_size(), 2 * elems


def decode_plan(batch: int, adapters: list[str | None], blocks_per_seq: int):
    from loraserve.engine.plan import ScheduledSeq, StepPlan
    from loraserve.sampling import SamplingParams

    greedy = SamplingParams(temperature=0.0, max_tokens=1)
    return StepPlan(seqs=[ScheduledSeq(f"r{i}", [10 + i], CONTEXT, list(range(i * blocks_per_seq,
                                                                                 (i + 1) * blocks_per_seq)),
                                       adapters[i % len(adapters)], greedy) for i in range(batch)])


def sync_counts(executor, plan) -> dict:
    """Blocking calls in one step: inside the model's forward, and in the whole step."""
    from torch.profiler import ProfilerActivity, profile, record_function

    model = executor.model
    forward = model.forward

    def marked(*args, **kwargs):
        with record_function("loraserve.forward"):
            return forward(*args, **kwargs)

    model.forward = marked
    try:
        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if DEVICE == "cuda" else [])
        with profile(activities=activities) as prof:
            executor.execute(plan)
    finally:
        del model.forward
    events = list(prof.events())
    span = next(e.time_range for e in events if e.name == "loraserve.forward")
    syncs = [e for e in events if e.name in SYNC_CALLS]
    inside = [e.name for e in syncs if span.start <= e.time_range.start <= span.end]
    return {"forward": len(inside), "forward_calls": sorted(set(inside)), "step": len(syncs),
            "step_calls": sorted({e.name for e in syncs})}


def throughput(limits: dict, steps: int, tiny: bool = False) -> list[dict]:
    from loraserve.engine.tier_memory import TierMemory
    from loraserve.engine.torch_executor import TorchExecutor
    from loraserve.lora.backend import LocalLoraBackend

    dtype, spec = torch.bfloat16, llama8b_spec(tiny)
    model = random_model(spec, dtype)
    adapters = [random_adapter(spec, dtype, i) for i in range(NUM_ADAPTERS)]
    backend = LocalLoraBackend(spec, NUM_ADAPTERS, dtype, model.device, {a.id: a for a in adapters}, read_blocks=None)
    for a in adapters:
        backend.slots.acquire(a.id)
        backend.bank.load(backend.slots.slot_of(a.id), a)
    blocks_per_seq = -(-(CONTEXT + 1) // 16)
    memory = TierMemory(spec, 64 * blocks_per_seq, 16, dtype, model.device)
    executor = TorchExecutor(model, memory, backend, seed=0)
    weight_bytes = sum(t.num_bytes for layer in model.layers
                       for t in (layer.qkv, layer.o, layer.mlp.gate_up, layer.mlp.down)) + model.lm_head.num_bytes
    matmul_flops = weight_bytes  # 2 FLOPs per bf16 weight (2 bytes) per row
    lora_bytes, lora_flops = lora_cost(adapters[0])
    hbm, tc = limits["hbm_measured_Bps"], limits["bf16_measured_flops"]
    rows = []
    for batch in (1, 64):
        for mix in ("base", "adapters"):
            ids = [None] if mix == "base" else [a.id for a in adapters]
            plan = decode_plan(batch, ids, blocks_per_seq)
            seconds = timed(lambda: executor.execute(plan), steps)
            distinct = 0 if mix == "base" else min(batch, NUM_ADAPTERS)
            moved = weight_bytes + batch * (CONTEXT + 1) * spec.kv_bytes_per_token(2) + distinct * lora_bytes
            flops = batch * (matmul_flops + 4 * (CONTEXT + 1) * spec.q_size * spec.num_layers
                             + (lora_flops if mix == "adapters" else 0))
            hbm_s, tc_s = moved / hbm, flops / tc
            rows.append({"batch": batch, "mix": mix, "step_ms": 1e3 * seconds, "tokens_per_s": batch / seconds,
                         "bytes_moved": moved, "flops": flops, "hbm_roofline_ms": 1e3 * hbm_s,
                         "tensor_core_roofline_ms": 1e3 * tc_s, "of_roofline": max(hbm_s, tc_s) / seconds,
                         "host_syncs": sync_counts(executor, plan)})
    return rows


def table(report: dict) -> str:
    m, lines = report["machine"], []
    lines.append(f"GPU check on {m['gpu']} (torch {m['torch']}, CUDA {m['cuda']}, triton {m['triton']})\n")
    t = report.get("tests", {})
    if t.get("ran"):
        lines.append(f"tests on CUDA: {t.get('tests', '?')} run, {t.get('failures', '?')} failed, "
                     f"{t.get('errors', '?')} errors ({t.get('seconds')} s) {t.get('failed') or ''}")
    else:
        lines.append(f"tests on CUDA: not run ({t.get('why')})")
    for part in ("host_tier", "device_tier", "peaks"):
        lines.append(f"{part}: {json.dumps(report.get(part))}")
    lines += ["", "| batch | adapters | step ms | tok/s | HBM roofline ms | TC roofline ms | of roofline | syncs in "
              "forward / step |", "|---|---|---|---|---|---|---|---|"]
    for r in report.get("throughput", []):
        s = r["host_syncs"]
        lines.append(f"| {r['batch']} | {r['mix']} | {r['step_ms']:.2f} | {r['tokens_per_s']:.0f} | "
                     f"{r['hbm_roofline_ms']:.2f} | {r['tensor_core_roofline_ms']:.2f} | {r['of_roofline']:.0%} | "
                     f"{s['forward']} / {s['step']} |")
    by = {(r["batch"], r["mix"]): r for r in report.get("throughput", [])}
    if (64, "base") in by:
        lines.append(f"\nbatch 64, adapters / base throughput: "
                     f"{by[(64, 'adapters')]['tokens_per_s'] / by[(64, 'base')]['tokens_per_s']:.0%}")
    return "\n".join(lines) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", ROOT / "benchmarks/results/gpu_check")))
    parser.add_argument("--skip-tests", action="store_true")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--test-timeout", type=int, default=300)
    parser.add_argument("--smoke", action="store_true", help="only the throughput part, tiny, on the CPU")
    args = parser.parse_args()
    if args.smoke:
        global DEVICE
        DEVICE = "cpu"
        report = {"machine": {"gpu": "cpu (smoke)", "torch": torch.__version__, "cuda": None, "triton": None},
                  "throughput": throughput({"hbm_measured_Bps": 1e10, "bf16_measured_flops": 1e11}, 2, tiny=True)}
        print(table(report))
        return 0
    if not torch.cuda.is_available():
        print("gpu_check: no CUDA device", file=sys.stderr)
        return 2
    args.out.mkdir(parents=True, exist_ok=True)
    report: dict = {"machine": machine(), "when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    parts = [("tests", lambda: {"ran": False, "why": "--skip-tests"} if args.skip_tests
              else run_tests(args.out, args.test_timeout)),
             ("host_tier", host_tier), ("device_tier", device_tier), ("peaks", peaks),
             ("throughput", lambda: throughput(report["peaks"], args.steps))]
    for name, part in parts:
        t = time.perf_counter()
        try:
            report[name] = part()
        except Exception as e:  # one broken part must not hide the others' figures
            report[name] = {"error": f"{type(e).__name__}: {e}"}
        print(f"gpu_check: {name} done in {time.perf_counter() - t:.1f} s", flush=True)
        (args.out / "gpu_check.json").write_text(json.dumps(report, indent=1, default=str))
    text = table(report) if isinstance(report.get("throughput"), list) else json.dumps(report, indent=1, default=str)
    (args.out / "gpu_check.md").write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
