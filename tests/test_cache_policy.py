"""The tiered cache manager's invariants under random operation sequences, for every policy."""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from loraserve.cache import POLICIES, LinkMover, Readiness, TieredCacheManager
from loraserve.cache.tree import Kind, Tier
from loraserve.clock import ManualClock
from loraserve.config import CacheConfig
from loraserve.request import Request
from loraserve.sampling import SamplingParams

BS = 4
BLOCK_BYTES = 1000
ADAPTERS = {f"a{i}": (3 + i % 4) * BLOCK_BYTES - 10 for i in range(6)}  # 3..6 blocks each
CONVERSATIONS = [[100 * c + t for t in range(40)] for c in range(5)]


class Harness:
    """Drives the manager the way the scheduler does, with a link-speed mover on a manual clock."""

    def __init__(self, policy: str, device_blocks: int = 40, host_blocks: int = 60, remote: tuple[str, ...] = (),
                 **config) -> None:
        self.clock = ManualClock()
        self.mover = LinkMover(self.clock, bytes_per_s=1e6)
        cfg = CacheConfig(block_size=BS, policy=policy, swap_interval=0.0, **config)
        self.cache = TieredCacheManager(cfg, device_blocks, host_blocks, BLOCK_BYTES, self.clock, self.mover)
        for key, size in ADAPTERS.items():
            self.cache.add_adapter(key, size)
        for key in remote:
            self.cache.add_remote_adapter(key)
        self.running: list[Request] = []
        self.pending: list[Request] = []
        self.n = 0
        self.max_invalid = 0.0

    def new(self, adapter: str | None, conv: int, length: int) -> None:
        self.n += 1
        req = Request(f"r{self.n}", CONVERSATIONS[conv][:length], SamplingParams(), adapter=adapter)
        self._prepare(req)

    def _prepare(self, req: Request) -> None:
        state = self.cache.prepare(req)
        if state is Readiness.WAITING:
            self.pending.append(req)
        elif state is Readiness.READY:
            assert req.num_computed_tokens % BS == 0 and req.num_computed_tokens < req.num_tokens
            assert len(req.block_ids) == req.num_computed_tokens // BS
            self.running.append(req)

    def progress(self, i: int, k: int) -> None:
        if not self.running:
            return
        req = self.running[i % len(self.running)]
        k = max(1, min(k, req.num_tokens - req.num_computed_tokens))
        if not self.cache.can_allocate(req, k):
            self.preempt(i)
            return
        self.cache.allocate(req, k)
        req.num_computed_tokens += k
        if req.num_computed_tokens == req.num_tokens:
            req.output_token_ids.append(7000 + len(req.output_token_ids))
        self.cache.commit(req)

    def finish(self, i: int) -> None:
        if self.running:
            self.cache.free(self.running.pop(i % len(self.running)))

    def preempt(self, i: int) -> None:
        if self.running:
            req = self.running.pop(i % len(self.running))
            self.cache.free(req)
            req.num_computed_tokens = 0
            self._prepare(req)

    def advance(self, dt: float) -> None:
        self.clock.advance(dt)
        self.cache.tick(len(self.running))
        waiting, self.pending = self.pending, []
        for req in waiting:
            self._prepare(req)

    def check(self) -> None:
        self.cache.check()
        self.max_invalid = max(self.max_invalid, self.cache.invalid_kv_fraction())
        for req in self.running:
            assert req.num_computed_tokens <= len(req.block_ids) * BS


op = st.one_of(
    st.tuples(st.just("new"), st.sampled_from([None, *ADAPTERS]), st.integers(0, 4), st.integers(1, 40)),
    st.tuples(st.just("progress"), st.integers(0, 20), st.integers(1, 12)),
    st.tuples(st.just("finish"), st.integers(0, 20)),
    st.tuples(st.just("preempt"), st.integers(0, 20)),
    st.tuples(st.just("advance"), st.sampled_from([0.0, 0.001, 0.01, 0.5, 5.0])),
)


@pytest.mark.parametrize("policy", list(POLICIES))
@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(ops=st.lists(op, max_size=80), host=st.sampled_from([0, 12, 60]))
def test_invariants_hold_after_every_operation(policy, ops, host):
    h = Harness(policy, host_blocks=host)
    for name, *args in ops:
        getattr(h, name)(*args)
        h.check()
    for req in h.running + h.pending:
        h.cache.free(req)
    h.running, h.pending = [], []
    h.check()
    assert h.cache.blocks[(Tier.DEVICE, "running_kv")] == 0 and h.cache.num_running_private() == 0
    if POLICIES[policy].dependency:
        assert h.max_invalid == 0.0


def churn(policy: str) -> Harness:
    """Five conversations on six adapters, turn after turn, with idle gaps, in a
    device pool that holds only a few adapters and their history at once."""
    h = Harness(policy, device_blocks=24, host_blocks=200, adapter_fraction=0.3)
    for turn in range(6):
        for conv in range(5):
            adapter = f"a{(conv + turn) % 6}" if turn % 2 else f"a{conv}"
            h.new(adapter, conv, 8 + 6 * turn)
            for _ in range(3):
                h.advance(0.05)
            while h.running:
                h.progress(0, 8)
                if h.running and h.running[0].num_output_tokens:
                    h.finish(0)
                h.check()
            for _ in range(3):
                h.advance(0.05)
                h.check()
    return h


def test_invalid_kv_is_zero_for_elora_and_not_for_static_split_or_wom():
    """WOM's invalid KV here comes from idle prefetch: a history block fits in
    the room left where its adapter does not, and without the rule that swap-ins
    start at host roots it goes up alone."""
    assert churn("elora").max_invalid == 0.0
    assert churn("vllm").max_invalid > 0.0
    assert churn("elora-wom").max_invalid > 0.0


def admit(h: Harness, adapter: str | None, conv: int, length: int) -> Request:
    h.new(adapter, conv, length)
    while not h.running:  # adapter copies land
        h.advance(0.01)
    return h.running[-1]


def test_second_turn_reuses_its_prefix_only_under_its_adapter():
    h = Harness("elora")
    req = admit(h, "a0", 0, 22)
    while not req.num_output_tokens:
        h.progress(0, 8)
    h.finish(0)
    assert admit(h, "a1", 0, 22).num_computed_tokens == 0  # same tokens, other adapter: nothing to reuse
    h.finish(0)
    assert admit(h, "a0", 0, 30).num_computed_tokens == 20  # next turn: the first turn's 5 full blocks
    stats = h.cache.stats()
    assert stats["kv_hit_tokens"] == 20 and stats["adapter_misses"] == 2 and stats["adapter_hits"] == 1


def converse(h: Harness, conv: int) -> None:
    """One 40-token base-model turn of a conversation, run to its first output token."""
    h.new(None, conv, 40)
    while h.running:
        h.progress(0, 12)
        if h.running[0].num_output_tokens:
            h.finish(0)


def test_idle_prefetch_brings_host_adapters_back_and_busy_evicts_down_to_target():
    h = Harness("elora", device_blocks=40)
    assert h.cache.num_loras[Tier.DEVICE] == 0
    h.advance(0.01)  # idle: prefetch up to the 70% target (28 of 40 blocks)
    h.advance(1.0)
    assert h.cache.usage()["used"] <= 28
    assert h.cache.num_loras[Tier.DEVICE] >= 5
    for conv in range(4):  # fill the pool with history KV
        converse(h, conv)
    h.advance(0.01)
    h.advance(1.0)
    assert h.cache.usage()["used"] <= 0.8 * 40
    h.check()


def test_host_full_drops_cold_kv_but_keeps_adapters():
    h = Harness("elora", device_blocks=40, host_blocks=30)  # adapters take 27 host blocks
    for conv in range(5):
        converse(h, conv)
        h.advance(0.01)
        h.advance(1.0)
        h.check()
    adapters = [n for n in h.cache.tree.adapters.values() if n.kind is Kind.LORA and n.key != "base"]
    assert all(n.tier is not Tier.DISK for n in adapters)
    assert h.cache.counters["dropped_bytes"] > 0


REMOTE = ("r0", "r1")
remote_op = st.one_of(
    st.tuples(st.just("new"), st.sampled_from([None, "a0", "a1", *REMOTE]), st.integers(0, 4), st.integers(1, 40)),
    op,
)


@pytest.mark.parametrize("policy", ["elora", "elora-wom", "vllm", "slora"])
@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(ops=st.lists(remote_op, max_size=80), host=st.sampled_from([0, 12, 60]))
def test_invariants_hold_with_remote_adapters(policy, ops, host):
    """Adapters served elsewhere, mixed with local ones: their KV follows every rule."""
    h = Harness(policy, host_blocks=host, remote=REMOTE)
    for name, *args in ops:
        getattr(h, name)(*args)
        h.check()
        for key in REMOTE:
            node = h.cache.tree.adapters[key]
            assert node.tier is Tier.DEVICE and not node.blocks and not node.in_transfer


def test_remote_adapter_keys_kv_under_it_with_no_local_blocks():
    h = Harness("elora", remote=("r0",))
    used, loras = h.cache.usage()["used"], dict(h.cache.num_loras)
    req = Request("remote", CONVERSATIONS[0][:22], SamplingParams(), adapter="r0")
    assert h.cache.prepare(req) is Readiness.READY  # nothing to copy first
    assert h.cache.stats()["pending_transfers"] == 0 and h.cache.counters["swap_in_bytes"] == 0
    assert h.cache.usage()["used"] == used and dict(h.cache.num_loras) == loras
    h.running.append(req)
    while not req.num_output_tokens:
        h.progress(0, 8)
    h.finish(0)
    h.check()
    kv = h.cache.tree.subtree(h.cache.tree.adapters["r0"])[:-1]
    assert len(kv) == 5 and all(n.adapter == "r0" and n.tier is Tier.DEVICE for n in kv)
    assert h.cache.bytes_by_kind()["device_bytes_adapters"] == 0  # counted: KV only
    assert admit(h, "a1", 0, 22).num_computed_tokens == 0  # same tokens, other adapter: nothing to reuse
    h.finish(0)
    assert admit(h, None, 0, 22).num_computed_tokens == 0  # nor the base model
    h.finish(0)
    assert admit(h, "r0", 0, 30).num_computed_tokens == 20  # its own next turn reuses its history
    h.finish(0)
    stats = h.cache.stats()
    assert stats["adapter_misses"] == 1 and stats["adapter_hits"] == 0  # a1 alone took a local slot
    h.advance(0.01)  # the swapper runs; the remote adapter is never a candidate
    h.advance(1.0)
    assert h.cache.tree.adapters["r0"] not in h.cache.tree.device_leaves
    h.cache.remove_adapter("r0")
    assert "r0" not in h.cache.tree.adapters
    h.check()


def test_block_pool_hands_out_never_used_ids_first_then_freed_ones_in_order():
    """The pool keeps its never-used ids as a range and its used ones as a byte each (a
    simulated host tier is millions of blocks); the order and the checks are a free list's."""
    from loraserve.cache.block_pool import BlockPool

    pool = BlockPool(6, first=10)
    a = pool.allocate(4)
    assert a == [10, 11, 12, 13] and (pool.num_used, pool.num_free) == (4, 2)
    pool.free([12, 10])
    assert pool.allocate(3) == [14, 15, 12] and pool.allocate(1) == [10]
    assert (pool.num_used, pool.num_free) == (6, 0)
    with pytest.raises(MemoryError):
        pool.allocate(1)
    pool.free([11])
    for bad in ([11], [9], [16], [13, 13]):
        with pytest.raises(ValueError, match="freed but not in use"):
            pool.free(bad)
    with pytest.raises(ValueError):
        pool.allocate(-1)
    assert pool.num_used + pool.num_free == pool.num_blocks and pool.allocate(0) == []
    big = BlockPool(50_000_000)  # a simulated host tier: no list of 50M ids
    assert big.allocate(2) == [0, 1] and big.num_free == 49_999_998
