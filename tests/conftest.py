"""Shared fixtures: tiny random models and the SmolLM2 demo, built once.

Models are cached under .cache/test-models (or $LORASERVE_TEST_CACHE), so a
second run skips the building. Every test that uses one is marked `slow`
here; tests that start a server are marked where they are written.
`pytest -m "not slow"` (`make test-fast`) runs the rest.

The device: `--device cuda` (or LORASERVE_TEST_DEVICE=cuda) runs the tests that
take the `device` fixture (oracle, paging, cache engine, the Triton kernels)
there; CPU is the default, and what CI runs.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from loraserve.demo import build_demo, build_tiny

CACHE = Path(os.environ.get("LORASERVE_TEST_CACHE", Path(__file__).resolve().parent.parent / ".cache" / "test-models"))
DENSE = ["llama", "qwen2", "mistral"]
MOE = ["mixtral", "qwen2_moe", "qwen3_moe"]


def tiny_dir(family: str) -> Path:
    tokenizer_from = None
    if family != "llama":  # reuse the llama build's tokenizer rather than reading the GGUF again
        tokenizer_from = tiny_dir("llama") / "model"
    return build_tiny(CACHE / f"tiny-{family}", family, tokenizer_from=tokenizer_from)


def pytest_addoption(parser):
    parser.addoption("--device", default=os.environ.get("LORASERVE_TEST_DEVICE", "cpu"),
                     help="torch device for the tests that take one (default cpu; or LORASERVE_TEST_DEVICE)")


def pytest_configure(config):
    if config.getoption("--device") == "cpu":  # the Triton kernels' tests run in its interpreter, before it loads
        os.environ.setdefault("TRITON_INTERPRET", "1")
    from loraserve.model import cpu_kernels

    cpu_kernels.kernels()  # built once (~30 s on 2 cores, then cached), before servers start that load it


@pytest.fixture(scope="session")
def device(pytestconfig) -> torch.device:
    return torch.device(pytestconfig.getoption("--device"))


@pytest.fixture(scope="session")
def tiny():
    return tiny_dir


@pytest.fixture(scope="session")
def demo() -> Path:
    return build_demo(CACHE / "demo")


MODEL_FIXTURES = {"tiny", "demo"}


def pytest_collection_modifyitems(items):
    for item in items:
        if MODEL_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.slow)
