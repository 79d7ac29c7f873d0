"""The routing policy on its own: plain Python over reported loads (loraserve/router)."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from loraserve.router import Bound, Choice, InstanceLoad, Router


def test_least_loaded_picks_fewest_requests_then_fewest_tokens():
    loads = [InstanceLoad(3, 900), InstanceLoad(1, 5000), InstanceLoad(1, 200), InstanceLoad(2, 0)]
    assert Router("least-loaded").pick(loads, "a") == Choice(2, "load")
    assert Router("least-tokens").pick(loads, "a") == Choice(3, "load")
    assert Router("least-loaded").pick([InstanceLoad(0), InstanceLoad(0)]).index == 0  # ties: the lowest index


def test_round_robin_takes_turns_whatever_the_load():
    router = Router("round-robin")
    loads = [InstanceLoad(9, adapters=frozenset({"a"})), InstanceLoad(0), InstanceLoad(0)]
    assert [router.pick(loads, "a").index for _ in range(5)] == [0, 1, 2, 0, 1]


def test_affinity_prefers_session_then_adapter_then_load():
    loads = [InstanceLoad(1), InstanceLoad(2, adapters=frozenset({"a"})),
             InstanceLoad(3, adapters=frozenset({"a"}), sessions=frozenset({"s"}))]
    router = Router("affinity")
    assert router.pick(loads, "a", "s") == Choice(2, "session")  # 3 <= 1 + 2
    assert router.pick(loads, "a", "t") == Choice(1, "adapter")  # the less loaded warm one
    assert router.pick(loads, "a") == Choice(1, "adapter")
    assert router.pick(loads, "b", "t") == Choice(0, "load")
    assert router.pick(loads, None) == Choice(0, "load")


def test_among_warm_instances_the_one_it_went_to_last_keeps_the_adapter():
    loads = [InstanceLoad(0, adapters=frozenset({"a"})), InstanceLoad(1, adapters=frozenset({"a"}), recent={"a"})]
    assert Router().pick(loads, "a") == Choice(1, "adapter")  # not flipped to the less loaded, within the bound
    assert Router().pick(loads, "b") == Choice(0, "load")
    loads = [InstanceLoad(0, adapters=frozenset({"a"})), InstanceLoad(3, adapters=frozenset({"a"}), recent={"a"})]
    assert Router().pick(loads, "a") == Choice(0, "adapter")  # past the bound: balance wins


def test_affinity_falls_back_past_the_imbalance_bound():
    loads = [InstanceLoad(1), InstanceLoad(4, adapters=frozenset({"a"}), sessions=frozenset({"s"}))]
    assert Router("affinity").pick(loads, "a", "s") == Choice(0, "load")  # 4 > 1 + 2
    assert Router("affinity", Bound(slack=3)).pick(loads, "a", "s") == Choice(1, "session")
    # at high load the bound grows with it: 25% of 40 is 10
    loads = [InstanceLoad(40), InstanceLoad(50, adapters=frozenset({"a"}))]
    assert Router("affinity").pick(loads, "a") == Choice(1, "adapter")
    assert Router("affinity").pick([InstanceLoad(40), InstanceLoad(51, adapters=frozenset({"a"}))], "a").index == 0


def test_bad_policy_bound_or_no_instance_is_refused():
    with pytest.raises(ValueError, match="unknown routing policy 'random'"):
        Router("random")
    with pytest.raises(ValueError, match="non-negative"):
        Bound(slack=-1)
    with pytest.raises(ValueError, match="no instance"):
        Router().pick([], "a")


@settings(max_examples=200, deadline=None)
@given(n=st.integers(2, 6), slack=st.integers(0, 4),
       ops=st.lists(st.tuples(st.booleans(), st.integers(0, 3), st.integers(0, 5)), min_size=1, max_size=300))
def test_a_hot_adapter_never_pushes_load_past_the_bound(n, slack, ops):
    """Whatever mix of arrivals (one hot adapter, a few sessions) and departures,
    an instance the policy sends a request to holds at most the least loaded
    one's requests plus the bound, and every instance the hot adapter warms
    stays within reach: load never piles up on the warm ones alone."""
    bound = Bound(slack=slack, ratio=0.0)
    router = Router("affinity", bound)
    requests = [0] * n
    adapters: list[set[str]] = [set() for _ in range(n)]
    sessions: list[set[str]] = [set() for _ in range(n)]
    for arrive, session, leave in ops:
        if not arrive:
            requests[leave % n] = max(0, requests[leave % n] - 1)
            continue
        loads = [InstanceLoad(requests[i], 0, frozenset(adapters[i]), frozenset(sessions[i])) for i in range(n)]
        i = router.pick(loads, "hot", f"s{session}").index
        assert requests[i] <= min(requests) + slack
        requests[i] += 1
        adapters[i].add("hot")
        for s in sessions:
            s.discard(f"s{session}")
        sessions[i].add(f"s{session}")
