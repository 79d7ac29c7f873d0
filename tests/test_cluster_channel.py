"""The scaled-out endpoint's data path (`loraserve/cluster/channel.py`) on its
own, without Ray: a real engine behind a replica's socket, the endpoint's
channel on the other side of TCP on 127.0.0.1, and the failures the client
relies on it to report (a refusal as the same error, a replica gone before
and after accepting a call, an abort that stops the engine's request).
"""

from __future__ import annotations

import asyncio

import msgpack
import pytest
import zmq
import zmq.asyncio

from loraserve import LLM, SamplingParams
from loraserve.cluster.calls import Refusal
from loraserve.cluster import channel
from loraserve.cluster.channel import LOST, EndpointChannel, ReplicaChannel, Target
from loraserve.engine.async_engine import AsyncEngine
from loraserve.errors import InvalidRequest, Unavailable

PROMPT = "The quick brown fox"
WAIT_S = 60.0
"""Bound on every wait here (a loaded CI box is slow, never this slow)."""


@pytest.fixture(scope="module")
def llm(tiny):
    root = tiny("llama")
    return LLM(str(root / "model"), dtype="float32", adapters={n: str(root / "adapters" / n) for n in ("r4", "r8")})


def run(llm, body) -> None:
    """`body(engine client, replica channel, endpoint channel)` on a fresh event loop; everything closed after."""
    async def main() -> None:
        client = AsyncEngine(llm.engine)
        replica = ReplicaChannel(client, "127.0.0.1", sessions.append)
        endpoint = EndpointChannel()
        try:
            await asyncio.wait_for(body(client, replica, endpoint), WAIT_S)
        finally:
            endpoint.shutdown()
            replica.close()
            client.shutdown()

    sessions: list[str] = []
    asyncio.run(main())
    return sessions


LONG = SamplingParams(max_tokens=500, temperature=0.0, ignore_eos=True)
"""Far longer than any check here takes: the request is still running when the test acts on it."""


async def streaming(endpoint: EndpointChannel, replica: ReplicaChannel, request_id: str):
    """A long request accepted by the replica, its first output received: a call mid-stream."""
    call = await endpoint.open(Target("one", replica.address, "load"), [(PROMPT, LONG, None, request_id)], None)
    assert await call.answer is None
    assert not (await call.queues[0].get()).finished
    return call


async def until(condition) -> None:
    """Poll `condition` (the body's own deadline, WAIT_S, bounds it)."""
    while not condition():
        await asyncio.sleep(0.05)


async def drain(q: asyncio.Queue) -> list:
    """Outputs until the finished one, or the error that ended the choice."""
    items = []
    while True:
        item = await q.get()
        items.append(item)
        if isinstance(item, Exception) or item.finished:
            return items


def test_two_choices_stream_back_the_engines_own_tokens_and_the_session_is_reported(llm):
    greedy = SamplingParams(max_tokens=8, temperature=0.0)
    want = {a: llm.generate(PROMPT, greedy, adapter=a)[0].token_ids for a in ("r4", "r8")}

    async def body(client, replica, endpoint):
        got = {}
        for adapter in ("r4", "r8"):
            specs = [(PROMPT, greedy, adapter, f"{adapter}-{i}") for i in range(2)]
            call = await endpoint.open(Target("one", replica.address, "load"), specs, "session-7")
            assert await call.answer is None
            for q in call.queues:
                outs = await drain(q)
                assert outs[-1].finished and outs[-1].adapter == adapter
                assert [t for o in outs for t in o.new_token_ids] == outs[-1].token_ids
                got.setdefault(adapter, []).append(outs[-1].token_ids)
            endpoint.close(call)
        assert got == {a: [want[a], want[a]] for a in want}
        assert client.num_unfinished() == 0

    assert run(llm, body) == ["session-7", "session-7"]


def test_a_refusal_crosses_as_data_and_nothing_is_left_running(llm):
    async def body(client, replica, endpoint):
        stray = zmq.asyncio.Context.instance().socket(zmq.DEALER)  # junk first: it must not stop the channel
        stray.setsockopt(zmq.LINGER, 0)
        stray.connect(replica.address)
        for junk in ([b"\xc1not msgpack"], [b"two", b"frames"], [msgpack.packb([1, [2], None])],
                     [msgpack.packb([0, 5, {"specs": 3}])]):
            await stray.send_multipart(junk)
        internal = await stray.recv()  # the last one was well formed but for its specs: an internal error
        assert msgpack.unpackb(internal)[:2] == [3, 5]
        stray.close()
        assert not replica.task.done()
        call = await endpoint.open(Target("one", replica.address, "load"),
                                   [(PROMPT, SamplingParams(max_tokens=4), "nope", "x-0")], None)
        answer = await call.answer
        assert isinstance(answer, Refusal) and answer.kind == "UnknownModel" and "nope" in answer.message
        assert not endpoint.calls and client.num_unfinished() == 0

    run(llm, body)


def test_an_abort_or_a_vanished_endpoint_stops_the_request_on_the_replica(llm):
    async def body(client, replica, endpoint):
        endpoint.abort(await streaming(endpoint, replica, "long-0"))
        await until(lambda: client.num_unfinished() == 0 and not replica.calls)
        # an endpoint that goes away without a word: the replica aborts its calls at its next send
        await streaming(endpoint, replica, "long-2")
        endpoint.shutdown()
        await until(lambda: client.num_unfinished() == 0 and not replica.calls)

    run(llm, body)


def test_a_replica_gone_ends_its_accepted_streams_and_loses_calls_it_never_took(llm):
    async def body(client, replica, endpoint):
        call = await streaming(endpoint, replica, "long-1")
        replica.close()  # its socket closes, as a killed process's would
        outs = await drain(call.queues[0])
        assert isinstance(outs[-1], Unavailable)
        endpoint.close(call)  # as the client does once its streams end
        assert endpoint.down() == {"one"}
        late = await endpoint.open(Target("one", replica.address, "load"), [(PROMPT, LONG, None, "late")], None)
        assert await late.answer is LOST  # the client sends it elsewhere
        fresh = await endpoint.open(Target("two", replica.address, "load"), [(PROMPT, LONG, None, "fresh")], None)
        assert await fresh.answer is LOST  # a new link to where nobody listens: connecting is refused
        assert endpoint.down() == {"one", "two"} and not endpoint.calls
        await until(lambda: client.num_unfinished() == 0)  # the closing replica aborted what it ran

    run(llm, body)


def test_a_request_too_big_for_the_channel_is_refused_before_it_is_sent(llm, monkeypatch):
    """A replica drops a link that brings a message over its limit, and every call on it with the link:
    the endpoint refuses such a request itself (400). Choices share their prompt in the message."""
    monkeypatch.setattr(channel, "MAX_MESSAGE_BYTES", 3 << 10)
    greedy = SamplingParams(max_tokens=2, temperature=0.0)
    shared = "word " * 300  # 1,500 characters: four choices of it fit in 3 KiB only if sent once

    async def body(client, replica, endpoint):
        with pytest.raises(InvalidRequest, match="MiB on the way to a replica"):
            await endpoint.open(Target("one", replica.address, "load"),
                                [(shared + str(i), greedy, None, f"big-{i}") for i in range(2)], None)
        call = await endpoint.open(Target("one", replica.address, "load"),
                                   [(shared, greedy, None, f"shared-{i}") for i in range(4)], None)
        assert await call.answer is None
        for q in call.queues:
            assert (await drain(q))[-1].finished
        endpoint.close(call)
        assert endpoint.down() == set() and not endpoint.calls

    run(llm, body)
