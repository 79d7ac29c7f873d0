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
- endpoint → replica: SUBMIT {"prompts", "specs", "session"} (each prompt once,
  however many choices share it); ABORT (the client went away).
- replica → endpoint: ACCEPTED, or REFUSED [kind, message, field]; then OUT
  [[choice, kind, item], ...] until every choice has ended, where an item is
  an output, or a refusal that ends that choice (unloaded meanwhile).

A replica's death is seen at the socket: ZeroMQ reports the disconnect (the
kernel closes a killed process's connections at once; heartbeats find a lost
node within HEARTBEAT_TIMEOUT_MS). A call not yet accepted there is answered
LOST, for the client to send elsewhere; an accepted one's choices end with
Unavailable (a stream's 503 error event). The lost link is closed at once, so
a request queued on it is never delivered after it went elsewhere. The other
way round, a replica whose endpoint has gone finds out at its next send
(ROUTER_MANDATORY) and aborts that endpoint's calls.

Nothing is dropped for want of room (no high-water mark: a slow reader makes
the sender wait, never lose an output). The socket takes no credentials:
like Ray's own ports, it is for the cluster's private network.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import time
from dataclasses import dataclass, field
from typing import NamedTuple

import msgpack
import zmq
import zmq.asyncio
from zmq.utils.monitor import recv_monitor_message

from loraserve.cluster.calls import Refusal, answer, as_error
from loraserve.engine.async_engine import AsyncEngine, RequestSpec
from loraserve.engine.output import RequestOutput
from loraserve.errors import InvalidRequest, Unavailable
from loraserve.remote.transport import context
from loraserve.sampling import SamplingParams

log = logging.getLogger(__name__)

SUBMIT, ABORT, ACCEPTED, REFUSED, OUT = range(5)
OUTPUT, ENDING = 0, 1
"""An OUT item's kind: a RequestOutput, or the Refusal that ends its choice."""

HEARTBEAT_IVL_MS, HEARTBEAT_TIMEOUT_MS = 2000, 10_000
"""The endpoint pings each replica; either side drops a link silent for the timeout (a lost node, a
partition), and a connect that has not completed by then counts as refused."""

RECONNECT_IVL_MS = 30_000
"""ZeroMQ would reconnect a dropped link by itself and send what it queued: a request the client has
meanwhile sent elsewhere. The link is closed on loss long before this."""
MAX_MESSAGE_BYTES = 64 << 20
"""A replica disconnects a peer that sends more (a request is a prompt and its sampling parameters)."""

LOST_HOLD_S = 10.0
"""How long a replica whose link was lost is not chosen; after that a new link may try it again."""

LOST = object()
"""A call's answer when its replica went away before accepting it."""


def _pack(op: int, call: int, payload=None) -> bytes:
    return msgpack.packb([op, call, payload], use_bin_type=True)


def _unpack(data: bytes) -> list:
    return msgpack.unpackb(data, raw=False, strict_map_key=False)  # top_logprobs are keyed by token id


def _refused(e: Exception) -> list:
    """The Refusal a replica answers for `e` (`calls.answer`), as it travels."""
    r = answer(e)
    return [r.kind, r.message, r.field]


def _socket(kind: int) -> zmq.asyncio.Socket:
    """A socket of the process's one ZeroMQ context (`remote.transport.context`), for this event loop."""
    sock = zmq.asyncio.Context.shadow(context()).socket(kind)
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.SNDHWM, 0)
    sock.setsockopt(zmq.RCVHWM, 0)
    return sock


# -- the replica's side ------------------------------------------------------------


class ReplicaChannel:
    """A replica's socket: runs each call on the engine client, on the event loop it is made on."""

    def __init__(self, client: AsyncEngine, host: str, on_session) -> None:
        """`on_session(key)`: a request of that session was accepted here (the replica reports them)."""
        self.client, self.on_session = client, on_session
        self.sock = _socket(zmq.ROUTER)
        self.sock.setsockopt(zmq.ROUTER_MANDATORY, 1)  # a send to a vanished endpoint fails, not vanishes
        self.sock.setsockopt(zmq.MAXMSGSIZE, MAX_MESSAGE_BYTES)
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
                self.calls[peer, call].cancel()

    async def _send(self, peer: bytes, op: int, call: int, payload=None) -> None:
        await self.sock.send_multipart([peer, _pack(op, call, payload)])

    async def _run(self, peer: bytes, call: int, payload: dict) -> None:
        try:
            prompts = payload["prompts"]
            specs = [(prompts[p], SamplingParams(**params), adapter, rid) for p, params, adapter, rid
                     in payload["specs"]]
            session = payload.get("session")
            if session is not None and not isinstance(session, str):
                raise TypeError("a session key is a string")
            streams = await self.client.submit(specs)
        except asyncio.CancelledError:  # aborted while it was being taken: whatever it queued goes too
            for _, _, _, rid in specs:
                self.client.abort(rid)
            raise
        except Exception as e:
            try:
                await self._send(peer, REFUSED, call, _refused(e))
            except zmq.ZMQError:  # its endpoint has gone meanwhile
                pass
            return
        queue: asyncio.Queue = asyncio.Queue()

        async def pump(i: int, stream) -> None:
            try:
                async for out in stream:
                    queue.put_nowait([i, OUTPUT, vars(out)])
            except Exception as e:  # unloaded meanwhile, the engine stopped: this choice's ending
                queue.put_nowait([i, ENDING, _refused(e)])
            finally:
                queue.put_nowait(None)

        tasks: list[asyncio.Task] = []
        try:
            if session is not None:
                self.on_session(session)
            await self._send(peer, ACCEPTED, call)
            tasks = [asyncio.create_task(pump(i, s)) for i, s in enumerate(streams)]
            left = len(tasks)
            while left:
                batch = [await queue.get()]
                while not queue.empty():  # what came meanwhile goes in the same message
                    batch.append(queue.get_nowait())
                left -= batch.count(None)
                items = [item for item in batch if item is not None]
                if items:
                    await self._send(peer, OUT, call, items)
        except zmq.ZMQError as e:  # the endpoint has gone (EHOSTUNREACH): nobody reads these any more
            log.warning("replica: call %d's endpoint is gone (%s); aborting it", call, e)
        except Exception as e:  # a bug: the endpoint's streams must still end
            ending = _refused(e)
            try:
                await self._send(peer, OUT, call, [[i, ENDING, ending] for i in range(len(specs))])
            except Exception:
                pass
        finally:  # ended, cancelled (ABORT) or its endpoint gone: what still runs is aborted, started or not
            for t in tasks:
                t.cancel()
            for _, _, _, rid in specs:
                self.client.abort(rid)  # a no-op for those that finished

    def close(self) -> None:
        self.task.cancel()
        for t in list(self.calls.values()):
            t.cancel()
        self.sock.close()


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
    monitor: zmq.asyncio.Socket
    tasks: list[asyncio.Task] = field(default_factory=list)
    calls: set[int] = field(default_factory=set)
    lost_at: float | None = None


class Target(NamedTuple):
    """Where the router sends a request, and why (one of `loraserve.router.REASONS`)."""

    replica: str
    address: str
    reason: str


class EndpointChannel:
    """The endpoint's links to its replicas, made on first use on the server's event loop."""

    def __init__(self) -> None:
        self.links: dict[str, _Link] = {}
        self.calls: dict[int, Call] = {}
        self._ids = itertools.count()

    def down(self) -> set[str]:
        """Replicas whose link was lost in the last LOST_HOLD_S: not to be chosen."""
        now = time.monotonic()
        for replica in [r for r, link in self.links.items() if link.lost_at and now - link.lost_at > LOST_HOLD_S]:
            del self.links[replica]  # already closed: the next request there makes a new link
        return {r for r, link in self.links.items() if link.lost_at is not None}

    async def open(self, target: Target, specs: list[RequestSpec], session: str | None) -> Call:
        """Send the request; its answer (`Call.answer`) and outputs (`Call.queues`) follow."""
        link = self.links.get(target.replica) or self._connect(target.replica, target.address)
        call = Call(next(self._ids), target.replica, [asyncio.Queue() for _ in specs],
                    asyncio.get_running_loop().create_future())
        if link.lost_at is not None:  # chosen before the loss was seen
            call.answer.set_result(LOST)
            return call
        index: dict[int, int] = {}  # a prompt object's position in the message (n choices share one)
        for prompt, _, _, _ in specs:
            index.setdefault(id(prompt), len(index))
        prompts = list({id(prompt): prompt for prompt, _, _, _ in specs}.values())
        message = _pack(SUBMIT, call.id, {"prompts": prompts, "session": session, "specs": [
            [index[id(prompt)], vars(params), adapter, rid] for prompt, params, adapter, rid in specs]})
        if len(message) > MAX_MESSAGE_BYTES:  # the replica would drop the link, and every call on it
            raise InvalidRequest("prompt", f"the request comes to {len(message) / 2**20:.1f} MiB on the way to a "
                                 f"replica, over the limit of {MAX_MESSAGE_BYTES / 2**20:.0f} MiB: fewer prompts or choices")
        self.calls[call.id] = call
        link.calls.add(call.id)
        await link.sock.send(message)
        return call

    def abort(self, call: Call) -> None:
        """The client went away: the replica stops the call (on the event loop)."""
        link = self.links.get(call.replica)
        self.close(call)
        if link is not None and link.lost_at is None:
            link.sock.send(_pack(ABORT, call.id))

    def close(self, call: Call) -> None:
        self.calls.pop(call.id, None)
        link = self.links.get(call.replica)
        if link is not None:
            link.calls.discard(call.id)

    def forget(self, live: set[str]) -> None:
        """Close the links of replicas no longer in the deployment (after their calls have ended)."""
        for replica in [r for r, link in self.links.items() if r not in live and not link.calls]:
            self._lose(self.links.pop(replica))

    def shutdown(self) -> None:
        """Close every link, with or without a running event loop (the server's may be gone): no message is
        sent, no future settled; the replicas abort what they ran for us at their next send."""
        for link in self.links.values():
            try:
                link.sock.disable_monitor()
                link.monitor.close()
                link.sock.close()
            except Exception as e:
                log.warning("closing the data path: %s", e)
        self.links.clear()

    def _connect(self, replica: str, address: str) -> _Link:
        sock = _socket(zmq.DEALER)
        sock.setsockopt(zmq.HEARTBEAT_IVL, HEARTBEAT_IVL_MS)
        sock.setsockopt(zmq.HEARTBEAT_TIMEOUT, HEARTBEAT_TIMEOUT_MS)
        sock.setsockopt(zmq.HEARTBEAT_TTL, HEARTBEAT_TIMEOUT_MS)  # the replica's side drops us when we go silent
        sock.setsockopt(zmq.CONNECT_TIMEOUT, HEARTBEAT_TIMEOUT_MS)
        sock.setsockopt(zmq.RECONNECT_IVL, RECONNECT_IVL_MS)
        monitor = sock.get_monitor_socket(zmq.EVENT_DISCONNECTED | zmq.EVENT_CONNECT_RETRIED)
        sock.connect(address)
        link = self.links[replica] = _Link(sock, monitor)
        link.tasks = [asyncio.create_task(self._read(link)), asyncio.create_task(self._watch(replica, link))]
        return link

    async def _read(self, link: _Link) -> None:
        try:
            while True:
                self._deliver(await link.sock.recv())
        except asyncio.CancelledError:
            raise
        except Exception:  # the socket failed under us: the link is as good as lost
            log.exception("the data path's reader stopped")
            self._lose(link)

    def _deliver(self, data: bytes) -> None:
        try:
            op, call_id, payload = _unpack(data)
            call = self.calls.get(call_id)
        except Exception:
            log.error("a malformed message from a replica was dropped")
            return
        if call is None:  # aborted meanwhile
            return
        try:
            if op == ACCEPTED and not call.answer.done():
                call.answer.set_result(None)
            elif op == REFUSED and not call.answer.done():
                call.answer.set_result(Refusal(*payload))
                self.close(call)
            elif op == OUT:
                for i, kind, item in payload:
                    call.queues[i].put_nowait(RequestOutput(**item) if kind == OUTPUT else as_error(Refusal(*item)))
        except Exception as e:  # a replica of another version, or a bug: this call ends, the link goes on
            log.exception("a message for call %d could not be read", call_id)
            failed = RuntimeError(f"a replica's answer could not be read ({type(e).__name__})")
            if not call.answer.done():
                call.answer.set_result(Refusal("Internal", str(failed)))
            else:
                for q in call.queues:
                    q.put_nowait(failed)
            self.abort(call)  # the replica stops generating what nobody can read

    async def _watch(self, replica: str, link: _Link) -> None:
        event = (await recv_monitor_message(link.monitor))["event"]
        log.warning("the data path to replica %s is lost (%s)", replica, zmq.Event(event).name)
        self._lose(link)

    def _lose(self, link: _Link) -> None:
        """The replica is gone (or forgotten): its calls not yet accepted are LOST (sent elsewhere), the
        rest end; the socket closes, dropping whatever it still queued."""
        if link.lost_at is not None:
            return
        link.lost_at = time.monotonic()
        sync = zmq.Socket.shadow(link.sock.underlying)
        while True:  # what the replica sent before it went (a call it finished, a last output) still counts
            try:
                self._deliver(sync.recv(zmq.NOBLOCK))
            except zmq.ZMQError:
                break
        for call in [self.calls[c] for c in link.calls if c in self.calls]:
            if not call.answer.done():
                call.answer.set_result(LOST)
                self.close(call)
            else:
                lost = Unavailable("the replica serving this request stopped; retry it")
                for q in call.queues:
                    q.put_nowait(lost)
        current = asyncio.current_task()
        for t in link.tasks:
            if t is not current:
                t.cancel()
        link.sock.disable_monitor()
        link.monitor.close()
        link.sock.close()
