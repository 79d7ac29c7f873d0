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
