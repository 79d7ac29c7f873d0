"""The seams carry load: the engine core runs on any executor and adapter
budget that implement the protocols, and the model on any LoRA backend that
implements `submit` and `wait`."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import torch

from loraserve.cache import LinkMover
from loraserve.clock import ManualClock
from loraserve.config import CacheConfig, SchedulerConfig
from loraserve.engine.core import EngineCore
from loraserve.engine.plan import SampledToken, StepPlan, StepResult
from loraserve.kernels import fused_delta
from loraserve.lora.adapter import load_adapter
from loraserve.lora.backend import LocalLoraBackend
from loraserve.model.attention import build_metadata
from loraserve.model.loader import load_model
from loraserve.model.lora import Routing
from loraserve.model.targets import Target, out_edges
from loraserve.request import Request
from loraserve.sampling import SamplingParams


class CountingExecutor:
    """Only the Executor protocol: every sampling sequence gets token 7 + its step count."""

    def __init__(self) -> None:
        self.steps, self.released, self.loads = 0, [], []

    def execute(self, plan: StepPlan) -> StepResult:
        self.steps += 1
        self.loads += [adapter for adapter, _ in plan.lora_loads]
        return StepResult({q.request_id: SampledToken(7 + self.steps) for q in plan.seqs if q.samples})

    def probe(self) -> None:
        pass

    def release(self, request_ids: list[str]) -> None:
        self.released += request_ids


class OneAdapterBudget:
    """Only the AdapterBudget protocol: one distinct adapter at a time, always loaded anew."""

    def __init__(self) -> None:
        self.holder: str | None = None
        self.count = 0

    def can_acquire(self, adapter: str) -> bool:
        return self.holder in (None, adapter)

    def acquire(self, adapter: str) -> bool:
        load = self.holder is None
        self.holder, self.count = adapter, self.count + 1
        return load

    def release(self, adapter: str) -> None:
        self.count -= 1
        if self.count == 0:
            self.holder = None


def test_the_core_runs_on_protocols_alone():
    clock = ManualClock()
    executor, budget = CountingExecutor(), OneAdapterBudget()
    core = EngineCore(CacheConfig(block_size=4, policy="slora"), SchedulerConfig(max_loras=1), num_blocks=32,
                      num_host_blocks=8, block_bytes=100, max_model_len=64, clock=clock,
                      mover=LinkMover(clock, bytes_per_s=1e6), executor=executor, adapter_budget=budget)
    for adapter in ("A", "B"):
        core.cache.add_adapter(adapter, 100)
    reqs = [Request(f"r{i}", list(range(5 + i)), SamplingParams(max_tokens=3), adapter=a)
            for i, a in enumerate(["A", None, "B", "A"])]
    for r in reqs:
        core.scheduler.add(r)
    finished = []
    for _ in range(200):
        if not core.has_unfinished():
            break
        out = core.run_step()
        assert not out.failed
        for r in out.touched:
            if r.is_finished:
                finished.append(r.request_id)
                core.forget(r)
        clock.advance(0.01)
    assert sorted(finished) == ["r0", "r1", "r2", "r3"] and sorted(executor.released) == sorted(finished)
    assert all(len(r.output_token_ids) == 3 and r.finish_reason.value == "length" for r in reqs)
    assert executor.loads.count("B") == 1 and budget.count == 0 and budget.holder is None
    assert not core.scheduler.requests
    core.cache.check()


class NaiveLora:
    """Only the model's LoraBackend protocol, computed the plain way for one adapter on every row."""

    def __init__(self, spec, weights) -> None:
        self.spec, self.weights = spec, weights
        self.calls: set[Target] = set()

    def submit(self, layer: int, target: Target, x: torch.Tensor, routing: Routing | None = None):
        if (layer, target) not in self.weights:
            return None
        self.calls.add(target)
        a, b = self.weights[(layer, target)]
        edges = out_edges(self.spec, target)
        if routing is None:
            return fused_delta(x, a, b, edges)
        return fused_delta(x[:, None, :], a[routing.expert], b[routing.expert], edges).squeeze(1)

    def wait(self, delta: torch.Tensor, out: torch.Tensor) -> None:
        out += delta


def test_the_model_runs_on_any_lora_backend(tiny):
    """A plain backend that knows only submit and wait gives the local backend's logits,
    dense and with per-expert LoRA on MoE routing."""
    for family in ("llama", "mixtral"):
        root = tiny(family)
        model = load_model(root / "model", torch.float32)
        adapter = load_adapter(root / "adapters" / "r8", model.spec, 64)
        ids = torch.tensor([3, 14, 15, 92, 65, 35, 89, 79, 32, 38])
        logits = []
        for lora in ("naive", "local", "none"):
            kv = torch.zeros(model.spec.num_layers, 2, 4, 4, model.spec.num_kv_heads, model.spec.head_dim)
            meta = build_metadata([([0, 1, 2], 0, len(ids))], 4, model.spec.sliding_window, model.device)
            if lora == "naive":
                backend = naive = NaiveLora(model.spec, adapter.weights)
            elif lora == "none":
                backend = None
            else:
                backend = LocalLoraBackend(model.spec, 2, torch.float32, model.device, {adapter.id: adapter},
                                           read_blocks=None)
                backend.slots.acquire(adapter.id)
                backend.bank.load(backend.slots.slot_of(adapter.id), adapter)
                backend.begin([adapter.id], [len(ids)], [])
            with torch.inference_mode():
                logits.append(model.forward(ids, meta, kv, backend, torch.arange(len(ids))))
        assert torch.allclose(logits[0], logits[1], atol=1e-4), family
        assert (logits[0] - logits[2]).abs().max() > 1e-2  # the adapter does change them
        if family == "mixtral":
            assert Target.EXPERTS_GATE_UP in naive.calls and Target.EXPERTS_DOWN in naive.calls


# -- the shape of the package ----------------------------------------------------

ROOT = Path(__file__).resolve().parent.parent / "loraserve"


def package_imports() -> dict[str, set[str]]:
    """Top-level part of loraserve (package or module) → the others it imports, type-only imports included."""
    deps: dict[str, set[str]] = {}
    for f in ROOT.rglob("*.py"):
        part = f.relative_to(ROOT).parts[0].removesuffix(".py")
        for node in ast.walk(ast.parse(f.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("loraserve."):
                other = node.module.split(".")[1]
                if other != part:
                    deps.setdefault(part, set()).add(other)
    return deps


def test_packages_import_one_way_and_modules_stay_small():
    deps = package_imports()
    assert "lora" not in deps["model"] and "engine" not in deps["model"]  # the model owns its LoRA interface
    assert not deps.get("gpu")  # the GPU kernels are a leaf: the model, LoRA and engine use them, they use none
    cycles = {(a, b) for a, bs in deps.items() for b in bs if a in deps.get(b, ())}
    assert not cycles
    sizes = {str(f.relative_to(ROOT)): len(f.read_text().splitlines()) for f in ROOT.rglob("*.py")}
    assert max(sizes.values()) <= 400, max(sizes.items(), key=lambda kv: kv[1])


def test_the_simulator_needs_no_tokenizer_template_engine_or_http_client():
    code = ("import sys\n"
            "for m in ('tokenizers', 'jinja2', 'httpx', 'fastapi', 'transformers'): sys.modules[m] = None\n"
            "import loraserve.sim.engine, loraserve.sim.cli, loraserve.sim.run, loraserve.sim.replay\n")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


def test_only_the_cluster_package_imports_ray():
    """Ray is an optional extra: the single-process server, the engine and the simulator run without it."""
    importers = set()
    for f in ROOT.rglob("*.py"):
        for node in ast.walk(ast.parse(f.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [node.module or ""] if isinstance(node, ast.ImportFrom) else []
            if any(n == "ray" or n.startswith("ray.") for n in names):
                importers.add(f.relative_to(ROOT).parts[0])
    assert importers == {"cluster"}
    code = ("import sys\nsys.modules['ray'] = None\n"
            "import loraserve.cli, loraserve.server.app, loraserve.engine.llm_engine, loraserve.sim.cluster\n"
            "from loraserve.cli import build_parser\nbuild_parser().parse_args(['serve', '--replicas', '2'])\n")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)
