"""The NIXL transport: a real `loraserve lora-server` process writes each pushed
delta into the instance's registered arena (UCX, host memory, this machine)
and the instance's greedy tokens equal the coupled engine's.

`make test` installs nixl-cu12 next to the CPU torch, so these run in CI; a
checkout without it skips them (the package itself works without nixl).
"""

from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest

from loraserve.remote.config import RemoteLoraConfig
from loraserve.remote.nixl_transport import NixlUnavailable, nixl_module
from tests.test_remote import LoraServerProc, coupled_tokens, remote_engine, run, server_stats
from tests.test_server import free_port

try:
    nixl_module()
except NixlUnavailable as e:
    pytest.skip(str(e), allow_module_level=True)


@pytest.fixture(scope="module")
def servers(tiny):
    started: dict[str, LoraServerProc] = {}

    def get(family: str) -> LoraServerProc:
        if family not in started:
            started[family] = LoraServerProc(tiny(family), "--batch-window-us", "0")
        return started[family]

    yield get
    for s in started.values():
        s.kill()


@pytest.mark.parametrize("family", ["llama", "mixtral"])
def test_nixl_push_gives_the_coupled_engines_tokens(tiny, servers, family):
    root = tiny(family)
    server = servers(family)
    writes = server_stats(server.endpoint)["nixl_writes"]
    engine = remote_engine(root, server.endpoint, transport="nixl")
    try:
        tokens = run(engine)
        arena = engine.lora.nixl
        assert arena is not None and arena.written > 0
        assert not arena.regions  # every region read and freed
    finally:
        engine.close()
    assert tokens == coupled_tokens(root)
    stats = server_stats(server.endpoint)
    assert stats["nixl_writes"] - writes == arena.written  # every result came by NIXL, none over ZeroMQ
    assert stats["nixl_bytes_out"] > 0


def test_registering_again_keeps_writes_coming(tiny, servers):
    """What the instance does after a timeout: register again (the fence), same server, same arena."""
    root = tiny("llama")
    engine = remote_engine(root, servers("llama").endpoint, transport="nixl")
    try:
        for _ in range(2):
            engine.lora.nixl_ready = False  # the next step registers first
            written = engine.lora.nixl.written
            assert run(engine, max_tokens=4) == [t[:4] for t in coupled_tokens(root)]
            assert engine.lora.nixl_ready and engine.lora.nixl.written > written
    finally:
        engine.close()


def test_results_that_do_not_fit_the_arena_come_over_zeromq(tiny, servers):
    """An arena smaller than most results: those travel over ZeroMQ, the rest by NIXL, tokens unchanged."""
    root = tiny("mixtral")
    engine = remote_engine(root, servers("mixtral").endpoint, transport="nixl", arena_bytes=4096)
    try:
        tokens = run(engine, max_tokens=4)
        written, unplaced = engine.lora.nixl.written, engine.lora.nixl.unplaced
    finally:
        engine.close()
    assert tokens == [t[:4] for t in coupled_tokens(root)]
    assert written > 0 and unplaced > 0  # prefill's deltas over ZeroMQ; decode's small ones still fit


def test_a_restarted_server_gets_the_arena_registered_again(tiny):
    """A new server knows no arena: its first results come over ZeroMQ, then the
    instance registers again and results come by NIXL."""
    root = tiny("llama")
    listen = f"tcp://127.0.0.1:{free_port()}"
    server = LoraServerProc(root, "--batch-window-us", "0", listen=listen)
    engine = None
    try:
        engine = remote_engine(root, server.endpoint, transport="nixl", heartbeat_s=0.2)
        want = [t[:4] for t in coupled_tokens(root)]
        assert run(engine, max_tokens=4) == want
        old = engine.remote.incarnation
        server.kill()
        server = LoraServerProc(root, "--batch-window-us", "0", listen=listen)
        deadline = time.monotonic() + 30
        while not (engine.remote.up and engine.remote.incarnation != old):
            assert time.monotonic() < deadline, "the instance did not see the restarted server"
            time.sleep(0.1)
        written = engine.lora.nixl.written
        assert run(engine, max_tokens=4) == want
        assert engine.lora.nixl.written > written
        assert server_stats(server.endpoint)["nixl_writes"] > 0
    finally:
        if engine is not None:
            engine.close()
        server.kill()


def test_config_refuses_nixl_with_pull():
    with pytest.raises(ValueError, match="pull mode travels over ZeroMQ only"):
        RemoteLoraConfig("tcp://127.0.0.1:1", mode="pull", transport="nixl")


def test_a_server_without_nixl_refuses_and_the_instance_does_not_start(tiny, tmp_path, monkeypatch):
    """The server cannot import nixl (hidden from it here): the instance's start fails with one line."""
    root = tiny("llama")
    for name in ("nixl", "nixl_cu12", "nixl_cu13"):
        (tmp_path / f"{name}.py").write_text("raise ImportError('hidden by the test')\n")
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(tmp_path), *sys.path]))
    server = LoraServerProc(root)
    monkeypatch.undo()
    try:
        out = subprocess.run([sys.executable, "-m", "loraserve.cli", "serve", "--model", str(root / "model"),
                              "--port", str(free_port()), "--lora-server", server.endpoint,
                              "--lora-transport", "nixl"], capture_output=True, text=True, timeout=120)
        assert out.returncode == 2
        lines = [line for line in out.stderr.splitlines() if line.startswith("loraserve: error:")]
        assert len(lines) == 1 and "501" in lines[0] and "cannot write over NIXL" in lines[0], out.stderr
    finally:
        server.kill()
