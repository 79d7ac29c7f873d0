"""The LoRA server split over ranks (`--ep X --pp Y`): real rank processes,
gloo on 127.0.0.1.

Every layout must give greedy tokens equal to the coupled engine's, token for
token, on a mixed batch (base model and several adapters); each rank must
hold only its shard; a batch that some rank is not ready for is asked again
(no deadlock) and comes out right; and the ranks go when rank 0 goes.

Rank 0 of each server runs on a thread of this process; the servers start
side by side, once for the module.
"""

from __future__ import annotations

import contextlib
import json
import math
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import zmq

from loraserve.cache.config import CacheConfig
from loraserve.config import EngineConfig
from loraserve.engine.llm_engine import LLMEngine
from loraserve.kernels import fused_delta
from loraserve.lora.adapter import LoraAdapter, load_adapter
from loraserve.lora.bank import LoraBank
from loraserve.lora_server.server import LoraServer
from loraserve.lora_server.shard import Layout, Shard
from loraserve.model.spec import ModelSpec
from loraserve.model.targets import Target, in_dim, layer_targets, out_edges
from loraserve.remote.client import LoraServerClient
from loraserve.remote.config import LoraServerConfig, RemoteLoraConfig
from loraserve.remote.protocol import encode
from tests.test_remote import ADAPTERS, coupled_tokens, run

CASES = {"mixtral-ep2": ("mixtral", 2, 1), "mixtral-pp2": ("mixtral", 1, 2),
         "mixtral-ep2pp2": ("mixtral", 2, 2), "qwen2_moe-ep2pp2": ("qwen2_moe", 2, 2)}
"""name → (family, ep, pp)"""

POLICY = {"mixtral-ep2pp2": "slora"}
"""Cache policy where not elora's: with slora adapters reach the device only
on demand (no swapper moving them there in idle time), so a rank's first
delta for a freshly loaded adapter finds it not ready, every time."""
MAX_LORAS = 8
TIMEOUT_S = 60.0


# -- no processes: the layout and the shard transform ----------------------------


def test_layout_splits_layers_into_stages_and_experts_by_residue():
    layout = Layout.of(2, 2, SimpleNamespace(num_layers=5, num_experts=4))
    assert [layout.stage_layers(s) for s in range(2)] == [range(0, 2), range(2, 5)]
    assert [layout.shard(r) for r in range(4)] == [Shard(range(0, 2), 0, 2), Shard(range(0, 2), 1, 2),
                                                    Shard(range(2, 5), 0, 2), Shard(range(2, 5), 1, 2)]
    expert = torch.tensor([3, 0, 1, 2, 3])
    owners = layout.owners(3, Target.EXPERTS_DOWN, expert)
    assert [(rank, rows.tolist()) for rank, rows in owners] == [(2, [1, 3]), (3, [0, 2, 4])]
    assert layout.local_expert(expert).tolist() == [1, 0, 0, 1, 1]
    assert layout.owners(1, Target.QKV, None) == [(0, None)]
    with pytest.raises(ValueError, match="--ep 2 needs a MoE model"):
        Layout.of(2, 1, SimpleNamespace(num_layers=5, num_experts=0))
    with pytest.raises(ValueError, match="more stages"):
        Layout.of(1, 6, SimpleNamespace(num_layers=5, num_experts=0))


def test_a_shard_keeps_its_layers_and_its_experts_only():
    e, r = 5, 2
    weights = {(0, Target.QKV): (torch.randn(8, r), torch.randn(r, 12)),
               (1, Target.QKV): (torch.randn(8, r), torch.randn(r, 12)),
               (1, Target.EXPERTS_DOWN): (torch.randn(e, 6, r), torch.randn(e, r, 8))}
    whole = LoraAdapter(id="x", name="x", path="", rank=r, alpha=1.0, use_rslora=False, target_modules=(),
                        weights=weights)
    leader, other = Shard(range(1, 2), 0, 2).apply(whole), Shard(range(1, 2), 1, 2).apply(whole)
    assert set(leader.weights) == {(1, Target.QKV), (1, Target.EXPERTS_DOWN)}
    assert set(other.weights) == {(1, Target.EXPERTS_DOWN)}  # dense targets live on the stage leader
    a, b = weights[(1, Target.EXPERTS_DOWN)]
    assert torch.equal(leader.weights[(1, Target.EXPERTS_DOWN)][0], a[[0, 2, 4]])
    assert torch.equal(other.weights[(1, Target.EXPERTS_DOWN)][1], b[[1, 3]])
    assert other.layout == (((1, Target.EXPERTS_DOWN), (2, 6, r), (2, r, 8)),)
    assert other.num_bytes == 4 * (2 * 6 * r + 2 * r * 8)
    assert Shard(range(2, 3), 1, 2).apply(whole).num_bytes == 0  # nothing here: an all-zero slot


# -- parallel servers -------------------------------------------------------------


class Running:
    """A parallel LoRA server: rank 0 serving on a thread here, the other ranks processes."""

    def __init__(self, root: Path, ep: int, pp: int, policy: str = "elora") -> None:
        self.root = root
        config = LoraServerConfig(model=str(root / "model"), batch_window_us=0, max_loras=MAX_LORAS, ep=ep, pp=pp,
                                  cache=CacheConfig(device_bytes=16 << 20, host_bytes=16 << 20, policy=policy))
        self.server = LoraServer(config, "tcp://127.0.0.1:0", [str(root / "adapters")])
        try:
            for name in ADAPTERS:
                self.server.load(name, str(root / "adapters" / name))
        except BaseException:
            self.server.close()
            raise
        self.procs = list(self.server.ranks.launcher.procs.values())
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.server.stop.set()
        self.thread.join(timeout=TIMEOUT_S)
        self.server.close()  # again: a no-op if the loop closed it
        for proc in self.procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait(timeout=10)


@pytest.fixture(scope="module")
def servers(tiny):
    roots = {family: tiny(family) for family, _, _ in CASES.values()}
    with ThreadPoolExecutor(len(CASES)) as pool:
        futures = {name: pool.submit(Running, roots[fam], ep, pp, POLICY.get(name, "elora"))
                   for name, (fam, ep, pp) in CASES.items()}
    started = {name: f.result() for name, f in futures.items() if f.exception() is None}
    try:
        for f in futures.values():
            if f.exception() is not None:
                raise f.exception()
        yield started
    finally:
        with ThreadPoolExecutor(len(CASES)) as pool:  # side by side: each waits for its ranks to exit
            list(pool.map(Running.close, started.values()))
    for running in started.values():
        assert all(proc.poll() is not None for proc in running.procs), "a rank outlived its server"


class Client:
    """Control calls and raw protocol messages to a LoRA server."""

    def __init__(self, endpoint: str) -> None:
        self.control = LoraServerClient(RemoteLoraConfig(endpoint, timeout_s=TIMEOUT_S))
        self.sock = zmq.Context.instance().socket(zmq.DEALER)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.connect(endpoint)

    def ids(self) -> dict[str, str]:
        return {e["name"]: e["id"] for e in self.control.connect()}

    def send(self, header: dict, tensors: list[torch.Tensor] = ()) -> None:
        self.sock.send_multipart(encode(header, tensors))

    def recv(self) -> tuple[dict, list]:
        assert self.sock.poll(int(TIMEOUT_S * 1000)), "no answer from the LoRA server"
        frames = self.sock.recv_multipart()
        return json.loads(frames[0]), frames[1:]

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc) -> None:
        self.sock.close(0)
        self.control.close()


@pytest.mark.parametrize("case", list(CASES))
def test_every_layout_gives_the_coupled_engines_tokens(servers, case):
    running = servers[case]
    engine = LLMEngine(EngineConfig(model=str(running.root / "model"), dtype="float32",
                                    lora_server=RemoteLoraConfig(running.server.endpoint, timeout_s=TIMEOUT_S)))
    try:
        tokens = run(engine)
    finally:
        engine.close()
    assert tokens == coupled_tokens(running.root)
    assert tokens[1] != tokens[0]  # the adapters do change the output


@pytest.mark.parametrize("case", list(CASES))
def test_each_rank_holds_only_its_shard(servers, case):
    with Client(servers[case].server.endpoint) as client:
        check_shards(client, servers[case].root, *CASES[case][1:])


def check_shards(client: Client, root: Path, ep: int, pp: int) -> None:
    spec = ModelSpec.from_dir(root / "model")
    ids = client.ids()
    client.send({"kind": "hint", "adapters": list(ids.values())})  # every rank fills its slots in idle time
    catalogue = {e["name"]: e for e in client.control.connect()}
    whole_bytes = sum(catalogue[name]["num_bytes"] for name in ADAPTERS)
    stats = client.control.stats()
    ranks = stats["ranks"]
    assert [r["rank"] for r in ranks] == list(range(ep * pp))
    for r in ranks:
        stage, ep_rank = divmod(r["rank"], ep)
        layers = range(stage * spec.num_layers // pp, (stage + 1) * spec.num_layers // pp)
        assert (r["layers"], r["ep_rank"], r["experts"]) == ([layers.start, layers.stop], ep_rank,
                                                             spec.num_experts // ep)
        # the shard's bytes, from the whole adapters' layouts: its layers; dense targets on EP rank 0 only;
        # 1/ep of every expert target
        want = 0
        for name in ADAPTERS:
            for (layer, target), a, b in catalogue[name]["layout"]:
                if layer in layers and (ep_rank == 0 or Target(target).is_expert):
                    share = 1 / ep if Target(target).is_expert else 1
                    want += round((math.prod(a) + math.prod(b)) * 4 * share)
        assert r["adapter_bytes"] == want, r
        assert r["adapter_bytes"] < whole_bytes
    assert sum(r["adapter_bytes"] for r in ranks) == whole_bytes
    # the banks: together exactly one whole bank (rank 16), once each rank has filled its slots
    whole = LoraBank(spec, MAX_LORAS, torch.float32, torch.device("cpu"))
    whole.load(0, load_adapter(root / "adapters" / "r16", spec, 64))
    deadline = time.monotonic() + TIMEOUT_S
    while sum(r["bank_bytes"] for r in ranks) != whole.num_bytes and time.monotonic() < deadline:
        time.sleep(0.1)
        ranks = client.control.stats()["ranks"]
    assert sum(r["bank_bytes"] for r in ranks) == whole.num_bytes
    assert max(r["bank_bytes"] for r in ranks) < whole.num_bytes


def expected_delta(spec: ModelSpec, adapter: LoraAdapter, layer: int, target: Target, x: torch.Tensor,
                   expert: torch.Tensor | None) -> torch.Tensor | None:
    """x @ A @ B row by row, straight from the adapter's weights (zero where it has none)."""
    if (layer, target) not in adapter.weights:
        return None
    a, b = adapter.weights[(layer, target)]
    edges = out_edges(spec, target)
    if expert is None:
        return fused_delta(x, a, b, edges)
    return torch.cat([fused_delta(x[i:i + 1], a[e], b[e], edges) for i, e in enumerate(expert.tolist())])


def test_a_rank_not_ready_is_asked_again_and_the_rows_come_back_in_order(servers):
    """r16 unloaded and loaded again is on the host tier of every rank, nothing
    staged (and no swapper to move it: slora): the first deltas find ranks not
    ready, wait, and come out right."""
    with Client(servers["mixtral-ep2pp2"].server.endpoint) as client:
        check_deltas(client, servers["mixtral-ep2pp2"].root)


def check_deltas(client: Client, root: Path) -> None:
    spec = ModelSpec.from_dir(root / "model")
    adapters = {name: load_adapter(root / "adapters" / name, spec, 64) for name in ADAPTERS}
    client.control.unload("r16")  # on every rank
    left = {e["name"]: e["num_bytes"] for e in client.control.connect()}
    assert set(left) == {"r4", "r8"}
    assert sum(r["adapter_bytes"] for r in client.control.stats()["ranks"]) == sum(left.values())
    client.control.load("r16", str(root / "adapters" / "r16"))
    before = client.control.stats()["rank_not_ready"]
    ids = client.ids()
    gen = torch.Generator().manual_seed(0)
    sent = {}
    for layer in range(spec.num_layers):
        for target in layer_targets(spec, layer):
            rows = 11
            x = torch.randn(rows, in_dim(spec, target), generator=gen)
            row_adapter = torch.randint(0, len(ADAPTERS), (rows,), generator=gen, dtype=torch.int32)
            expert = (torch.randint(0, spec.num_experts, (rows,), generator=gen, dtype=torch.int32)
                      if target.is_expert else None)
            msg_id = len(sent) + 1
            client.send({"kind": "delta", "id": msg_id, "layer": layer, "target": target.value, "dtype": "float32",
                         "rows": rows, "adapters": [ids[n] for n in ADAPTERS], "push": True},
                        [x, row_adapter] + ([expert] if expert is not None else []))
            sent[msg_id] = (layer, target, x, row_adapter, expert)
    for _ in sent:
        header, frames = client.recv()
        assert header["kind"] == "result", header
        layer, target, x, row_adapter, expert = sent[header["id"]]
        got = torch.frombuffer(bytearray(frames[0]), dtype=torch.float32).view(len(x), -1)
        want = torch.zeros_like(got)
        for k, name in enumerate(ADAPTERS):
            rows = (row_adapter == k).nonzero().flatten()
            y = expected_delta(spec, adapters[name], layer, target, x[rows], None if expert is None else expert[rows])
            if y is not None:
                want[rows] = y
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-4)
    assert client.control.stats()["rank_not_ready"] > before


@contextlib.contextmanager
def cli_server(root: Path):
    """`loraserve lora-server --ep 2` as a process; yields (its process, its one rank's psutil.Process).
    Both are killed after, whatever happened."""
    psutil = pytest.importorskip("psutil")  # comes with peft, which the tiny models need
    cmd = [sys.executable, "-m", "loraserve.cli", "lora-server", "--model", str(root / "model"),
           "--listen", "tcp://127.0.0.1:0", "--ep", "2", "--device-cache", "16MiB", "--host-cache", "16MiB",
           "--lora", f"r8={root / 'adapters' / 'r8'}"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    ranks = []
    try:
        lines: list[str] = []
        reader = threading.Thread(target=lambda: lines.extend(proc.stdout), daemon=True)
        reader.start()
        deadline = time.monotonic() + TIMEOUT_S
        while not any("listening on" in line for line in lines):
            assert proc.poll() is None and time.monotonic() < deadline, "".join(lines)
            time.sleep(0.1)
        ranks = [p for p in psutil.Process(proc.pid).children()
                 if "loraserve.lora_server.rank" in " ".join(p.cmdline())]
        assert len(ranks) == 1
        yield proc, ranks[0]
    finally:
        try:
            ranks += psutil.Process(proc.pid).children(recursive=True)
        except psutil.NoSuchProcess:
            pass  # rank 0 is gone: `ranks` has its children
        for p in [proc, *ranks]:
            try:
                p.kill()
            except (psutil.NoSuchProcess, ProcessLookupError):
                pass
        proc.wait(timeout=10)


def test_the_ranks_exit_when_rank_0_dies(tiny):
    import psutil

    with cli_server(tiny("mixtral")) as (proc, rank):
        proc.kill()
        proc.wait(timeout=10)
        gone, alive = psutil.wait_procs([rank], timeout=15)
        assert not alive, "a rank outlived rank 0"


def test_an_idle_rank_0_exits_when_a_rank_dies(tiny):
    """No request comes: the pinger finds the rank gone, and the server exits (non-zero) for its
    supervisor to restart it, rather than serving on without the rank's shard."""
    with cli_server(tiny("mixtral")) as (proc, rank):
        rank.kill()
        assert proc.wait(timeout=TIMEOUT_S) != 0
