"""Output tokens/s of loraserve against transformers + PEFT, side by side in one run.

Workload (issue #2): 32 requests over 8 rank-16 adapters (round robin), 128-token
prompts, 64 greedy output tokens each, on the SmolLM2 demo model and the tiny
dense and MoE models, in fp32 and bf16. Also: loraserve with no adapters on the
same batch (LoRA overhead), single-request decode against the memory-bandwidth
roofline, and this machine's measured bandwidth and matmul FLOP/s. In float32,
loraserve also runs the mixed batch with its adapters stored in bf16
(`--lora-dtype bfloat16`: half the adapter bytes, fp32 math). Each system
is timed warm: it first runs the whole batch for a few tokens on other prompts
(`WARMUP_TOKENS`). Systems alternate within each repeat, and each repeat starts
one system later.

    python benchmarks/throughput.py                     # everything, 2 alternating repeats
    python benchmarks/throughput.py --models smollm2 --dtypes float32 --repeats 3
    VLLM_PYTHON=VENV/bin/python python benchmarks/throughput.py --models smollm2   # with the vLLM CPU build too

With VLLM_PYTHON (vLLM's own virtualenv, PEERS.md) each model and dtype also runs
the workload on the vLLM CPU build (`benchmarks/vllm_throughput.py`), once per row.

Results go to benchmarks/results/throughput.json and print as a markdown table.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from loraserve import LLM, SamplingParams  # noqa: E402
from loraserve.demo import build_demo, build_tiny, make_adapter  # noqa: E402
from loraserve.dtypes import NATIVE_BF16_FLAGS, cpu_flags, cpu_model, resolve_dtype  # noqa: E402

CACHE = ROOT / ".cache" / "bench"
NUM_REQUESTS, NUM_ADAPTERS, RANK, PROMPT_LEN, OUTPUT_LEN = 32, 8, 16, 128, 64
ALL_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def read_bandwidth() -> float:
    """Bytes/s of a plain sum over 256 MiB (more than any cache here)."""
    x = torch.ones(64 * 2**20)
    x.sum()
    t = time.perf_counter()
    for _ in range(10):
        x.sum()
    return 10 * x.numel() * 4 / (time.perf_counter() - t)


def machine_limits() -> dict:
    bandwidth = read_bandwidth()
    flops = {}
    for dt in (torch.float32, torch.bfloat16):
        a, b = torch.randn(2048, 2048, dtype=dt), torch.randn(2048, 2048, dtype=dt)
        a @ b.t()  # the operand order with a fast bf16 kernel on this CPU (see model/loader.py)
        t = time.perf_counter()
        for _ in range(3):
            a @ b.t()
        flops[str(dt).split(".")[1]] = 3 * 2 * 2048**3 / (time.perf_counter() - t)
    flags = sorted(f for f in cpu_flags() if f in ("avx2", "avx512f", "avx512_fp16", *NATIVE_BF16_FLAGS))
    return {"memory_read_GBps": bandwidth / 1e9, "matmul_GFLOPs": {k: v / 1e9 for k, v in flops.items()},
            "cpu_flags": flags, "cpu_model": cpu_model(), "dtype_auto": resolve_dtype("auto", "cpu"),
            "machine_class": machine_class()}


def machine_class() -> str:
    """The README's name for this CPU: what its vector units are and whether bf16 is native."""
    if resolve_dtype("auto", "cpu") == "bfloat16":
        return "AVX-512, native bf16"
    return ("AVX-512" if "avx512f" in cpu_flags() else "AVX2-only") + ", bf16 emulated"


def prepare(model: str) -> tuple[Path, dict[str, str]]:
    """Model dir and 8 rank-16 adapters (MoE: attention only, so PEFT can batch them)."""
    if model == "smollm2":
        model_dir = build_demo(CACHE / "smollm2", adapters={}) / "model"
        targets = ALL_TARGETS
    else:
        family = {"tiny-dense": "llama", "tiny-moe": "qwen3_moe"}[model]
        model_dir = build_tiny(CACHE / model, family) / "model"
        targets = ALL_TARGETS if family == "llama" else ALL_TARGETS[:4]
    adapters = {}
    for i in range(NUM_ADAPTERS):
        path = make_adapter(model_dir, model_dir.parent / "bench-adapters" / f"a{i}", RANK, 2 * RANK, targets,
                            False, seed=1000 + i, b_std=0.01)
        adapters[f"a{i}"] = str(path)
    return model_dir, adapters


def prompts(seed: int = 0) -> list[list[int]]:
    """The workload's prompts; another seed gives the warm-up's (same lengths, no shared prefix)."""
    g = torch.Generator().manual_seed(seed)
    return torch.randint(100, 20_000, (NUM_REQUESTS, PROMPT_LEN), generator=g).tolist()


WARMUP_TOKENS = 4
"""Every system first runs the whole batch untimed for this many tokens, on other prompts: the
timed run then meets no first-time cost (oneDNN's kernels built for the step's shapes, the
allocator's first pages, the adapters' first loads), as a server that has served for a while."""


def run_loraserve(model_dir: Path, adapters: dict, dtype: str, use_adapters: bool, lora_dtype: str = "auto") -> float:
    from loraserve.config import SchedulerConfig

    llm = LLM(str(model_dir), adapters=adapters, dtype=dtype, lora_dtype=lora_dtype,
              scheduler=SchedulerConfig(max_num_seqs=NUM_REQUESTS, max_num_batched_tokens=4096, max_loras=8))
    names = [f"a{i % NUM_ADAPTERS}" if use_adapters else None for i in range(NUM_REQUESTS)]
    sp = SamplingParams(max_tokens=OUTPUT_LEN, temperature=0.0, ignore_eos=True)
    llm.generate(prompts(1), SamplingParams(max_tokens=WARMUP_TOKENS, temperature=0.0, ignore_eos=True),
                 adapter=names, use_tqdm=False)
    t = time.perf_counter()
    outs = llm.generate(prompts(), sp, adapter=names, use_tqdm=False)
    elapsed = time.perf_counter() - t
    assert all(len(o.token_ids) == OUTPUT_LEN for o in outs)
    return NUM_REQUESTS * OUTPUT_LEN / elapsed


def run_hf_peft(model_dir: Path, adapters: dict, dtype: str) -> float:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    dt = getattr(torch, dtype)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dt)
    names = list(adapters)
    model = PeftModel.from_pretrained(model, adapters[names[0]], adapter_name=names[0])
    for n in names[1:]:
        model.load_adapter(adapters[n], adapter_name=n)
    model.eval()
    ids = torch.tensor(prompts())
    per_request = [names[i % NUM_ADAPTERS] for i in range(NUM_REQUESTS)]
    kw = dict(do_sample=False, pad_token_id=0, eos_token_id=None)
    with torch.no_grad():
        model.generate(input_ids=torch.tensor(prompts(1)), adapter_names=per_request, max_new_tokens=WARMUP_TOKENS,
                       min_new_tokens=WARMUP_TOKENS, **kw)
        t = time.perf_counter()
        out = model.generate(input_ids=ids, adapter_names=per_request, max_new_tokens=OUTPUT_LEN,
                             min_new_tokens=OUTPUT_LEN, **kw)
        elapsed = time.perf_counter() - t
    assert out.shape[1] == PROMPT_LEN + OUTPUT_LEN
    return NUM_REQUESTS * OUTPUT_LEN / elapsed


def run_vllm(model_dir: Path, adapters: dict, dtype: str) -> dict:
    """Output tokens/s of the vLLM CPU build on the same workload: {"mixed": ..., "base": ...}."""
    spec = {"model": str(model_dir), "adapters": adapters, "dtype": dtype, "rank": RANK,
            "prompts": prompts(), "output_len": OUTPUT_LEN, "warmup_prompts": prompts(1), "warmup_tokens": WARMUP_TOKENS}
    with tempfile.NamedTemporaryFile("w", suffix=".json") as f:
        json.dump(spec, f)
        f.flush()
        out = subprocess.run([os.environ["VLLM_PYTHON"], str(ROOT / "benchmarks" / "vllm_throughput.py"), f.name],
                             capture_output=True, text=True, timeout=1800, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    if out.returncode != 0:
        raise RuntimeError(f"vLLM run failed:\n{out.stderr[-3000:]}")
    # vLLM logs to stdout too, also after the result (its shutdown): the result is the line that is JSON
    return next(json.loads(line) for line in reversed(out.stdout.splitlines()) if line.startswith('{"mixed"'))


def single_decode(model_dir: Path, dtype: str) -> dict:
    """One request decoding 128 tokens, and the read bandwidth measured just before and
    after it: this machine's speed swings by 2x within minutes, so the roofline is
    taken from the same moment (the higher of the two readings: the harsher roofline)."""
    llm = LLM(str(model_dir), dtype=dtype)
    sp = SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True)
    llm.generate([[1, 2, 3]], sp, use_tqdm=False)
    engine = llm.engine
    engine.add_request(list(range(100, 116)), SamplingParams(max_tokens=129, temperature=0.0, ignore_eos=True))
    engine.step()  # prefill and first token
    before = read_bandwidth()
    t = time.perf_counter()
    steps = 0
    while engine.has_unfinished():
        engine.step()
        steps += 1
    tok_s = steps / (time.perf_counter() - t)
    bandwidth = max(before, read_bandwidth())
    m = engine.model
    weight_bytes = _weights(m)
    return {"tok_s": tok_s, "weight_bytes": weight_bytes, "memory_read_GBps": bandwidth / 1e9,
            "roofline_share": tok_s / (bandwidth / weight_bytes)}


def _weights(m) -> int:
    """Bytes a decode step reads: every projection, norm and expert (the embedding
    gives one row; a tied lm_head has its own, possibly packed, copy)."""
    from loraserve.model.linear import Linear

    total = m.norm.numel() * m.norm.element_size() + m.lm_head.num_bytes
    for layer in m.layers:
        for v in vars(layer).values():
            for t in (vars(v).values() if hasattr(v, "__dataclass_fields__") else [v]):
                if isinstance(t, Linear):
                    total += t.num_bytes
                elif isinstance(t, torch.Tensor):
                    total += t.numel() * t.element_size()
    return total


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--models", nargs="+", default=["smollm2", "tiny-dense", "tiny-moe"])
    p.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"])
    p.add_argument("--repeats", type=int, default=2, help="alternating repeats; the best of each counts")
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "throughput.json"))
    args = p.parse_args()
    torch.manual_seed(0)
    results = {"machine": {"cpu": platform.processor() or platform.machine(), "threads": torch.get_num_threads(),
                           **machine_limits()}, "runs": []}
    print(json.dumps(results["machine"], indent=1), flush=True)
    for model in args.models:
        model_dir, adapters = prepare(model)
        for dtype in args.dtypes:
            # systems alternate within each repeat and the best of the repeats counts: on a
            # shared machine a neighbour's burst then slows one repeat, not one system; each
            # repeat starts one system later, so no system always runs first (`order` says how)
            runs = {"loraserve_mixed": lambda: run_loraserve(model_dir, adapters, dtype, True)}
            if dtype == "float32":  # the same with the adapters' weights stored in bf16 (--lora-dtype)
                runs["loraserve_mixed_bf16_lora"] = lambda: run_loraserve(model_dir, adapters, dtype, True, "bfloat16")
            runs.update({"loraserve_base": lambda: run_loraserve(model_dir, adapters, dtype, False),
                         "hf_peft_mixed": lambda: run_hf_peft(model_dir, adapters, dtype),
                         "single_decode": lambda: single_decode(model_dir, dtype)})
            reps = []
            for i in range(args.repeats):
                order = list(runs)[i % len(runs):] + list(runs)[:i % len(runs)]
                got = {key: runs[key]() for key in order}
                reps.append({**{key: got[key] for key in runs}, "order": order})
            row = {"model": model, "dtype": dtype, "repeats": reps}
            for key in ("loraserve_mixed", "loraserve_mixed_bf16_lora", "loraserve_base", "hf_peft_mixed"):
                if key in reps[0]:
                    row[key] = max(r[key] for r in reps)
            row["mixed_over_base_per_repeat"] = [r["loraserve_mixed"] / r["loraserve_base"] for r in reps]
            row["ours_over_hf_per_repeat"] = [r["loraserve_mixed"] / r["hf_peft_mixed"] for r in reps]
            row["single_decode"] = max((r["single_decode"] for r in reps), key=lambda d: d["roofline_share"])
            if os.environ.get("VLLM_PYTHON"):
                row["vllm_cpu"] = run_vllm(model_dir, adapters, dtype)
            results["runs"].append(row)
            print(json.dumps({k: v for k, v in row.items() if k != "repeats"}), flush=True)
    results["best_dtype"] = best_dtype(results["runs"])
    Path(args.out).write_text(json.dumps(results, indent=1))
    print_table(results)


def best_dtype(runs: list[dict]) -> list[dict]:
    """Per model, each system at its own best dtype (the issue's comparison)."""
    out = []
    for model in dict.fromkeys(r["model"] for r in runs):
        rows = [r for r in runs if r["model"] == model]
        ours = max(rows, key=lambda r: r["loraserve_mixed"])
        hf = max(rows, key=lambda r: r["hf_peft_mixed"])
        out.append({"model": model, "loraserve_mixed": ours["loraserve_mixed"], "loraserve_dtype": ours["dtype"],
                    "hf_peft_mixed": hf["hf_peft_mixed"], "hf_dtype": hf["dtype"],
                    "ratio": ours["loraserve_mixed"] / hf["hf_peft_mixed"]})
    return out


def print_table(results: dict) -> None:
    m = results["machine"]
    print(f"\nmachine: {m['machine_class']} (flags {', '.join(m['cpu_flags'])}; --dtype auto = {m['dtype_auto']}); "
          f"read {m['memory_read_GBps']:.0f} GB/s, matmul fp32 {m['matmul_GFLOPs']['float32']:.0f} / "
          f"bf16 {m['matmul_GFLOPs']['bfloat16']:.0f} GFLOP/s")
    print("\n| model | dtype | loraserve mixed | loraserve base | HF+PEFT mixed | ours/HF | mixed/base "
          "| batch-1 decode | roofline | % roofline |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in results["runs"]:
        d = r["single_decode"]
        roof = d["memory_read_GBps"] * 1e9 / d["weight_bytes"]
        print(f"| {r['model']} | {r['dtype']} | {r['loraserve_mixed']:.0f} | {r['loraserve_base']:.0f} "
              f"| {r['hf_peft_mixed']:.0f} | {r['loraserve_mixed'] / r['hf_peft_mixed']:.2f}x "
              f"| {r['loraserve_mixed'] / r['loraserve_base']:.0%} | {r['single_decode']['tok_s']:.0f} "
              f"| {roof:.0f} | {d['roofline_share']:.0%} |")
    for r in results["runs"]:
        per = ", ".join(f"{x:.0%}" for x in r.get("mixed_over_base_per_repeat", []))
        line = f"{r['model']} {r['dtype']}: mixed/base per repeat {per}"
        if "loraserve_mixed_bf16_lora" in r:
            line += (f"; with --lora-dtype bfloat16 mixed {r['loraserve_mixed_bf16_lora']:.0f} tok/s, "
                     f"{r['loraserve_mixed_bf16_lora'] / r['loraserve_base']:.0%} of base")
        print(line)
    for r in results["runs"]:
        if "vllm_cpu" in r:
            v = r["vllm_cpu"]
            print(f"{r['model']} {r['dtype']}: vLLM CPU mixed {v['mixed']:.0f} tok/s, base {v['base']:.0f}; "
                  f"loraserve / vLLM mixed {r['loraserve_mixed'] / v['mixed']:.2f}x")
    for b in results.get("best_dtype", []):
        print(f"{b['model']}, each at its best dtype: loraserve {b['loraserve_mixed']:.0f} tok/s ({b['loraserve_dtype']}) "
              f"/ HF+PEFT {b['hf_peft_mixed']:.0f} ({b['hf_dtype']}) = {b['ratio']:.2f}x")


if __name__ == "__main__":
    main()
