"""The cluster simulator: routing, the exchange cost model, layer-wise
loading, EP/PP layouts, and the proof that its LoRA server decides as the
real server's store and batching window do."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from loraserve.cache.config import CacheConfig
from loraserve.clock import ManualClock
from loraserve.lora_server.fill import SlotFill
from loraserve.lora_server.window import BatchWindow, form_batches
from loraserve.model.spec import ModelSpec
from loraserve.model.targets import Target
from loraserve.sim.cluster import Cluster, ClusterConfig, MissWatch, simulate_cluster
from loraserve.sim.engine import SimConfig
from loraserve.sim.exchange import LINKS, ExchangeModel
from loraserve.sim.hardware import PROFILES
from loraserve.sim.lora_server import DisaggConfig, SimDelta, SimLoraServer
from loraserve.sim.models import model_spec
from loraserve.workload import Lengths, WorkloadConfig, generate
from loraserve.workload.arrivals import ArrivalConfig

H20 = PROFILES["h20"]
MIXTRAL = model_spec("mixtral-8x7b")


# -- the exchange model --------------------------------------------------------------

def model(**kw) -> ExchangeModel:
    return ExchangeModel(MIXTRAL, 64, LINKS["ib"], H20, **kw)


def test_trips_carry_each_projection_in_and_out_and_routed_expert_rows():
    trips = {t.target: t for t in model().trips()}
    assert list(trips) == [Target.QKV, Target.O, Target.EXPERTS_GATE_UP, Target.EXPERTS_DOWN]
    h, inter, k, bf16 = 4096, 14336, 2, 2  # Mixtral: hidden, expert intermediate, top-2
    gu, down = trips[Target.EXPERTS_GATE_UP], trips[Target.EXPERTS_DOWN]
    assert gu.in_bytes == h * bf16  # the hidden state once, with its expert ids
    assert gu.out_bytes == k * 2 * inter * bf16  # gate|up rows per routed expert
    assert down.in_bytes == k * inter * bf16  # an intermediate row per routed expert
    assert down.out_bytes == h * bf16  # the k deltas combined on the server into one row
    assert trips[Target.QKV].in_bytes == h * bf16 and trips[Target.QKV].out_bytes == (4096 + 2 * 1024) * bf16
    assert sum(t.share for t in trips.values()) == pytest.approx(1.0)


def test_pull_costs_one_more_latency_than_push_and_bytes_go_over_the_link():
    trip = model().trips()[0]
    ib = LINKS["ib"]
    push, pull = model().trip_time(trip, 10), model(push=False).trip_time(trip, 10)
    assert pull - push == pytest.approx(ib.latency)
    assert push == pytest.approx(2 * ib.latency + 10 * (trip.in_bytes + trip.out_bytes) / ib.bandwidth)
    assert model(instance_gpus=2).trip_time(trip, 10) < push  # one NIC per GPU
    assert model().trip_time(trip, 1000) > ExchangeModel(MIXTRAL, 64, LINKS["nvlink"], H20).trip_time(trip, 1000)


def test_overlap_hides_round_trips_behind_the_base_gemm():
    base = 1e-3  # a layer's base time: longer than its round trips at 4 tokens
    over, naive = model().layer(4, 4, 1, base), model(overlap=False).layer(4, 4, 1, base)
    assert over.wall == pytest.approx(base, rel=1e-9)  # every trip fits under its GEMM
    assert naive.wall == pytest.approx(base + naive.remote)
    assert over.remote == naive.remote and over.busy == naive.busy > 0


def test_ep_splits_expert_work_and_kernel_efficiency_scales_the_roofline():
    trips = {t.target: t for t in model().trips()}
    gu = trips[Target.EXPERTS_GATE_UP]
    one, four = model(ep=1).compute_time(gu, 4096, 16), model(ep=4).compute_time(gu, 4096, 16)
    assert four < one / 3  # the roofline part splits four ways, the sync does not
    qkv = trips[Target.QKV]
    assert model(ep=4).compute_time(qkv, 4096, 16) == pytest.approx(model(ep=1).compute_time(qkv, 4096, 16))
    slow = model(kernel_eff=0.5).compute_time(gu, 4096, 16) - model().kernel_overhead * 2
    fast = model().compute_time(gu, 4096, 16) - model().kernel_overhead * 2
    assert slow == pytest.approx(2 * fast)


# -- the server's policies on a ManualClock ------------------------------------------

def test_batch_window_waits_only_for_instances_behind_in_their_pass():
    clock = ManualClock(10.0)
    w = BatchWindow(clock, 200e-6)
    w.arrived("a", 5, 10.0, plan=[1, 5, 9])
    w.arrived("b", 1, 10.0, plan=[1, 5, 9])
    assert w.deadline([("a", 5, 10.0)]) == pytest.approx(10.0002)  # b is at 1 and will send 5
    assert w.deadline([("a", 5, 10.0), ("b", 5, 10.0)]) is None  # b's delta for 5 is already here
    assert w.deadline([("b", 1, 10.0)]) is None  # a is past position 1
    clock.advance(300e-6)
    assert w.deadline([("a", 5, 10.0)]) is None  # the window is over
    clock.advance(2.0)
    assert not w.coming([("a", 5)]) and "b" not in w.last_seen  # silent for a second: not waited for


def test_form_batches_groups_by_key_and_caps_distinct_adapters():
    deltas = [("L0", ["a"]), ("L1", ["b"]), ("L0", ["b", "c"]), ("L0", ["d"]), ("L0", ["a"])]
    batches = form_batches(deltas, lambda d: d[0], lambda d: d[1], 3)
    assert [(k, [d[1] for d in b]) for k, b in batches] == [
        ("L0", [["a"], ["b", "c"]]), ("L0", [["d"], ["a"]]), ("L1", [["b"]])]


class ArrivingLayers:
    """A Loader whose adapter's layer l arrives at time 0.1·(l+1)."""

    def __init__(self, clock: ManualClock) -> None:
        self.clock, self.writes = clock, []

    def available(self, adapter_id, layers) -> bool:
        return self.clock.now() >= 0.1 * (max(layers) + 1) - 1e-12

    def write(self, adapter_id, slot, layers) -> bool:
        self.writes.append((round(self.clock.now(), 3), tuple(sorted(layers))))
        return False

    def done(self, adapter_id) -> None:
        pass


def test_layerwise_loading_makes_a_layer_usable_once_its_weights_arrive():
    for layerwise, expect in ((True, [(0.1, (0,)), (0.2, (1,)), (0.3, (2,))]), (False, [(0.3, (0, 1, 2))])):
        clock = ManualClock()
        loader = ArrivingLayers(clock)
        fill = SlotFill(2, frozenset(range(3)), layerwise, clock, loader, lambda a: True)
        ready = {}
        while len(ready) < 3:
            clock.advance(0.05)
            for layer in range(3):
                if layer not in ready and fill.acquire("a", layer) is not None:
                    fill.release("a")
                    ready[layer] = round(clock.now(), 3)
        assert loader.writes == expect
        assert ready == ({0: 0.1, 1: 0.2, 2: 0.3} if layerwise else {0: 0.3, 1: 0.3, 2: 0.3})


def sim_server(cfg: DisaggConfig, sizes: dict[str, int]) -> tuple[SimLoraServer, ManualClock, list[float]]:
    clock, wakes = ManualClock(), []
    ex = ExchangeModel(MIXTRAL, 64, LINKS["ib"], H20, 2, cfg.ep, cfg.pp)
    return SimLoraServer(MIXTRAL, H20, cfg, sizes, clock, ex, wakes.append), clock, wakes


def test_simulated_server_releases_a_delta_when_its_layers_weights_have_arrived():
    size = 2 * 10**9  # over 8 × 50 GB/s: 5 ms (+ latency); layer l of 32 after (l+1)/32 of that
    copy = 5e-3 + H20.pcie_latency
    for arrival, expect in ((True, copy * 4 / 32), (False, copy)):
        cfg = DisaggConfig(layer_arrival=arrival, batch_window_us=0, layer_group=4, host_bytes=10**11,
                           server_cache_bytes=10**11)
        server, clock, wakes = sim_server(cfg, {"a": size})
        server.hint("a")
        done = []
        server.submit(SimDelta(0, 0, 0.0, ("a",), 8, 1e-4, done.append))
        assert not done and server.pending  # layers 0-3 are still travelling
        while server.pending:
            clock.advance(min(t for t in wakes if t > clock.now()) - clock.now())
            server.pump()
        assert clock.now() == pytest.approx(expect, abs=1e-9)
        assert len(done) == 1 and done[0] > clock.now()


def test_a_cold_adapter_does_not_hold_back_another_instances_delta():
    """Two instances' deltas at one position batch together; "warm" is in a slot,
    "cold" is still on its way (5 ms): warm's delta runs now, only cold's waits
    (as the real server does, tests/test_remote.py)."""
    cfg = DisaggConfig(layer_arrival=False, batch_window_us=0, layer_group=4, host_bytes=10**11,
                       server_cache_bytes=10**11)
    server, clock, wakes = sim_server(cfg, {"warm": 2 * 10**9, "cold": 2 * 10**9})
    server.hint("warm")
    clock.advance(0.01)
    server.pump()  # idle: warm's slot is filled
    assert server.fill.complete("warm")
    server.hint("cold")
    done = {}
    deltas = [SimDelta(peer, 0, clock.now(), (name,), 8, 1e-4, lambda t, n=name: done.setdefault(n, t))
              for peer, name in ((0, "cold"), (1, "warm"))]
    server.pending = list(deltas)
    server.pump()
    assert list(done) == ["warm"] and server.pending == deltas[:1]
    while server.pending:
        clock.advance(min(t for t in wakes if t > clock.now()) - clock.now())
        server.pump()
    assert list(done) == ["warm", "cold"] and done["cold"] - done["warm"] > 4e-3


def test_pipeline_stages_run_concurrently_and_a_busy_stage_queues():
    sizes = {"a": 10**6, "b": 10**6}
    ends = {}
    for pp in (1, 2):
        cfg = DisaggConfig(ep=8 // pp, pp=pp, batch_window_us=0, layer_group=16, server_cache_bytes=10**10,
                           host_bytes=10**10)
        server, clock, _ = sim_server(cfg, sizes)
        server.staged |= {"a", "b"}
        got = []
        server.submit(SimDelta(0, 0, 0.0, ("a",), 2048, 1e-3, got.append))  # layers 0-15: stage 0
        server.submit(SimDelta(1, 1, 0.0, ("b",), 2048, 1e-3, got.append))  # layers 16-31: stage 1 of 2
        ends[pp] = (got, list(server.stage_free))
    (one, free1), (two, free2) = ends[1], ends[2]
    assert one[1] > one[0] and free1[0] > 0  # one stage: the second delta waited for the first
    assert two[1] < one[1] and free2[0] > 0 and free2[1] > 0  # two stages: side by side


# -- the cluster ---------------------------------------------------------------------

def small_workload(n: int, rate: float, adapters: int = 8, seed: int = 3, **kw):
    return generate(WorkloadConfig(num_sessions=n, num_adapters=adapters, arrival=ArrivalConfig("poisson", rate),
                                   first_input=Lengths(64, "uniform"), output=Lengths(24, "uniform"), seed=seed, **kw))


def test_disaggregated_cluster_serves_every_request_and_routes_by_load():
    wl = small_workload(60, 20.0)
    sizes = {a: 10**9 for a in wl.adapters}
    cfg = ClusterConfig("disagg", 10, 2, 64, sim=SimConfig(cache=CacheConfig(policy="slora", host_bytes=0)),
                        disagg=DisaggConfig(server_gpus=2, ep=2, pp=1))
    res = simulate_cluster(wl, MIXTRAL, H20, cfg, sizes)
    assert res.summary["completed"] == 60 and res.stats["instances"] == 4
    assert res.stats["server"]["layers_loaded"] >= 32 and res.stats["server"]["busy_s"] > 0
    # TTFT without prefill is TTFT less the prompt's own prefill time
    ttft = {r.id: r.ttft for r in res.records}
    assert all(q.ttft < ttft[q.id] for q in res.queue_records)
    naive = replace(cfg, disagg=replace(cfg.disagg, overlap=False))
    assert simulate_cluster(wl, MIXTRAL, H20, naive, sizes).summary["tpot_s"]["mean"] > res.summary["tpot_s"]["mean"]


def test_cold_requests_are_each_adapters_first_and_layerwise_loading_shortens_their_first_token():
    """With on-demand loads (no idle prefetch) and requests far apart, a request is cold when its
    adapter was never asked for before; layer-wise loading lets its first layers compute while
    the rest arrive (8 ms to 1 here: the copy, 1 GB over 2 links, is 10 ms)."""
    wl = small_workload(60, 20.0)
    sizes = {a: 10**9 for a in wl.adapters}
    first: dict[str, str] = {}
    for t in sorted(wl.turns, key=lambda t: t.time):
        first.setdefault(t.adapter, t.id)
    cold_ttft = {}
    for layerwise in (True, False):
        d = DisaggConfig(server_gpus=2, ep=2, pp=1, layerwise=layerwise, layer_arrival=layerwise, cache_policy="slora")
        cfg = ClusterConfig("disagg", 10, 2, 64, sim=SimConfig(cache=CacheConfig(policy="slora", host_bytes=0)),
                            disagg=d)
        cluster = Cluster(MIXTRAL, H20, cfg, sizes)
        cluster.run(wl)
        res = cluster.result()
        assert cluster.cold == set(first.values()) and res.stats["cold"]["requests"] == len(first) == 8
        warm = sorted(r.ttft for r in res.queue_records if r.id not in cluster.cold)
        cold_ttft[layerwise] = res.stats["cold"]["median_ttft_s"]
        assert cold_ttft[layerwise] > warm[len(warm) // 2]  # a copy (1 GB over 2 links: 10 ms) is in its wait
    assert cold_ttft[True] < cold_ttft[False] / 4


def test_cluster_spreads_sessions_over_instances():
    wl = small_workload(40, 50.0)
    cfg = ClusterConfig("coupled", 8, 2, 64, sim=SimConfig(cache=CacheConfig(policy="slora")))
    cluster = Cluster(MIXTRAL, H20, cfg, {a: 10**9 for a in wl.adapters})
    cluster.run(wl)
    per = [list(cluster.home.values()).count(i) for i in range(4)]
    assert sum(per) == 40 and min(per) >= 6  # all four used, none starved (load decides, not order)


def test_adapter_aware_routing_sends_turns_to_their_history_and_requests_to_their_adapters():
    """One multi-turn workload on four coupled replicas, each with room for 12 of the 40 adapters:
    affinity sends later turns where their history KV is and first turns where their adapter is,
    so it hits both caches far more often than round robin, which spreads both over all four."""
    wl = small_workload(60, 20.0, adapters=40, seed=4, turns=3.0, think_s=1.0)
    sim = SimConfig(cache=CacheConfig(policy="elora", host_bytes=8 << 30), device_tier_bytes=1 << 30)
    stats = {p: simulate_cluster(wl, model_spec("llama3-8b"), PROFILES["h100"], ClusterConfig(
        "coupled", 4, 1, 16, router=p, sim=sim), {a: 80 << 20 for a in wl.adapters}).stats
        for p in ("affinity", "round-robin")}
    aff, rr = stats["affinity"], stats["round-robin"]
    assert aff["routed"]["session"] >= 0.9 * (len(wl.turns) - 60)  # later turns: home, bar a few past the bound
    assert rr["routed"] == {"session": 0, "adapter": 0, "load": len(wl.turns)}
    assert aff["adapter_hit_rate"] > rr["adapter_hit_rate"] + 0.15  # 0.91 against 0.64
    assert aff["kv_hit_rate"] > rr["kv_hit_rate"] + 0.25  # 0.74 against 0.41


# -- the proof: the simulator's LoRA server decides as the real one ---------------------

def extra_adapters(root, n: int) -> dict[str, str]:
    """n rank-8 adapters on attention and every expert (made once, kept with the tiny model)."""
    from loraserve.demo import make_adapter

    attn = ["q_proj", "k_proj", "v_proj", "o_proj"]
    experts = ["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]
    return {f"x{i}": str(make_adapter(root / "model", root / "adapters-sim" / f"x{i}", 8, 16, attn, False,
                                      seed=100 + i, target_parameters=experts)) for i in range(n)}


def run_disaggregated(root, spec: ModelSpec, paths: dict[str, str], real: bool, wl_seed: int = 5):
    """A small disaggregated workload on virtual time: three instances (the
    engine's scheduler and cache) and a LoRA server whose cache, slot filling
    and batching are the same policy objects either way. Real: the server's are
    a real AdapterStore's (tensors copied, unpacked, computed) and each instance
    runs its forward passes on real weights and KV, its deltas computed by the
    store's kernels when the server runs their batch (`sim/served.py`);
    else: the simulator's models. Returns the decision log, the server, the
    kernels each batch ran and the finished requests."""
    from loraserve.engine.tier_memory import TierMemory
    from loraserve.engine.torch_executor import TorchExecutor
    from loraserve.lora_server.store import AdapterStore
    from loraserve.model.loader import load_model
    from loraserve.remote.config import LoraServerConfig
    from loraserve.sim.served import ServedBackend, ThreadedExecutor, serve_batch

    clock = ManualClock()
    small = CacheConfig(device_bytes=16 << 20, host_bytes=16 << 20)  # (the default arenas would take 3 GiB)
    probe = AdapterStore(spec, LoraServerConfig(model=str(root / "model"), cache=small), clock)
    names = {probe.add(name, path).id: name for name, path in paths.items()}
    sizes = {a: probe.registry.get(a).num_bytes for a in names}
    probe.close()
    block = probe.cache.block_bytes
    device, host = block * (max(sizes.values()) // block + 1) * 3, block * 4096  # room for 3 of the 6 on the device
    hw = replace(H20, pcie_bw=2e6, pcie_latency=1e-3)  # tiny adapters over a slow link: copies take 20-60 ms
    dcfg = DisaggConfig(server_gpus=1, ep=1, pp=1, max_loras=8, layer_arrival=False, layer_group=1,
                        server_cache_bytes=device, host_bytes=host, block_bytes=block)
    store = None
    if real:
        cache = CacheConfig(device_bytes=device, host_bytes=host)
        store = AdapterStore(spec, LoraServerConfig(model=str(root / "model"), max_loras=8, cache=cache), clock)
        for name, path in paths.items():
            store.add(name, path)
    wl = small_workload(40, 40.0, adapters=len(sizes), seed=wl_seed).renamed(list(sizes))
    cfg = ClusterConfig("disagg", 3, 1, 8, sim=SimConfig(cache=CacheConfig(policy="slora", host_bytes=0),
                                                          device_tier_bytes=8 << 20, max_model_len=512),
                        disagg=dcfg)
    cluster = Cluster(spec, hw, cfg, sizes, store=store, clock=clock)
    server = cluster.server
    server.log, server.fill.log, server.cache.log = [], [], []
    for eng in cluster.instances:
        eng.scheduler.log = []
    kernels: list[int] = []
    threaded: list[ThreadedExecutor] = []
    if real:
        metas = {a: store.registry.get(a) for a in sizes}
        for eng in cluster.instances:  # each its own weights and KV: the forward passes run side by side
            memory = TierMemory(spec, eng.cache.num_device_blocks, eng.cache.config.block_size, torch.float32, "cpu")
            backend = ServedBackend(spec, metas)
            executor = TorchExecutor(load_model(root / "model", torch.float32), memory, backend, seed=0)
            threaded.append(ThreadedExecutor(executor, backend))
            eng.executor.inner = threaded[-1]
        server.on_batch = lambda position, batch: kernels.append(serve_batch(
            store, spec, server.layers(position), list(dict.fromkeys(threaded[d.peer].backend for d in batch))))
    try:
        done = cluster.run(wl)
    finally:
        for t in threaded:
            t.close()
        if store is not None:
            store.close()
    assert len(done) == 40
    log = {"instances": [eng.scheduler.log for eng in cluster.instances], "fills": server.fill.log,
           "batches": server.log, "cache": server.cache.log,
           "finished": sorted((r.request_id, r.first_token_time, r.finish_time) for r in done)}
    return log, server, kernels, [(r, names[r.adapter]) for r in done]


def test_the_simulated_lora_server_decides_as_the_real_one(tiny):
    """The same workload through real instances and the real AdapterStore
    (forward passes over real weights and KV; real copies, unpacking, slot
    writes and batched kernels; all paced to modelled times) and through the
    simulator gives identical decision logs: admissions at the instances, every
    layer filled into a slot and when, every batch formed (which instances,
    which adapters), every cache move, and every request's timing. And the
    real run's tokens are the coupled engine's: every delta came from the
    right weights, in the slots at the modelled moment."""
    from loraserve.llm import LLM
    from loraserve.sampling import SamplingParams

    root = tiny("mixtral")
    spec = ModelSpec.from_dir(root / "model")
    paths = extra_adapters(root, 6)
    real_log, real_server, kernels, done = run_disaggregated(root, spec, paths, real=True)
    sim_log, sim_server, _, _ = run_disaggregated(root, spec, paths, real=False)
    assert real_log == sim_log
    # the log is worth comparing: loads per layer, waits, evictions and cross-instance batches happened
    fills = real_log["fills"]
    assert {layers for _, _, _, layers in fills} == {(0,), (1,), (2,)}  # layer-wise: one layer per fill
    assert len({a for _, _, a, _ in fills}) == 6
    assert real_server.fill.counters["layer_waits"] > 0  # deltas waited for weights still travelling
    assert any(e[1] == "move" and e[3] == "host" for e in real_log["cache"])  # device evictions
    assert any(len(set(b[3])) > 1 for b in real_log["batches"])  # one kernel for both instances
    assert all(log and log[0][1] == "admit" for log in real_log["instances"])
    assert len(kernels) == len(real_log["batches"]) and min(kernels) >= 1  # every batch computed real deltas
    misses = ("slot_misses", "layers_loaded", "layer_waits")  # (hits differ: the real kernels asked per projection)
    assert [real_server.fill.counters[k] for k in misses] == [sim_server.fill.counters[k] for k in misses]

    llm = LLM(str(root / "model"), adapters=paths, dtype="float32")
    prompts = [r.prompt_token_ids for r, _ in done]
    sampling = [SamplingParams(max_tokens=r.num_output_tokens, temperature=0.0, ignore_eos=True) for r, _ in done]
    try:
        want = llm.generate(prompts, sampling, [name for _, name in done], use_tqdm=False)
        base = llm.generate(prompts, sampling, None, use_tqdm=False)
    finally:
        llm.engine.close()
    got = [r.output_token_ids for r, _ in done]
    assert got == [w.token_ids for w in want]
    assert sum(g != b.token_ids for g, b in zip(got, base)) >= 0.9 * len(got)  # the deltas do change the tokens


# -- workload, admission order and the named deployments -------------------------------

def test_burstgpt_lengths_follow_the_fitted_lognormals():
    import math
    import random
    import statistics

    from loraserve.workload.burstgpt import BURSTGPT_INPUT, BURSTGPT_OUTPUT, INPUT_LOG_MEAN, OUTPUT_LOG_MEAN

    rng = random.Random(0)
    for lengths, log_mean in ((BURSTGPT_INPUT, INPUT_LOG_MEAN), (BURSTGPT_OUTPUT, OUTPUT_LOG_MEAN)):
        xs = [lengths.sample(rng) for _ in range(4000)]
        assert statistics.median(xs) == pytest.approx(math.exp(log_mean), rel=0.08)
        assert max(xs) == lengths.hi and min(xs) >= 1


def test_shortest_job_first_admits_the_least_work_first():
    from loraserve.cache.mover import LinkMover
    from loraserve.config import SchedulerConfig
    from loraserve.engine.core import EngineCore
    from loraserve.lora.slots import LoraSlots
    from loraserve.request import Request
    from loraserve.sampling import SamplingParams
    from loraserve.sim.paced import NullExecutor

    order = {}
    for how in ("fcfs", "sjf"):
        clock = ManualClock()
        core = EngineCore(CacheConfig(block_size=4, policy="slora"), SchedulerConfig(max_num_seqs=1, order=how), 64,
                          0, 100, 256, clock, LinkMover(clock), NullExecutor(), LoraSlots(4))
        for i, n in enumerate([40, 8, 20]):
            core.scheduler.add(Request(f"r{i}", list(range(n)), SamplingParams(max_tokens=n)))
        admitted = []
        while core.has_unfinished():
            out = core.run_step()
            admitted += [q.request_id for q in out.plan.seqs if q.request_id not in admitted]
            for r in out.touched:
                if r.is_finished:
                    core.forget(r)
        order[how] = admitted
    assert order == {"fcfs": ["r0", "r1", "r2"], "sjf": ["r1", "r2", "r0"]}


def test_named_deployments_share_the_budget_and_climb_the_ladder():
    from loraserve.sim.deployments import deployment

    size = 2 * 10**9
    slora = deployment("slora", MIXTRAL, H20, 64, 2, size)
    less = deployment("slora-less", MIXTRAL, H20, 64, 2, size)
    assert slora.num_instances == 8 and slora.sim.cache.policy == "slora"
    assert less.sim.cache.policy == "vllm" and less.sim.cache.adapter_fraction == 0.4
    assert less.sim.scheduler.max_loras < slora.sim.scheduler.max_loras
    assert deployment("slora-sjf", MIXTRAL, H20, 64, 2, size).sim.scheduler.order == "sjf"
    sync, vllm = (deployment(n, MIXTRAL, H20, 64, 2, size) for n in ("slora-sync", "slora-vllm"))
    assert not slora.sim.blocking_loads and sync.sim.blocking_loads and vllm.sim.blocking_loads
    assert sync.sim.cache.host_bytes == slora.sim.cache.host_bytes >= 512 * size  # every adapter in host memory
    slots = vllm.sim.scheduler.max_loras  # vLLM's CPU LoRA cache defaults to max_loras adapters
    assert slots * size <= vllm.sim.cache.host_bytes < (slots + 1) * size * 1.5
    rungs = [deployment(n, MIXTRAL, H20, 64, 2, size).disagg for n in
             ("disagg-naive", "disagg+overlap", "disagg+loading", "disagg")]
    assert [(d.overlap, d.layerwise, d.kernel_eff == 1.0) for d in rungs] == [
        (False, False, False), (True, False, False), (True, True, False), (True, True, True)]
    assert slora.router == less.router == "least-loaded"  # the comparison's dispatch, whatever ClusterConfig's default
    full = deployment("disagg", MIXTRAL, H20, 64, 2, size)
    assert full.num_instances == 4 and (full.disagg.ep, full.disagg.pp, full.disagg.link) == (4, 2, "ib")
    assert not deployment("disagg-pull", MIXTRAL, H20, 64, 2, size).disagg.push
    with pytest.raises(ValueError, match="unknown deployment"):
        deployment("vllm", MIXTRAL, H20, 64, 2, size)


def test_simulate_cluster_command(capsys):
    import json

    from loraserve.cli import main

    assert main(["simulate", "cluster", "--model", "mixtral-8x7b", "--rate", "4", "--requests", "24",
                 "--deployment", "disagg", "slora", "--server-cache", "100GB", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert set(out["results"]) == {"disagg", "slora"}
    assert out["results"]["disagg"]["instances"] == 4 and out["results"]["slora"]["instances"] == 8
    assert all(0 <= r["p95_ttft_s"] < r["p95_ttft_with_prefill_s"] for r in out["results"].values())
    assert main(["simulate", "cluster", "--model", "llama3-8b", "--rate", "4"]) == 2
    assert main(["simulate", "cluster", "--model", "dbrx", "--rate", "4", "--deployment", "nonesuch"]) == 2


@pytest.mark.parametrize("blocking", [False, True])
def test_a_blocking_load_stalls_every_running_request(blocking):
    """vLLM loads a step's adapters inside the step (`slora-sync`, `slora-vllm`): a decoding
    request waits out another request's adapter read; with loads beside the steps it does not."""
    from loraserve.cache.mover import CopyJob
    from loraserve.sampling import SamplingParams
    from loraserve.sim.engine import SimEngine

    size = 2 * 10**9  # read from disk (no host tier): 1 s at the profile's 2 GB/s
    cfg = SimConfig(cache=CacheConfig(policy="slora", host_bytes=0), blocking_loads=blocking, tp=2)
    eng = SimEngine(MIXTRAL, H20, cfg, {"a": size, "b": size})
    clock = eng.clock

    def step() -> None:
        if eng.run_step().plan.is_empty:  # waiting for a copy: time passes
            clock.advance(max(0.0, (eng.mover.next_finish() or clock.now()) - clock.now()))

    a = eng.add_request(list(range(16)), SamplingParams(max_tokens=40, ignore_eos=True), adapter="a")
    while a.num_output_tokens < 2:
        step()
    eng.add_request(list(range(16)), SamplingParams(max_tokens=4, ignore_eos=True), adapter="b")
    stamps = [clock.now()]
    while a.num_output_tokens < 12:
        step()
        stamps.append(clock.now())
    gaps = [t1 - t0 for t0, t1 in zip(stamps, stamps[1:])]
    load = eng.cost.copy_time(CopyJob(0, "disk", "device", (), (), size, adapter="b"))  # the modelled read
    if blocking:
        assert max(gaps) >= load * 0.99
    else:
        assert max(gaps) < load / 10


# -- steady-state searches and adapter precision ---------------------------------------

def test_a_search_run_stops_once_its_p95_ttft_must_miss():
    """An overloaded run ends as soon as its verdict is sure, with the verdict the whole run
    gives; a run within the SLO is the same watched or not."""
    from loraserve.bench.metrics import SLO

    slo = SLO(0.25, 0.1)
    cfg = ClusterConfig("coupled", 4, 2, 64, router="least-loaded", sim=SimConfig(cache=CacheConfig(policy="slora")))
    heavy = small_workload(300, 400.0)
    sizes = {a: 10**8 for a in heavy.adapters}  # a miss read from disk takes 25 ms
    full = simulate_cluster(heavy, MIXTRAL, H20, cfg, sizes, slo, warmup=0.25)
    early = simulate_cluster(heavy, MIXTRAL, H20, cfg, sizes, slo, warmup=0.25, stop_on_miss=True)
    assert full.summary["meets_slo"] is False and full.stopped_at is None
    assert len(full.records) == 225  # the 300 requests less the first quarter's warm-up
    assert early.summary["meets_slo"] is False and early.stopped_at is not None
    assert len(early.records) < 225 and early.stopped_at < max(r.finish for r in full.records)
    # it stops at the first token that makes one late request more than the P95 allows: the same
    # requests judged, and their lateness computed, as the full run's summary does
    allowed = MissWatch(heavy, slo, 0.25, lambda tokens: 0.0).allowed
    late = sorted(r.first_token for r in full.queue_records if r.ttft > slo.ttft)
    assert len(late) > allowed and early.stopped_at == late[allowed]
    light = small_workload(60, 2.0)
    watched, plain = (simulate_cluster(light, MIXTRAL, H20, cfg, sizes, slo, 0.25, stop_on_miss=s)
                      for s in (True, False))
    assert plain.summary["meets_slo"] and watched.stopped_at is None and watched.summary == plain.summary
    with pytest.raises(ValueError, match="single-turn"):
        simulate_cluster(small_workload(10, 2.0, turns=3), MIXTRAL, H20, cfg, sizes, slo, stop_on_miss=True)


@pytest.mark.parametrize("n", [1, 2, 19, 20, 21, 99, 100, 101, 397])
def test_the_miss_watch_stops_exactly_when_the_p95_must_miss(n):
    """With the misses it allows, some run still meets the P95 (misses just over the bound, the
    rest at 0); one more, and every run misses it (`summarize`'s interpolated percentile)."""
    from loraserve.bench.metrics import SLO, percentile

    watch = MissWatch(small_workload(n, 1.0), SLO(0.5, 1.0), 0.0, lambda tokens: 0.0)
    allowed = watch.allowed
    assert percentile([0.0] * (n - allowed) + [0.5 + 1e-9] * allowed, 95) <= 0.5
    if allowed < n:
        assert percentile([0.0] * (n - allowed - 1) + [0.5 + 1e-9] * (allowed + 1), 95) > 0.5


def test_adapters_kept_in_fp32_cost_twice_the_bytes_and_the_same_flops():
    """InfiniLoRA states one adapter size, Qwen3-30B-A3B's 6.18 GB: its rank-32 expert LoRA at
    4 bytes a weight. The cost model, the server's kernels and the deployments carry it."""
    from loraserve.engine.plan import ScheduledSeq, StepPlan
    from loraserve.sim.cost import StepCost
    from loraserve.sim.deployments import deployment
    from loraserve.sim.models import PAPER_LORA_DTYPE_BYTES, lora_params

    experts = frozenset(t for t in Target if t.is_expert)
    gib = lora_params(model_spec("qwen3-30b-a3b"), 32, experts) * PAPER_LORA_DTYPE_BYTES / 2**30
    assert gib == pytest.approx(6.18, abs=0.01)
    params = lora_params(MIXTRAL, 64)
    plan = StepPlan([ScheduledSeq("r", [0] * 8, 0, [], "a", None)])
    base, bf16, fp32 = (StepCost(MIXTRAL, H20, 2, 2, lora, lora_dtype_bytes=b).work(plan) for lora, b in
                        ((None, None), (lambda a: 2 * params, None), (lambda a: 4 * params, 4)))
    assert fp32.flops == pytest.approx(bf16.flops) and bf16.flops > base.flops
    assert fp32.bytes - base.bytes == pytest.approx(2 * (bf16.bytes - base.bytes))
    trip = next(t for t in model().trips() if t.expert)
    assert model(lora_dtype_bytes=4).compute_time(trip, 1, 32) > model().compute_time(trip, 1, 32)  # weight-bound
    coupled = {b: deployment("slora", MIXTRAL, H20, 64, 2, b * params, lora_dtype_bytes=b) for b in (2, 4)}
    assert coupled[4].sim.lora_dtype_bytes == 4 and coupled[2].sim.lora_dtype_bytes == 2
    assert coupled[4].sim.scheduler.max_loras == coupled[2].sim.scheduler.max_loras // 2 == 11
    assert deployment("disagg", MIXTRAL, H20, 64, 2, 4 * params, lora_dtype_bytes=4).sim.lora_dtype_bytes == 4
