"""Moving messages between instances and the LoRA server, behind one small interface.

The default transport is ZeroMQ (works everywhere: TCP or IPC): the server
binds a ROUTER socket, each instance connects DEALER sockets, and a message is
multipart frames (`remote/protocol.py`). The interface is shaped for a
one-sided transport later (NIXL, RDMA): an instance `register`s the buffer a
result is to land in, keyed by the request's id, and the server's reply is
written straight into it (here `recv_into`, with no intermediate copy; with
RDMA, a one-sided write plus a notification). The NIXL backend
(`remote/nixl_transport.py`) keeps these sockets for requests and errors and
moves pushed results by one-sided writes into a registered arena.
"""

from __future__ import annotations

import json
import os
import time

import torch
import zmq

from loraserve.remote.protocol import NAMES, PROTOCOL_VERSION, Message, ProtocolError, decode, encode

_CTX: zmq.Context | None = None
_CTX_PID = 0


def context() -> zmq.Context:
    """One ZeroMQ context per process (a forked child makes its own)."""
    global _CTX, _CTX_PID
    if _CTX is None or _CTX_PID != os.getpid():
        _CTX, _CTX_PID = zmq.Context(), os.getpid()
    return _CTX


ZERO_COPY_BYTES = 64 << 10
"""Frames at least this big are sent without a copy; smaller ones are copied,
which is cheaper than the bookkeeping a zero-copy frame costs (tens of us)."""


def send_frames(sock: zmq.Socket, frames: list, flags: int = 0) -> None:
    """A multipart message, each frame copied or not by its size."""
    last = len(frames) - 1
    for i, frame in enumerate(frames):
        size = frame.nbytes if isinstance(frame, memoryview) else len(frame)
        sock.send(frame, flags | (zmq.SNDMORE if i < last else 0), copy=size < ZERO_COPY_BYTES)


class Unreachable(ConnectionError):
    """The peer did not answer in time (or cannot be sent to)."""


class ServerSocket:
    """The LoRA server's end: messages from any number of instances."""

    def __init__(self, endpoint: str, max_message_bytes: int = -1) -> None:
        """`max_message_bytes`: a peer sending a larger message is disconnected
        before ZeroMQ allocates it (-1: no limit)."""
        self.sock = context().socket(zmq.ROUTER)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.setsockopt(zmq.MAXMSGSIZE, max_message_bytes)
        self.sock.setsockopt(zmq.ROUTER_MANDATORY, 0)  # a reply to a vanished instance is dropped
        if endpoint.startswith("tcp://") and endpoint.endswith(":0"):
            endpoint = endpoint[:-2] + ":*"  # ZeroMQ spells "any free port" this way
        self.sock.bind(endpoint)
        self.endpoint = self.sock.getsockopt_string(zmq.LAST_ENDPOINT)
        """Where it listens, with the port filled in when bound to port 0 or '*'."""
        self.bytes_in = 0
        self.bytes_out = 0

    def poll(self, timeout_s: float) -> bool:
        return bool(self.sock.poll(max(0, int(timeout_s * 1000))))

    def recv(self) -> tuple[bytes, list] | None:
        """(peer, raw frames) of the next message, or None if none is waiting."""
        try:
            frames = self.sock.recv_multipart(zmq.NOBLOCK, copy=False)
        except zmq.Again:
            return None
        self.bytes_in += sum(len(f.buffer) for f in frames[1:])
        return frames[0].bytes, [f.buffer for f in frames[1:]]

    def send(self, peer: bytes, frames: list) -> None:
        self.bytes_out += sum(memoryview(f).nbytes for f in frames)
        send_frames(self.sock, [peer, *frames])

    def close(self) -> None:
        self.sock.close(0)


class ClientSocket:
    """An instance's end. Not thread-safe: one per thread that talks to the server."""

    def __init__(self, endpoint: str) -> None:
        self.endpoint = endpoint
        self.sock = context().socket(zmq.DEALER)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.setsockopt(zmq.IMMEDIATE, 1)  # no queueing for a server that is not there
        self.sock.setsockopt(zmq.RECONNECT_IVL, 100)
        self.sock.setsockopt(zmq.RECONNECT_IVL_MAX, 1000)
        self.sock.connect(endpoint)
        self.buffers: dict[int, torch.Tensor] = {}
        """Registered landing buffers of results in flight, by message id."""

    def send(self, header: dict, tensors: list[torch.Tensor] = (), timeout_s: float = 1.0) -> None:
        """Send, waiting at most `timeout_s` for a connection to the server."""
        frames = encode(header, tensors)
        if self.sock.poll(int(timeout_s * 1000), zmq.POLLOUT):
            try:
                send_frames(self.sock, frames, zmq.NOBLOCK)
                return
            except zmq.Again:
                pass
        raise Unreachable(f"the LoRA server at {self.endpoint} is not connected")

    def register(self, msg_id: int, buffer: torch.Tensor) -> None:
        """Where the result of message `msg_id` is to land (a contiguous CPU tensor)."""
        self.buffers[msg_id] = buffer

    def recv(self, timeout_s: float, want_id: int | None = None) -> Message:
        """The next reply (the one for `want_id` if given: stale replies, e.g. to
        a request that timed out earlier, are dropped). A result for a
        registered id lands in its buffer, returned as the message's tensor."""
        deadline = _now() + timeout_s
        while True:
            left = deadline - _now()
            if left <= 0 or not self.sock.poll(int(left * 1000) + 1):
                raise Unreachable(f"the LoRA server at {self.endpoint} did not answer within {timeout_s:g} s")
            head = self.sock.recv(copy=False)
            frames = [head.buffer]
            try:
                msg = self._read(frames)
            except ProtocolError:
                continue  # a reply we cannot parse is no answer to anything
            if want_id is None or msg.header.get("id") == want_id:
                return msg

    def _read(self, frames: list) -> Message:
        """The rest of a multipart message whose header is frames[0]: a result
        whose buffer was registered is received straight into it."""
        try:
            header = json.loads(bytes(frames[0]))
        except ValueError:
            header = None
        buffer = self.buffers.get(header.get("id")) if isinstance(header, dict) else None
        specs = header.get("tensors") if buffer is not None else None
        if (buffer is not None and header.get("kind") == "result" and header.get("v") == PROTOCOL_VERSION
                and isinstance(specs, list) and len(specs) == 1 and specs[0] == [NAMES[buffer.dtype],
                                                                                 list(buffer.shape)]
                and self.sock.getsockopt(zmq.RCVMORE)):
            del self.buffers[header["id"]]
            view = buffer.view(torch.int16) if buffer.dtype == torch.bfloat16 else buffer
            n = self.sock.recv_into(memoryview(view.numpy()).cast("B"))
            extra = self._drain()
            if n != buffer.numel() * buffer.element_size() or extra:
                raise ProtocolError("a result of the wrong size")
            return Message(header, [buffer])
        frames.extend(f.buffer for f in self._drain())
        return decode(frames)

    def _drain(self) -> list:
        rest = []
        while self.sock.getsockopt(zmq.RCVMORE):
            rest.append(self.sock.recv(copy=False))
        return rest

    def close(self) -> None:
        self.sock.close(0)


def _now() -> float:
    return time.monotonic()
