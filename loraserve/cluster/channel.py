"""The data path between the endpoint and its replicas: requests and their
streamed outputs over ZeroMQ, beside Ray rather than through it.

Ray places, supervises and restarts the replicas, and carries what is not on
a request's path: adapter loads, stats, the replicas' routing reports. A
request takes this channel because a Serve call costs 5-8 ms on a busy CPU host
(its send half alone about 5), more than the endpoint may add to a TTFT. Each
replica binds one ROUTER socket on its node's address and reports it with its
residency; the endpoint keeps one DEALER per replica. Messages are msgpack,
never pickle: a replica's port accepts nothing that can run code.

A message is [op, call, payload]:
- endpoint → replica: SUBMIT {"specs", "session"}; ABORT (the client went away).
- replica → endpoint: ACCEPTED, or REFUSED [kind, message, field]; then OUT
  [[choice, kind, item], ...] until every choice has ended, where an item is
  an output, or a refusal that ends that choice (unloaded meanwhile).

A replica's death is seen at the socket: ZeroMQ reports the disconnect (the
kernel closes a killed process's connections at once; heartbeats find a lost
node within HEARTBEAT_TIMEOUT_MS). A call not yet accepted there is answered
LOST, for the client to send elsewhere; an accepted one's choices end with
Unavailable (a stream's 503 error event).
"""

from __future__ import annotations

import asyncio
import itertools
import logging
from dataclasses import dataclass, field

import msgpack
import zmq
import zmq.asyncio
from zmq.utils.monitor import recv_monitor_message

from loraserve.cluster.calls import Refusal, answer, as_error
from loraserve.engine.async_engine import AsyncEngine, RequestSpec
from loraserve.engine.output import RequestOutput
from loraserve.errors import Unavailable
from loraserve.sampling import SamplingParams

log = logging.getLogger(__name__)

SUBMIT, ABORT, ACCEPTED, REFUSED, OUT = range(5)
OUTPUT, ENDING = 0, 1
"""An OUT item's kind: a RequestOutput, or the Refusal that ends its choice."""

HEARTBEAT_IVL_MS, HEARTBEAT_TIMEOUT_MS = 2000, 10_000
LOST = object()
"""A call's answer when its replica went away before accepting it."""


def _pack(op: int, call: int, payload=None) -> bytes:
    return msgpack.packb([op, call, payload], use_bin_type=True)


def _unpack(data: bytes) -> list:
    return msgpack.unpackb(data, raw=False, strict_map_key=False)  # top_logprobs are keyed by token id


# -- the replica's side ------------------------------------------------------------


class ReplicaChannel:
    """A replica's socket: runs each call on the engine client, on the event loop it is made on."""

    def __init__(self, client: AsyncEngine, host: str, on_session) -> None:
        """`on_session(key)`: a request of that session was accepted here (the replica reports them)."""
        self.client, self.on_session = client, on_session
        self.ctx = zmq.asyncio.Context()
        self.sock = self.ctx.socket(zmq.ROUTER)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.address = f"tcp://{host}:{self.sock.bind_to_random_port(f'tcp://{host}')}"
        self.calls: dict[tuple[bytes, int], asyncio.Task] = {}
        self.task = asyncio.get_running_loop().create_task(self._serve())

    async def _serve(self) -> None:
        while True:
            frames = await self.sock.recv_multipart()
            try:
                peer, data = frames
                op, call, payload = _unpack(data)
                if not isinstance(call, int):
                    raise TypeError("a call id is an integer")
            except Exception:  # whoever sent it, it must not stop the channel
                log.warning("replica: a malformed message on the data path was dropped")
                continue
            if op == SUBMIT:
                task = asyncio.create_task(self._run(peer, call, payload))
                self.calls[peer, call] = task
                task.add_done_callback(lambda _, key=(peer, call): self.calls.pop(key, None))
            elif op == ABORT and (peer, call) in self.calls:
                self.calls[peer, call].cancel()  # the streams' own cleanup aborts the requests

    async def _send(self, peer: bytes, op: int, call: int, payload=None) -> None:
        await self.sock.send_multipart([peer, _pack(op, call, payload)])

    async def _run(self, peer: bytes, call: int, payload: dict) -> None:
        try:
            specs = [(prompt, SamplingParams(**params), adapter, rid) for prompt, params, adapter, rid
                     in payload["specs"]]
            streams = await self.client.submit(specs)
        except Exception as e:
            r = answer(e)
            await self._send(peer, REFUSED, call, [r.kind, r.message, r.field])
            return
        if payload.get("session") is not None:
            self.on_session(payload["session"])
        await self._send(peer, ACCEPTED, call)
        queue: asyncio.Queue = asyncio.Queue()

        async def pump(i: int, stream) -> None:
            try:
                async for out in stream:
                    queue.put_nowait([i, OUTPUT, vars(out)])
            except Exception as e:  # unloaded meanwhile, the engine stopped: this choice's ending
                r = answer(e)
                queue.put_nowait([i, ENDING, [r.kind, r.message, r.field]])
            finally:
                queue.put_nowait(None)

        tasks = [asyncio.create_task(pump(i, s)) for i, s in enumerate(streams)]
        try:
            left = len(tasks)
            while left:
                batch = [await queue.get()]
                while not queue.empty():  # what came meanwhile goes in the same message
                    batch.append(queue.get_nowait())
                left -= batch.count(None)
                items = [item for item in batch if item is not None]
                if items:
                    await self._send(peer, OUT, call, items)
        finally:  # cancelled (the client went away): the streams' own cleanup aborts their requests
            for t in tasks:
                t.cancel()

    def close(self) -> None:
        self.task.cancel()
        for t in list(self.calls.values()):
            t.cancel()
        self.ctx.destroy(linger=0)


# -- the endpoint's side -----------------------------------------------------------


@dataclass(eq=False)
class Call:
    """One request (its n choices) on one replica."""

    id: int
    replica: str
    queues: list[asyncio.Queue]
    answer: asyncio.Future
    """None once accepted; a Refusal; or LOST."""


@dataclass(eq=False)
class _Link:
    sock: zmq.asyncio.Socket
    tasks: list[asyncio.Task] = field(default_factory=list)
    calls: set[int] = field(default_factory=set)
    lost: bool = False


class EndpointChannel:
    """The endpoint's links to its replicas, made on first use on the server's event loop."""

    def __init__(self) -> None:
        self.ctx = zmq.asyncio.Context()
        self.links: dict[str, _Link] = {}
        self.calls: dict[int, Call] = {}
        self._ids = itertools.count()

    def down(self) -> set[str]:
        """Replicas whose link is lost: not to be chosen."""
        return {r for r, link in self.links.items() if link.lost}

    async def open(self, replica: str, address: str, specs: list[RequestSpec], session: str | None) -> Call:
        """Send the request; its answer (`Call.answer`) and outputs (`Call.queues`) follow."""
        link = self.links.get(replica) or self._connect(replica, address)
        call = Call(next(self._ids), replica, [asyncio.Queue() for _ in specs],
                    asyncio.get_running_loop().create_future())
        if link.lost:  # chosen before the loss was seen
            call.answer.set_result(LOST)
            return call
        self.calls[call.id] = call
        link.calls.add(call.id)
        specs_out = [[prompt, vars(params), adapter, rid] for prompt, params, adapter, rid in specs]
        await link.sock.send(_pack(SUBMIT, call.id, {"specs": specs_out, "session": session}))
        return call

    def abort(self, call: Call) -> None:
        """The client went away: the replica stops the call."""
        link = self.links.get(call.replica)
        self.close(call)
        if link is not None and not link.lost:
            link.sock.send(_pack(ABORT, call.id))

    def close(self, call: Call) -> None:
        self.calls.pop(call.id, None)
        link = self.links.get(call.replica)
        if link is not None:
            link.calls.discard(call.id)

    def forget(self, live: set[str]) -> None:
        """Close the links of replicas no longer in the deployment (after their calls have ended)."""
        for replica in [r for r, link in self.links.items() if r not in live and not link.calls]:
            self._drop(replica)

    def shutdown(self) -> None:
        for replica in list(self.links):
            self._drop(replica)
        self.ctx.destroy(linger=0)  # the monitors' sockets too (their tasks may not run again)

    def _connect(self, replica: str, address: str) -> _Link:
        sock = self.ctx.socket(zmq.DEALER)
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.HEARTBEAT_IVL, HEARTBEAT_IVL_MS)
        sock.setsockopt(zmq.HEARTBEAT_TIMEOUT, HEARTBEAT_TIMEOUT_MS)
        monitor = sock.get_monitor_socket(zmq.EVENT_HANDSHAKE_SUCCEEDED | zmq.EVENT_DISCONNECTED
                                          | zmq.EVENT_CONNECT_RETRIED)
        sock.connect(address)
        link = self.links[replica] = _Link(sock)
        link.tasks = [asyncio.create_task(self._read(link)), asyncio.create_task(self._watch(replica, link, monitor))]
        return link

    def _drop(self, replica: str) -> None:
        link = self.links.pop(replica)
        self._lose(link)
        for t in link.tasks:
            t.cancel()
        link.sock.disable_monitor()
        link.sock.close()

    async def _read(self, link: _Link) -> None:
        while True:
            op, call_id, payload = _unpack(await link.sock.recv())
            call = self.calls.get(call_id)
            if call is None:  # aborted meanwhile
                continue
            if op == ACCEPTED and not call.answer.done():
                call.answer.set_result(None)
            elif op == REFUSED and not call.answer.done():
                call.answer.set_result(Refusal(*payload))
                self.close(call)
            elif op == OUT:
                for i, kind, item in payload:
                    call.queues[i].put_nowait(RequestOutput(**item) if kind == OUTPUT else as_error(Refusal(*item)))

    async def _watch(self, replica: str, link: _Link, monitor: zmq.asyncio.Socket) -> None:
        try:
            while True:
                event = (await recv_monitor_message(monitor))["event"]
                if event == zmq.EVENT_HANDSHAKE_SUCCEEDED:
                    link.lost = False
                elif not link.lost:
                    log.warning("the data path to replica %s is lost (%s)", replica, zmq.Event(event).name)
                    self._lose(link)
        finally:
            monitor.close()

    def _lose(self, link: _Link) -> None:
        """The replica is gone: its calls not yet accepted are LOST (sent elsewhere), the rest end."""
        link.lost = True
        for call in [self.calls[c] for c in link.calls if c in self.calls]:
            if not call.answer.done():
                call.answer.set_result(LOST)
                self.close(call)
            else:
                lost = Unavailable("the replica serving this request stopped; retry it")
                for q in call.queues:
                    q.put_nowait(lost)
