"""The disaggregated LoRA server: real processes, real sockets on 127.0.0.1.

A `loraserve lora-server` process holds the adapters; instances (in this
process, or `loraserve serve --lora-server` processes) hold none. Their greedy
tokens must equal the coupled engine's and transformers + PEFT's, token for
token, whatever the transport mode; a server that dies fails only the
requests that need it, with a 503, and serves again after a restart.
"""

from __future__ import annotations

import json
import queue
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import openai
import pytest
import torch
import zmq

from loraserve.config import EngineConfig
from loraserve.engine.llm_engine import LLMEngine
from loraserve.remote.config import RemoteLoraConfig
from loraserve.remote.protocol import PROTOCOL_VERSION, decode, encode
from loraserve.sampling import SamplingParams
from tests.oracle import greedy
from tests.test_server import free_port, start_server

ADAPTERS = ("r4", "r8", "r16")
PROMPTS = [[1, 5, 9, 13, 40], [2, 7, 11, 3, 17, 23, 29], [4, 8, 15, 16, 23, 42]]
START_TIMEOUT = 120
GENERATE_TIMEOUT_S = 60.0
"""Longest a test's batch may take to generate (a hung step fails the test instead of CI)."""


class LoraServerProc:
    """A `loraserve lora-server` subprocess; `endpoint` and `metrics` once it is up."""

    def __init__(self, root: Path, *extra: str, listen: str = "tcp://127.0.0.1:0") -> None:
        args = [sys.executable, "-m", "loraserve.cli", "lora-server", "--model", str(root / "model"),
                "--listen", listen, "--metrics-port", "0", "--lora-dir", str(root / "adapters"), *extra]
        for name in ADAPTERS:
            args += ["--lora", f"{name}={root / 'adapters' / name}"]
        self.proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        lines: queue.Queue[str] = queue.Queue()
        threading.Thread(target=lambda: [lines.put(line) for line in self.proc.stdout], daemon=True).start()
        self.output: list[str] = []
        self.endpoint = self.metrics = None
        deadline = time.monotonic() + START_TIMEOUT
        while self.endpoint is None:
            try:
                line = lines.get(timeout=max(0.1, deadline - time.monotonic()))
            except queue.Empty:
                self.kill()
                pytest.fail("the LoRA server did not start:\n" + "".join(self.output))
            self.output.append(line)
            if "metrics on " in line:
                self.metrics = line.split("metrics on ")[1].strip()
            if "listening on " in line:
                self.endpoint = line.split("listening on ")[1].strip()

    def metric(self, name: str, labels: str = "") -> float:
        """The sum of a metric's samples (those with `labels`, if given)."""
        text = httpx.get(self.metrics, timeout=10).text
        heads = (f"{name}{{{labels}}} ",) if labels else (name + " ", name + "{")
        return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith(heads))

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(timeout=30)


@pytest.fixture(scope="module")
def servers(tiny):
    """One LoRA server per family (layer-wise loading on), started on first use."""
    started: dict[str, LoraServerProc] = {}

    def get(family: str, *extra: str) -> LoraServerProc:
        key = " ".join((family, *extra))
        if key not in started:
            started[key] = LoraServerProc(tiny(family), "--batch-window-us", "0", *extra)
        return started[key]

    yield get
    for s in started.values():
        s.kill()


def run(engine: LLMEngine, adapters=(None, *ADAPTERS, *ADAPTERS), max_tokens: int = 8) -> list[list[int]]:
    """A mixed batch (base model and every adapter, twice): greedy tokens by request."""
    sp = SamplingParams(max_tokens=max_tokens, temperature=0, ignore_eos=True)
    reqs = [engine.add_request(PROMPTS[i % len(PROMPTS)], sp, adapter=a) for i, a in enumerate(adapters)]
    done = {}
    deadline = time.monotonic() + GENERATE_TIMEOUT_S
    while engine.has_unfinished():
        assert time.monotonic() < deadline, "generation did not finish"
        for out in engine.step():
            if out.finished:
                assert out.error is None, out.error
                done[out.request_id] = out.token_ids
    return [done[r.request_id] for r in reqs]


_coupled: dict[str, list[list[int]]] = {}


def coupled_tokens(root: Path) -> list[list[int]]:
    if str(root) not in _coupled:
        engine = LLMEngine(EngineConfig(model=str(root / "model"), dtype="float32"))
        try:
            for name in ADAPTERS:
                engine.add_adapter(name, str(root / "adapters" / name))
            _coupled[str(root)] = run(engine)
        finally:
            engine.close()
    return _coupled[str(root)]


def remote_engine(root: Path, endpoint: str, **kw) -> LLMEngine:
    return LLMEngine(EngineConfig(model=str(root / "model"), dtype="float32", lora_server=RemoteLoraConfig(endpoint, **kw)))


@pytest.mark.parametrize("family", ["llama", "mixtral", "qwen2_moe"])
def test_remote_deltas_equal_the_coupled_engine_and_peft(tiny, servers, family):
    root = tiny(family)
    server = servers(family)
    engine = remote_engine(root, server.endpoint)
    try:
        assert set(a.name for a in engine.adapters.listing) == set(ADAPTERS)
        tokens = run(engine)
    finally:
        engine.close()
    assert tokens == coupled_tokens(root)
    for i, adapter in enumerate((None, *ADAPTERS)):  # and the oracle, for the first of each
        want, _ = greedy(str(root / "model"), None if adapter is None else str(root / "adapters" / adapter),
                         PROMPTS[i % len(PROMPTS)], 8)
        assert tokens[i] == want, (family, adapter)
    assert tokens[1] != tokens[0]  # the adapters do change the output


@pytest.mark.parametrize("mode,overlap", [("push", False), ("pull", True), ("pull", False)])
def test_push_pull_and_overlap_give_the_same_tokens(tiny, servers, mode, overlap):
    root = tiny("mixtral")
    engine = remote_engine(root, servers("mixtral").endpoint, mode=mode, overlap=overlap)
    try:
        assert run(engine) == coupled_tokens(root)
    finally:
        engine.close()


def test_whole_adapter_loading_gives_the_same_tokens(tiny, servers):
    root = tiny("mixtral")
    server = servers("mixtral", "--no-layerwise")
    engine = remote_engine(root, server.endpoint)
    try:
        assert run(engine) == coupled_tokens(root)
    finally:
        engine.close()
    layers = json.loads((root / "model" / "config.json").read_text())["num_hidden_layers"]
    assert server_stats(server.endpoint)["layers_loaded"] == layers * len(ADAPTERS)  # each adapter whole, once


def server_stats(endpoint: str) -> dict:
    from loraserve.remote.client import LoraServerClient
    client = LoraServerClient(RemoteLoraConfig(endpoint))
    try:
        return client.stats()
    finally:
        client.close()


def test_layerwise_loading_fills_only_the_layers_asked_for(tiny, servers):
    """With layer-wise loading, a delta for layer 0 does not wait for layer 1:
    after a step that reaches only layer 0's deltas, only layer 0 is loaded."""
    from loraserve.remote.client import LoraServerClient
    server = LoraServerProc(tiny("llama"), "--batch-window-us", "0")
    try:
        client = LoraServerClient(RemoteLoraConfig(server.endpoint))
        sock = zmq.Context.instance().socket(zmq.DEALER)
        sock.connect(server.endpoint)
        try:
            entry = next(e for e in client.connect() if e["name"] == "r8")
            spec = json.loads((tiny("llama") / "model" / "config.json").read_text())
            x = torch.randn(3, spec["hidden_size"])
            header = {"kind": "delta", "id": 1, "layer": 0, "target": "qkv", "dtype": "float32", "rows": 3,
                      "adapters": [entry["id"]], "push": True}
            sock.send_multipart(encode(header, [x, torch.zeros(3, dtype=torch.int32)]))
            assert sock.poll(30_000)
            reply = json.loads(sock.recv_multipart()[0])
            assert reply["kind"] == "result"
            stats = client.stats()
            assert stats["layers_loaded"] == 1 and stats["slot_misses"] == 1
        finally:
            sock.close(0)
            client.close()
    finally:
        server.kill()


def test_hostile_frames_are_refused_and_the_server_keeps_serving(tiny, servers):
    root = tiny("mixtral")
    server = servers("mixtral")
    spec = json.loads((root / "model" / "config.json").read_text())
    hidden = spec["hidden_size"]
    sock = zmq.Context.instance().socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(server.endpoint)
    entries = ask(sock, [json.dumps({"v": PROTOCOL_VERSION, "kind": "catalogue", "id": 0}).encode()])["adapters"]
    good_id = entries[0]["id"]

    def delta(**over) -> dict:
        return {"kind": "delta", "id": 7, "layer": 0, "target": "qkv", "dtype": "float32", "rows": 2,
                "adapters": [good_id], "push": True, **over}

    x, idx = torch.randn(2, hidden), torch.zeros(2, dtype=torch.int32)
    down_x = torch.randn(2, spec["intermediate_size"])
    cases = [
        ([b"\xff not json"], 400),
        ([json.dumps({"v": PROTOCOL_VERSION + 1, "kind": "ping"}).encode()], 426),
        ([json.dumps({"v": PROTOCOL_VERSION, "kind": "launch"}).encode()], 400),
        (encode(delta(), [x, idx])[:2], 400),  # a tensor frame missing
        (encode(delta(), [x, idx])[:1] + [b"\0" * 7, bytes(memoryview(idx.numpy()))], 400),  # truncated x
        (encode(delta(rows=2), [torch.randn(2, hidden + 1), idx]), 400),  # wrong width
        (encode(delta(), [x.to(torch.int32), idx]), 400),  # wrong dtype
        (encode(delta(rows=1 << 30), [x, idx]), 400),  # oversized
        (encode(delta(layer=99), [x, idx]), 400),
        (encode(delta(adapters=["0" * 32]), [x, idx]), 404),  # unknown adapter
        (encode(delta(), [x, torch.full((2,), 5, dtype=torch.int32)]), 400),  # adapter index out of range
        (encode(delta(target="experts_down", rows=2), [down_x, idx,
                                                       torch.full((2,), 99, dtype=torch.int32)]), 400),  # bad expert
        (encode(delta(target="experts_gate_up", rows=2, unique=1), [x[:1], idx, idx, torch.tensor(
            [0, 1], dtype=torch.int32)]), 400),  # a gather index past the unique rows
        (encode(delta(unique=1), [x[:1], idx, idx]), 400),  # 'unique' on a dense target
        (encode(delta(target="experts_gate_up", rows=2, unique=3), [torch.randn(3, hidden), idx, idx, idx]),
         400),  # more unique rows than rows
        (encode(delta(target="experts_down", rows=2, combine=1), [down_x, idx, idx, torch.ones(2), torch.tensor(
            [0, 1], dtype=torch.int32)]), 400),  # a token index past the combined tokens
        (encode(delta(target="experts_down", rows=2, combine=2), [down_x, idx, idx, torch.tensor(
            [1.0, float("nan")]), idx]), 400),  # a routing weight that is not finite
        (encode(delta(target="experts_down", rows=2, combine=2), [down_x, idx, idx, torch.ones(3), idx]),
         400),  # a weight per row, not more
        (encode(delta(target="experts_down", rows=2, combine=2), [down_x, idx, idx]), 400),  # frames missing
        (encode(delta(target="experts_gate_up", rows=2, combine=2), [x, idx, idx, torch.ones(2), idx]),
         400),  # 'combine' on gate|up
    ]
    try:
        for frames, status in cases:
            reply = ask(sock, frames)
            assert reply["kind"] == "error" and reply["status"] == status, (reply, status)
        assert ask(sock, [json.dumps({"v": PROTOCOL_VERSION, "kind": "ping", "id": 1}).encode()])["kind"] == "ping"
        # a well-formed down delta asked combined comes back one row per token: its rows' deltas times their weights
        rows_x, expert = torch.randn(3, spec["intermediate_size"]), torch.tensor([0, 1, 2], dtype=torch.int32)
        three, scatter = torch.zeros(3, dtype=torch.int32), torch.tensor([0, 1, 0], dtype=torch.int32)
        weight = torch.tensor([0.25, 0.5, 0.75])
        replies = []
        experts = next(e["id"] for e in entries if [0, "experts_down"] in [k for k, _, _ in e["layout"]])
        for i, extra in enumerate(({}, {"combine": 2})):
            tail = [weight, scatter] if extra else []
            sock.send_multipart(encode(delta(id=100 + i, target="experts_down", rows=3, adapters=[experts], **extra),
                                       [rows_x, three, expert, *tail]))
            assert sock.poll(30_000), "no reply"
            replies.append(decode(sock.recv_multipart()))
        assert [r.kind for r in replies] == ["result", "result"]
        per_row, combined = (r.tensors[0] for r in replies)
        assert per_row.shape == (3, hidden) and combined.shape == (2, hidden)
        assert per_row.abs().sum() > 0
        assert torch.allclose(combined, torch.stack([0.25 * per_row[0] + 0.75 * per_row[2], 0.5 * per_row[1]]),
                              atol=1e-6)
        # a message past the largest a delta can be is cut off before it is allocated
        flood = zmq.Context.instance().socket(zmq.DEALER)
        flood.setsockopt(zmq.LINGER, 0)
        flood.connect(server.endpoint)
        try:
            flood.send_multipart([b"{}", bytes((1 << 16) * (spec["intermediate_size"] + 3) * 4 + (2 << 20))])
            assert not flood.poll(2000)  # no answer: the peer was disconnected
        finally:
            flood.close(0)
        assert ask(sock, [json.dumps({"v": PROTOCOL_VERSION, "kind": "ping", "id": 1}).encode()])["kind"] == "ping"
        # loads: the same bytes under their name again is no change; other bytes under it, or a path
        # outside --lora-dir, are refused
        version = ask(sock, [json.dumps({"v": PROTOCOL_VERSION, "kind": "ping"}).encode()])["version"]
        load = {"v": PROTOCOL_VERSION, "kind": "load", "name": "r4", "path": str(root / "adapters" / "r4")}
        assert ask(sock, [json.dumps(load).encode()])["kind"] == "loaded"
        reply = ask(sock, [json.dumps({**load, "path": str(root / "adapters" / "r8")}).encode()])
        assert reply["status"] == 400 and "already loaded" in reply["message"]
        reply = ask(sock, [json.dumps({**load, "name": "etc", "path": str(root / "model")}).encode()])
        assert reply["status"] == 403 and "--lora-dir" in reply["message"]
        assert ask(sock, [json.dumps({"v": PROTOCOL_VERSION, "kind": "ping"}).encode()])["version"] == version
        # and it still computes, for an instance too
        engine = remote_engine(root, server.endpoint)
        try:
            assert run(engine) == coupled_tokens(root)
        finally:
            engine.close()
    finally:
        sock.close(0)
    assert server.metric("loraserve_lora_server_refused_messages_total") >= len(cases)


def ask(sock: zmq.Socket, frames: list) -> dict:
    sock.send_multipart(frames)
    assert sock.poll(30_000), "no reply"
    return json.loads(sock.recv_multipart()[0])


# -- two instances over HTTP --------------------------------------------------------


def test_two_instances_share_one_server(tiny):
    """Both instances serve every adapter with the coupled engine's text; the
    server batches their rows together; they hold no adapter bytes; a load
    through one is served by the other."""
    from loraserve import LLM

    root = tiny("mixtral")
    server = LoraServerProc(root, "--batch-window-us", "200000")
    procs = []
    try:
        urls = []
        for _ in range(2):
            proc, url = start_server(root, "--lora-server", server.endpoint, "--lora-dir", str(root / "adapters"),
                                     "--max-num-seqs", "8")
            procs.append(proc)
            urls.append(url)
        clients = [openai.OpenAI(base_url=u + "/v1", api_key="x", max_retries=0) for u in urls]
        for c in clients:
            assert {m.id for m in c.models.list().data} >= set(ADAPTERS)
        offline = LLM(str(root / "model"), dtype="float32", adapters={n: str(root / "adapters" / n) for n in ADAPTERS})
        jobs = [(i % 2, model, p) for i, (model, p) in enumerate(
            (m, p) for m in ("model", *ADAPTERS) for p in ("Hello there", "The capital of", "One two three"))]

        def ask_http(job) -> str:
            c, model, prompt = job
            return clients[c].completions.create(model=model, prompt=prompt, max_tokens=12, temperature=0).choices[0].text

        with ThreadPoolExecutor(8) as pool:
            texts = list(pool.map(ask_http, jobs * 2))
        sp = SamplingParams(max_tokens=12, temperature=0)
        for (c, model, prompt), text in zip(jobs * 2, texts):
            want = offline.generate([prompt], sp, adapter=None if model == "model" else model)[0].text
            assert text == want, (model, prompt)
        # cross-instance batching happened: some kernel served rows of both instances
        count = server.metric("loraserve_lora_server_batch_instances_count")
        single = server.metric("loraserve_lora_server_batch_instances_bucket", 'le="1.0"')
        assert count > single, (count, single)
        for url in urls:  # instances hold no adapter weights
            text = httpx.get(url + "/metrics").text
            assert metric_value(text, "loraserve_lora_bank_bytes") == 0
            assert metric_value(text, 'loraserve_cache_bytes{kind="adapters",tier="device"}') == 0
            steps = metric_value(text, "loraserve_remote_lora_steps_total")
            assert steps > 0 and metric_value(text, "loraserve_remote_lora_step_wait_seconds_count") == steps
        # each adapter once on the server, however many instances use it
        assert server.metric("loraserve_lora_server_adapters", 'tier="slot"') == len(ADAPTERS)
        # a load through instance 0 reaches instance 1 (the catalogue is the server's)
        r = httpx.post(urls[0] + "/v1/load_lora_adapter",
                       json={"lora_name": "again", "lora_path": str(root / "adapters" / "r8")}, timeout=60)
        assert r.status_code == 200, r.text
        deadline = time.monotonic() + 20
        while "again" not in {m.id for m in clients[1].models.list().data}:
            assert time.monotonic() < deadline, "instance 1 never saw the new adapter"
            time.sleep(0.2)
        got = clients[1].completions.create(model="again", prompt="Hello there", max_tokens=12, temperature=0)
        assert got.choices[0].text == offline.generate(["Hello there"], sp, adapter="r8")[0].text
        r = httpx.post(urls[1] + "/v1/unload_lora_adapter", json={"lora_name": "again"}, timeout=60)
        assert r.status_code == 200, r.text
        deadline = time.monotonic() + 20
        while "again" in {m.id for m in clients[0].models.list().data}:
            assert time.monotonic() < deadline, "instance 0 still lists the unloaded adapter"
            time.sleep(0.2)
    finally:
        for p in procs:
            p.terminate()
        for p in procs:
            try:
                p.wait(timeout=30)
            except subprocess.TimeoutExpired:
                p.kill()
        server.kill()


def metric_value(text: str, name: str) -> float:
    for line in text.splitlines():
        if line.startswith(name + " ") or (line.startswith(name + "{") and "{" not in name):
            return float(line.rsplit(" ", 1)[1])
        if "{" in name and line.startswith(name):
            return float(line.rsplit(" ", 1)[1])
    raise AssertionError(f"{name} not in metrics")


def test_a_dead_lora_server_fails_only_adapter_requests_then_serves_again(tiny):
    root = tiny("llama")
    listen = f"tcp://127.0.0.1:{free_port()}"
    server = LoraServerProc(root, listen=listen)
    proc = None
    try:
        proc, url = start_server(root, "--lora-server", server.endpoint, "--lora-server-timeout", "2")
        client = openai.OpenAI(base_url=url + "/v1", api_key="x", max_retries=0, timeout=60)
        base_before = client.completions.create(model="model", prompt="Hello", max_tokens=6, temperature=0)
        stream = client.completions.create(model="r8", prompt="Hello", max_tokens=200, temperature=0,
                                           stream=True, extra_body={"ignore_eos": True})
        first = next(iter(stream))
        assert first.choices[0].text is not None
        server.proc.send_signal(signal.SIGKILL)
        server.proc.wait(timeout=30)
        start = time.monotonic()
        with pytest.raises(openai.APIError) as streamed:
            for _ in stream:
                pass
        assert time.monotonic() - start < 30
        assert "unavailable" in str(streamed.value).lower()
        with pytest.raises(openai.APIStatusError) as refused:
            client.completions.create(model="r4", prompt="Hello", max_tokens=4, temperature=0)
        assert refused.value.status_code == 503
        base = client.completions.create(model="model", prompt="Hello", max_tokens=6, temperature=0)
        assert base.choices[0].text == base_before.choices[0].text  # the base model goes on
        server = LoraServerProc(root, listen=listen)  # a restart, same address
        deadline = time.monotonic() + 30
        while True:
            try:
                got = client.completions.create(model="r8", prompt="Hello", max_tokens=6, temperature=0)
                break
            except openai.APIStatusError as e:
                assert e.status_code == 503 and time.monotonic() < deadline, e
                time.sleep(0.3)
        from loraserve import LLM
        offline = LLM(str(root / "model"), dtype="float32", adapters={"r8": str(root / "adapters" / "r8")})
        assert got.choices[0].text == offline.generate(["Hello"], SamplingParams(max_tokens=6, temperature=0),
                                                       adapter="r8")[0].text
    finally:
        if proc is not None:
            proc.terminate()
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
        server.kill()


def test_an_instance_started_before_its_lora_server_serves_adapters_once_it_is_up(tiny):
    """No start order: the instance serves the base model, and the server's
    adapters as soon as its heartbeat reaches it."""
    from loraserve import LLM

    root = tiny("llama")
    listen = f"tcp://127.0.0.1:{free_port()}"
    proc, url = start_server(root, "--lora-server", listen)
    server = None
    try:
        client = openai.OpenAI(base_url=url + "/v1", api_key="x", max_retries=0, timeout=60)
        assert {m.id for m in client.models.list().data} == {"model"}
        assert client.completions.create(model="model", prompt="Hello", max_tokens=4).choices[0].text
        with pytest.raises(openai.NotFoundError):
            client.completions.create(model="r8", prompt="Hello", max_tokens=4)
        server = LoraServerProc(root, listen=listen)
        deadline = time.monotonic() + 30
        while "r8" not in {m.id for m in client.models.list().data}:
            assert time.monotonic() < deadline, "the instance never read the server's catalogue"
            time.sleep(0.2)
        got = client.completions.create(model="r8", prompt="Hello", max_tokens=6, temperature=0)
        offline = LLM(str(root / "model"), dtype="float32", adapters={"r8": str(root / "adapters" / "r8")})
        assert got.choices[0].text == offline.generate(["Hello"], SamplingParams(max_tokens=6, temperature=0),
                                                       adapter="r8")[0].text
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
        if server is not None:
            server.kill()


def test_a_catalogue_read_before_a_load_does_not_undo_it(tiny):
    """The heartbeat may read the catalogue just before a load through this
    instance: applied after it, that older catalogue must not drop the adapter."""
    root = tiny("llama")
    server = LoraServerProc(root)
    engine = None
    try:
        engine = remote_engine(root, server.endpoint, heartbeat_s=0.1)
        engine.add_adapter("x4", str(root / "adapters" / "r4"))
        time.sleep(0.5)  # heartbeats read the catalogue with x4; the engine applies none yet
        engine.add_adapter("x8", str(root / "adapters" / "r8"))
        engine.step()  # applies the latest catalogue read: it must show x8
        assert {"x4", "x8"} <= {a.name for a in engine.adapters.listing}
        assert run(engine, adapters=(None, "x4", "x8")) == coupled_tokens(root)[:3]
    finally:
        if engine is not None:
            engine.close()
        server.kill()


def test_a_cold_adapter_does_not_hold_back_another_instances_delta(tiny):
    """Two instances' deltas of one (layer, projection) batch together. One's adapter
    is in a slot, the other's is still being copied (1 s of virtual time): the
    warm delta is answered now, equal to the plain product, and only the cold one
    waits, then is answered once its copy has landed."""
    from loraserve.cache.mover import LinkMover
    from loraserve.clock import ManualClock
    from loraserve.config import CacheConfig
    from loraserve.lora_server.delta import Delta
    from loraserve.lora_server.server import LoraServer
    from loraserve.kernels import fused_delta
    from loraserve.model.targets import Target, out_edges
    from loraserve.remote.config import LoraServerConfig
    from loraserve.remote.protocol import decode
    from loraserve.sim.paced import PacedMover

    root = tiny("llama")
    clock = ManualClock()
    config = LoraServerConfig(model=str(root / "model"), batch_window_us=0,
                              cache=CacheConfig(device_bytes=16 << 20, host_bytes=16 << 20))
    server = LoraServer(config, "tcp://127.0.0.1:0", clock=clock)
    sent = []
    try:
        server.sock.send = lambda peer, frames: sent.append((peer, decode(frames)))
        store = server.store
        store.cache.mover = PacedMover(store.mover, LinkMover(clock, duration=lambda job: 1.0))
        read = store.registry.load("r4", root / "adapters" / "r4")
        a, b = read.weights[(0, Target.QKV)]  # (the store keeps them packed in its cache blocks)
        warm = store.add_loaded("r4", read)
        assert not store.ready([warm.id], 0)  # its copy starts
        clock.advance(1.5)
        assert store.ready([warm.id], 0)  # in a slot now
        cold = store.add_loaded("r8", store.registry.load("r8", root / "adapters" / "r8"))
        assert not store.ready([cold.id], 0)  # its copy starts
        spec = server.spec
        x = torch.randn(2, spec.hidden_size, generator=torch.Generator().manual_seed(0))

        def delta(peer: bytes, adapter) -> Delta:
            return Delta(peer, 1, 0, Target.QKV, torch.float32, True, x, [adapter.id], torch.zeros(2, dtype=torch.long),
                         None, clock.now())

        server.pending = [delta(b"cold-instance", cold), delta(b"warm-instance", warm)]
        before = dict(store.fill.counters)
        server._compute()
        # the whole batch was asked once (cold first: a wait) and warm's delta ran (a hit); the
        # readiness checks that split them count nothing
        assert store.fill.counters["slot_hits"] - before["slot_hits"] == 1
        assert store.fill.counters["layer_waits"] - before["layer_waits"] == 1
        assert [(peer, m.kind) for peer, m in sent] == [(b"warm-instance", "result")]
        assert torch.allclose(sent[0][1].tensors[0], fused_delta(x, a, b, out_edges(spec, Target.QKV)), atol=1e-5)
        assert [d.peer for d in server.pending] == [b"cold-instance"]
        clock.advance(1.0)
        server._compute()
        assert [(peer, m.kind) for peer, m in sent] == [(b"warm-instance", "result"), (b"cold-instance", "result")]
        assert not server.pending
    finally:
        server.close()
