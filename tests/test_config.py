"""Command-line defaults are the library's: each flag left out gives the config
the dataclass (or function) would build without it."""

from __future__ import annotations

import argparse
import inspect
from dataclasses import dataclass, replace

import pytest

from loraserve.bench.client import run_workload
from loraserve.bench.metrics import SLO, serviceable_rate
from loraserve.cli import build_parser, engine_config, lora_server_config
from loraserve.config import CacheConfig, EngineConfig
from loraserve.flags import add_flag, default_of, first_sentence
from loraserve.plan import PlanInput
from loraserve.plan.cli import plan_input
from loraserve.remote.config import LoraServerConfig, RemoteLoraConfig
from loraserve.sampling import SamplingParams
from loraserve.sim.cli import sim_config
from loraserve.sim.engine import SimConfig
from loraserve.units import format_bytes, parse_bytes, split_size
from loraserve.workload import WorkloadConfig
from loraserve.workload.cli import workload_config

REQUIRED = {"bench": ["run", "--workload", "w", "--url", "u"], "simulate": ["run", "--workload", "w", "--model", "m"],
            "workload": ["--out", "w"], "lora-server": ["--model", "m"], "plan": ["--model", "m"]}


def defaults(command: str) -> argparse.Namespace:
    return build_parser().parse_args([command, *REQUIRED.get(command, [])])


def test_serve_defaults_are_engine_configs():
    assert engine_config(defaults("serve"), "m") == EngineConfig(model="m")


def test_lora_server_defaults_are_its_config():
    assert lora_server_config(defaults("lora-server")) == LoraServerConfig(model="m")


def test_serve_with_a_lora_server_defaults_to_its_remote_config():
    args = build_parser().parse_args(["serve", "--lora-server", "tcp://127.0.0.1:5557"])
    assert engine_config(args, "m") == EngineConfig(model="m", lora_server=RemoteLoraConfig("tcp://127.0.0.1:5557"))


def test_serve_max_waiting_is_the_servers():
    from loraserve.engine.async_engine import AsyncEngine

    assert defaults("serve").max_waiting == inspect.signature(AsyncEngine).parameters["max_waiting"].default


def test_generate_defaults():
    args, sampling = defaults("generate"), SamplingParams()
    assert (args.top_p, args.top_k, args.seed) == (sampling.top_p, sampling.top_k, sampling.seed)
    assert args.dtype == EngineConfig.dtype
    assert (args.max_tokens, args.temperature) == (64, 0.0)  # the command line's own: short and greedy


def test_plan_defaults_are_plan_inputs():
    assert plan_input(defaults("plan")) == PlanInput(model="m")


@pytest.mark.parametrize("policy", ["elora", "vllm"])
def test_simulate_defaults_are_the_engines(policy):
    assert sim_config(defaults("simulate"), policy) == SimConfig(cache=CacheConfig(policy=policy))


def test_workload_defaults_are_workload_configs_with_spread_lengths():
    d = WorkloadConfig()
    assert workload_config(defaults("workload")) == replace(
        d, first_input=replace(d.first_input, kind="uniform"), input=replace(d.input, kind="uniform"),
        output=replace(d.output, kind="uniform"))


def test_bench_defaults_are_the_clients():
    args, client = defaults("bench"), inspect.signature(run_workload).parameters
    assert (args.base_model, args.scrape_interval, args.timeout) == (
        client["base_model"].default, client["scrape_interval"].default, client["timeout"].default)
    assert args.search_iters == inspect.signature(serviceable_rate).parameters["iters"].default
    assert args.slo_percentile == SLO(1.0, 1.0).ttft_percentile


@dataclass(frozen=True)
class Knobs:
    share: float = 1
    """Share of the pool at 80% use. Ignored otherwise."""

    size: int = 3 * 2**20
    limit: int | None = None


def test_add_flag_takes_type_help_and_default_from_the_field():
    p = argparse.ArgumentParser()
    add_flag(p, "--share", Knobs, "share")
    add_flag(p, "--size", Knobs, "size", type=parse_bytes, show=format_bytes, help="bytes")
    add_flag(p, "--limit", Knobs, "limit", help="no limit unless given")
    assert vars(p.parse_args([])) == {"share": 1, "size": 3 * 2**20, "limit": None}
    assert vars(p.parse_args(["--share", "0.5", "--size", "1KiB", "--limit", "7"])) == {
        "share": 0.5, "size": 1024, "limit": 7}
    text = " ".join(p.format_help().split())
    assert "share of the pool at 80% use (default: 1)" in text and "bytes (default: 3MiB)" in text
    assert "no limit unless given" in text and "(default: None)" not in text


def test_default_of_nested_fields_and_functions():
    assert default_of(WorkloadConfig, "first_input.mean") == 256
    assert default_of(run_workload, "timeout") == 600.0
    with pytest.raises(ValueError):
        default_of(EngineConfig, "model")
    assert first_sentence("Tokens per KV block. Smaller\n  blocks waste less.") == "Tokens per KV block"


@pytest.mark.parametrize("n", [0, 1, 1000, 1024, 3 * 2**20, 512 * 2**20, 2 * 2**30, 2**30 + 1])
def test_format_bytes_reads_back(n):
    assert parse_bytes(format_bytes(n)) == n


def test_zero_is_a_size_and_turns_the_host_tier_off():
    assert split_size("0") == (0.0, "") and parse_bytes("0") == 0
    assert engine_config(build_parser().parse_args(["serve", "--host-cache", "0"]), "m").cache.host_bytes == 0
    assert split_size("0MiB") is None


# -- --dtype auto ------------------------------------------------------------------

@pytest.mark.parametrize("flags, expected", [({"avx2", "fma"}, "float32"), ({"avx512f", "avx512_bf16"}, "bfloat16"),
                                             ({"amx_tile", "amx_bf16"}, "bfloat16"), (set(), "float32")])
def test_dtype_auto_picks_what_the_cpu_computes_natively(monkeypatch, flags, expected):
    import torch

    from loraserve import dtypes
    from loraserve.lora.bank import compute_dtype, lora_dtype

    monkeypatch.setattr(dtypes, "cpu_flags", lambda: frozenset(flags))
    assert dtypes.resolve_dtype("auto", "cpu") == expected
    for explicit in dtypes.DTYPES:  # an explicit dtype wins
        assert dtypes.resolve_dtype(explicit, "cpu") == explicit
    # adapters stored in the model's dtype (fp16 never on a CPU), bf16 math only where the CPU has bf16 dot products
    cpu = torch.device("cpu")
    assert lora_dtype(torch.bfloat16, cpu) == torch.bfloat16
    bf16 = torch.bfloat16
    assert compute_dtype(bf16, cpu, bf16) == (bf16 if expected == "bfloat16" else torch.float32)
    assert lora_dtype(torch.float16, cpu) == torch.float32
    assert lora_dtype(torch.float32, cpu) == torch.float32 == compute_dtype(torch.float32, cpu, torch.float32)
    # --lora-dtype wins on a CPU: bf16 copies of an fp32 model's adapters, computed in fp32 whatever the CPU
    assert lora_dtype(torch.float32, cpu, "bfloat16") == bf16
    assert compute_dtype(bf16, cpu, torch.float32) == torch.float32
    assert lora_dtype(bf16, cpu, "float32") == torch.float32 == compute_dtype(torch.float32, cpu, bf16)


def test_lora_dtype_refusals_say_why():
    import torch

    from loraserve.lora.bank import lora_dtype

    with pytest.raises(ValueError, match="lora_dtype float16 is not supported on CPU"):
        lora_dtype(torch.float32, torch.device("cpu"), "float16")
    with pytest.raises(ValueError, match="on cuda LoRA is stored in the model's dtype"):
        lora_dtype(torch.float16, torch.device("cuda"), "bfloat16")
    assert lora_dtype(torch.float16, torch.device("cuda")) == torch.float16  # auto: the model's
    with pytest.raises(ValueError, match="lora_dtype must be auto, float32, bfloat16 or float16, got 'int8'"):
        EngineConfig(model="m", lora_dtype="int8")
    from loraserve.remote.config import RemoteLoraConfig

    with pytest.raises(ValueError, match="with a LoRA server, its --dtype decides"):
        EngineConfig(model="m", lora_dtype="bfloat16", lora_server=RemoteLoraConfig("tcp://127.0.0.1:1"))
    assert build_parser().parse_args(["serve"]).lora_dtype == "auto"
    assert build_parser().parse_args(["generate", "--lora-dtype", "bfloat16"]).lora_dtype == "bfloat16"


def test_dtype_auto_is_the_default_and_bad_names_are_refused():
    assert EngineConfig(model="m").dtype == "auto" and build_parser().parse_args(["serve"]).dtype == "auto"
    with pytest.raises(ValueError, match="dtype must be auto, float32, bfloat16 or float16"):
        EngineConfig(model="m", dtype="fp8")
    with pytest.raises(SystemExit):
        build_parser().parse_args(["serve", "--dtype", "fp8"])
