"""The `loraserve` command, run as a real subprocess."""

from __future__ import annotations

import subprocess
import sys

from loraserve import LLM, SamplingParams


def cli(*args):
    return subprocess.run([sys.executable, "-m", "loraserve.cli", *args], capture_output=True, text=True, timeout=300)


def test_generate_prints_the_engines_text(tiny):
    root = tiny("llama")
    r8 = str(root / "adapters" / "r8")
    out = cli("generate", "--model", str(root / "model"), "--adapter", f"r8={r8}", "--prompt", "Hello there",
              "--max-tokens", "12")
    assert out.returncode == 0, out.stderr
    expected = LLM(str(root / "model"), dtype="float32", adapters={"r8": r8}).generate(
        "Hello there", SamplingParams(max_tokens=12, temperature=0.0), adapter="r8")[0].text
    assert out.stdout == expected + "\n"


def test_lora_dtype_is_a_flag_and_fp16_on_a_cpu_exits_2_with_one_line(tiny):
    """--lora-dtype bfloat16 under an fp32 model generates what the library does with it; fp16
    adapters on a CPU are refused before the model loads."""
    root = tiny("llama")
    r8 = str(root / "adapters" / "r8")
    args = ["generate", "--model", str(root / "model"), "--dtype", "float32", "--adapter", f"r8={r8}",
            "--prompt", "Hello there", "--max-tokens", "12"]
    out = cli(*args, "--lora-dtype", "bfloat16")
    assert out.returncode == 0, out.stderr
    expected = LLM(str(root / "model"), dtype="float32", lora_dtype="bfloat16", adapters={"r8": r8}).generate(
        "Hello there", SamplingParams(max_tokens=12, temperature=0.0), adapter="r8")[0].text
    assert out.stdout == expected + "\n"
    out = cli(*args, "--lora-dtype", "float16")
    assert out.returncode == 2
    assert out.stderr.strip().splitlines() == [
        "loraserve: error: lora_dtype float16 is not supported on CPU: use float32 or bfloat16"]


def test_bad_adapter_exits_2_with_one_line(tiny, tmp_path):
    root = tiny("llama")
    out = cli("generate", "--model", str(root / "model"), "--adapter", f"x={tmp_path}", "--prompt", "hi")
    assert out.returncode == 2
    assert out.stderr.strip().splitlines() == [f"loraserve: error: adapter {tmp_path}: missing adapter_config.json"]


def test_a_bad_adapter_name_exits_2_with_one_line(tiny):
    root = tiny("llama")
    out = cli("generate", "--model", str(root / "model"), "--adapter", f"../up={root / 'adapters' / 'r8'}",
              "--prompt", "hi")
    assert out.returncode == 2 and len(out.stderr.strip().splitlines()) == 1
    assert out.stderr.startswith("loraserve: error: adapter name '../up' is not allowed")


def test_unknown_architecture_exits_2(tmp_path):
    (tmp_path / "config.json").write_text('{"architectures": ["BertModel"]}')
    out = cli("generate", "--model", str(tmp_path), "--prompt", "hi")
    assert out.returncode == 2 and "unsupported architecture ['BertModel']" in out.stderr


def test_serve_takes_cache_policies_and_routing_policies_apart():
    """Both lists are called POLICIES in their packages; each flag offers its own."""
    from loraserve.cache.policy import POLICIES as CACHE
    from loraserve.cli import build_parser
    from loraserve.router import POLICIES as ROUTING

    args = build_parser().parse_args(["serve", "--cache-policy", "vllm", "--routing", "round-robin", "--replicas", "2",
                                      "--lora-server-ranks", "2x1"])
    assert (args.cache_policy, args.routing, args.replicas, args.lora_server_ranks) == ("vllm", "round-robin", 2, "2x1")
    for cache, routing in zip(CACHE, ROUTING):
        args = build_parser().parse_args(["serve", "--cache-policy", cache, "--routing", routing])
        assert (args.cache_policy, args.routing) == (cache, routing)
    for bad in (["--cache-policy", "affinity"], ["--routing", "elora"]):
        r = subprocess.run([sys.executable, "-m", "loraserve.cli", "serve", *bad], capture_output=True, text=True,
                           timeout=120)
        assert r.returncode == 2 and "invalid choice" in r.stderr


def test_ray_flags_without_replicas_exit_2_with_one_line(tiny):
    for flags in (["--ray-address", "auto"], ["--lora-server-ranks", "1x1"]):
        r = subprocess.run([sys.executable, "-m", "loraserve.cli", "serve", "--model", str(tiny("llama") / "model"),
                            *flags], capture_output=True, text=True, timeout=120)
        assert r.returncode == 2 and r.stderr.strip().splitlines() == [
            "loraserve: error: --ray-address and --lora-server-ranks need --replicas (how many engine replicas to "
            "deploy)"]
