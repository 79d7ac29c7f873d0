"""The NIXL transport: the LoRA server writes each pushed delta straight into
the instance's memory (a one-sided WRITE plus a notification), instead of
sending it over ZeroMQ.

Requests, control messages and errors still travel over ZeroMQ (the server's
one socket). With `RemoteLoraConfig.transport = "nixl"` (push mode only: pull
stays on ZeroMQ):

1. The instance registers a receive arena with NIXL once (`NixlArena`: host
   memory here; a device arena would register the same way) and sends a
   `nixl` message on its delta socket: its agent metadata (base64) and the
   arena's (address, bytes, device). The server loads the metadata
   (`NixlWriter.register`) and answers; a server without NIXL answers 501.
2. Each delta names `at`, the offset in the arena where its result must land.
3. The server computes, copies the rows into its registered staging ring, and
   posts a WRITE to (arena + at) whose notification is the message id. A
   result it cannot write (no registration: it restarted; no room) goes back
   over ZeroMQ as before, so the instance always polls both.
4. The instance's `wait` polls notifications for its id, then reads the
   delta from the arena (`NixlArena.take`) and frees the region after use.

A late write (for a request the instance gave up on) must not land in a
region in use again: after a timeout, the instance re-registers before its
next step, and the server, on a registration, drops that instance's pending
deltas and finishes its writes in flight before it answers. An arena whose
fence was not answered is never freed (`_ORPHANS`).

`nixl` is imported on first use: the package works without it
(`pip install 'loraserve[nixl]'`, after the pinned torch).
"""

from __future__ import annotations

import base64
import importlib
import logging
import os
import time
import uuid
from collections import deque

import torch

from loraserve.remote.protocol import Message, ProtocolError
from loraserve.remote.transport import ClientSocket, Unreachable

log = logging.getLogger(__name__)

ALIGN = 64
STAGING_BYTES = 64 << 20
"""The server's registered staging ring: results in flight over NIXL at once (a bigger one travels over ZeroMQ)."""

YIELD_S = 5e-3
"""No wakeup comes with a notification (NIXL's Python API has no file descriptor
to block on), so `wait` polls: for this long it yields the CPU between polls
(`sched_yield`: the server may need the core), then sleeps 50 us between them.
On 2 busy cores, pure spinning made round trips 10x slower and sleeping 2-3x."""

_ORPHANS: list[tuple] = []
"""Arenas a server may still write into (their fence went unanswered): kept alive, never reused."""


class NixlUnavailable(RuntimeError):
    """The nixl package is not installed (or its UCX backend does not start)."""


def nixl_module():
    """The nixl API module (`nixl`, or the CUDA-specific wheel it wraps), imported on first use."""
    os.environ.setdefault("NIXL_LOG_LEVEL", "WARN")
    errors = []
    for name in ("nixl", "nixl_cu13", "nixl_cu12"):
        try:
            mod = importlib.import_module(name)
        except ImportError as e:
            errors.append(str(e))
            continue
        if hasattr(mod, "nixl_agent"):
            return mod
    raise NixlUnavailable("the NIXL transport needs the nixl package: pip install 'loraserve[nixl]' "
                          f"(after the pinned torch); {errors[-1] if errors else 'no nixl_agent in it'}")


def _agent(name: str):
    mod = nixl_module()
    try:  # no progress thread: on few cores it competes with the polling thread (~100x slower round trips)
        return mod.nixl_agent(name, mod.nixl_agent_config(enable_prog_thread=False, backends=["UCX"]))
    except Exception as e:
        raise NixlUnavailable(f"NIXL could not start its UCX backend: {type(e).__name__}: {e}") from None


def _aligned(n: int) -> int:
    return (n + ALIGN - 1) // ALIGN * ALIGN


class NixlArena:
    """An instance's receive arena: registered once, a region per delta in flight."""

    def __init__(self, nbytes: int, device: str = "cpu") -> None:
        self.agent = _agent(f"loraserve-instance-{uuid.uuid4().hex[:12]}")
        self.buf = torch.zeros(nbytes, dtype=torch.uint8, device=device)
        self.reg = self.agent.register_memory(self.buf)
        self.head = 0
        self.regions: dict[int, tuple[int, int]] = {}
        """Message id → (offset, bytes) of results in flight or not yet read."""
        self.done: set[int] = set()
        """Ids whose notification came."""
        self.written = 0
        """Results that came by NIXL (for tests and benchmarks)."""
        self.unplaced = 0
        """Results that found no room in the arena (they came over ZeroMQ)."""

    def hello(self) -> dict:
        """The fields of the `nixl` registration message."""
        dev = self.buf.get_device()
        return {"agent": base64.b64encode(self.agent.get_agent_metadata()).decode(),
                "arena": [self.buf.data_ptr(), self.buf.numel(), max(dev, 0)],
                "memory": "DRAM" if dev < 0 else "VRAM"}

    def alloc(self, msg_id: int, nbytes: int) -> int | None:
        """The offset where message `msg_id`'s result is to land, or None (no room: it comes over ZeroMQ)."""
        n = _aligned(nbytes)
        at = self.head if self.head + n <= self.buf.numel() else 0
        if n > self.buf.numel() or any(at < off + size and off < at + n for off, size in self.regions.values()):
            self.unplaced += 1
            return None
        self.regions[msg_id] = (at, n)
        self.head = at + n
        return at

    def poll(self, msg_id: int) -> bool:
        """Whether `msg_id`'s result has landed (reads new notifications)."""
        if msg_id not in self.done:
            for notes in self.agent.get_new_notifs().values():
                for note in notes:
                    try:
                        self.done.add(int(note))
                    except ValueError:
                        log.warning("a NIXL notification that is not a message id: %r", note[:40])
        return msg_id in self.done

    def take(self, msg_id: int, dtype: torch.dtype, shape: list[int]) -> torch.Tensor:
        """The landed result (a view into the arena: valid until `release`)."""
        at, _ = self.regions[msg_id]
        n = shape[0] * shape[1] * dtype.itemsize
        self.written += 1
        return self.buf[at:at + n].view(dtype).view(shape)

    def release(self, msg_id: int) -> None:
        self.regions.pop(msg_id, None)
        self.done.discard(msg_id)

    def reset(self) -> None:
        """Forget every region (after the server fenced its writes to us)."""
        self.regions.clear()
        self.done.clear()
        self.head = 0

    def close(self, fenced: bool) -> None:
        """Deregister; an arena the server may still write into is kept alive instead."""
        if fenced:
            self.agent.deregister_memory(self.reg)
        else:
            _ORPHANS.append((self.agent, self.buf))


def wait_result(sock: ClientSocket, arena: NixlArena, msg_id: int, dtype: torch.dtype, shape: list[int],
                timeout_s: float) -> Message:
    """The result of `msg_id`: a NIXL notification (the result is then in the
    arena), or a ZeroMQ reply (an error, or a result the server did not write).
    Raises `Unreachable` after `timeout_s`."""
    if msg_id not in arena.regions:  # no room was found for it: it comes over ZeroMQ
        return sock.recv(timeout_s, want_id=msg_id)
    start = time.monotonic()
    while True:
        if arena.poll(msg_id):
            return Message({"kind": "result", "id": msg_id}, [arena.take(msg_id, dtype, shape)])
        if sock.sock.poll(0):
            try:
                return sock.recv(0.001, want_id=msg_id)
            except Unreachable:
                pass  # a stale reply to an earlier request: dropped
        waited = time.monotonic() - start
        if waited > timeout_s:
            raise Unreachable(f"the LoRA server at {sock.endpoint} did not answer within {timeout_s:g} s")
        if waited < YIELD_S:
            os.sched_yield()
        else:
            time.sleep(50e-6)


class NixlWriter:
    """The server's side: registered instances, a staging ring, writes in flight."""

    def __init__(self, name: str) -> None:
        self.agent = _agent(name)
        self.staging = torch.empty(STAGING_BYTES, dtype=torch.uint8)
        self.agent.register_memory(self.staging)
        self.peers: dict[bytes, tuple[str, int, int, int, str]] = {}
        """ZeroMQ peer → (agent name, arena address, bytes, device, memory type)."""
        self.inflight: deque[list] = deque()
        """[handle, start, end, peer, id, done] in posting order (the ring frees from the front)."""
        self.head = 0
        self.writes = 0
        self.bytes_out = 0

    @property
    def busy(self) -> bool:
        return bool(self.inflight)

    def register(self, peer: bytes, h: dict) -> dict:
        """Load an instance's metadata (or forget it: `close`); first finish every write to it."""
        self.fence(peer)
        old = self.peers.pop(peer, None)
        if old is not None and old[0] not in {p[0] for p in self.peers.values()}:
            self.agent.remove_remote_agent(old[0])
        if h.get("close"):
            return {}
        arena, memory = h.get("arena"), h.get("memory")
        if (not isinstance(arena, list) or len(arena) != 3 or not all(isinstance(v, int) and v >= 0 for v in arena)
                or memory not in ("DRAM", "VRAM") or not isinstance(h.get("agent"), str)):
            raise ProtocolError("a nixl registration needs 'agent' (base64 metadata), 'arena' [address, bytes, "
                                "device] and 'memory' (DRAM or VRAM)")
        try:
            name = self.agent.add_remote_agent(base64.b64decode(h["agent"], validate=True))
        except Exception as e:
            raise ProtocolError(f"the instance's NIXL metadata was refused: {type(e).__name__}: {e}") from None
        self.peers[peer] = (name.decode() if isinstance(name, bytes) else name, *arena, memory)
        return {"agent": self.agent.name}

    def write(self, peer: bytes, msg_id: int, y: torch.Tensor, at: int) -> bool:
        """Post the write of `y` to offset `at` of the peer's arena, notifying `msg_id`;
        False if it cannot go this way (not registered, out of the arena, no room)."""
        target = self.peers.get(peer)
        n = y.numel() * y.element_size()
        if target is None or not 0 <= at <= target[2] - n:
            return False
        start = self._alloc(_aligned(n))
        if start is None:
            return False
        self.staging[start:start + n].view(y.dtype).view(y.shape).copy_(y)
        name, addr, _, dev, memory = target
        try:
            local = self.agent.get_xfer_descs([(self.staging.data_ptr() + start, n, 0)], "DRAM")
            remote = self.agent.get_xfer_descs([(addr + at, n, dev)], memory)
            handle = self.agent.initialize_xfer("WRITE", local, remote, name, str(msg_id).encode())
            state = self.agent.transfer(handle)
        except Exception as e:  # e.g. the instance is gone: the ZeroMQ reply is the fallback
            log.warning("a NIXL write to %s failed: %s: %s", name, type(e).__name__, e)
            state, handle = "ERR", None
        if state == "ERR":
            if handle is not None:
                self.agent.release_xfer_handle(handle)
            self.head = start  # give the room back
            return False
        self.inflight.append([handle, start, start + _aligned(n), peer, msg_id, state])
        self.writes += 1
        self.bytes_out += n
        return True

    def progress(self) -> list[tuple[bytes, int]]:
        """Advance writes in flight; returns (peer, id) of those that failed."""
        failed = []
        for item in self.inflight:
            if item[5] == "PROC":
                item[5] = self.agent.check_xfer_state(item[0])
            if item[5] == "ERR" and item[4] is not None:
                failed.append((item[3], item[4]))
                item[4] = None
        while self.inflight and self.inflight[0][5] != "PROC":
            self.agent.release_xfer_handle(self.inflight.popleft()[0])
        if not self.inflight:
            self.head = 0
        else:  # the instance's progress completes them: let it have the core
            os.sched_yield()
        return failed

    def fence(self, peer: bytes | None = None, timeout_s: float = 5.0) -> None:
        """Wait until no write (to `peer`, or to anyone) is in flight."""
        deadline = time.monotonic() + timeout_s
        while any(peer is None or item[3] == peer for item in self.inflight if item[5] == "PROC"):
            self.progress()
            if time.monotonic() > deadline:
                log.warning("NIXL writes still in flight after %g s", timeout_s)
                return

    def _alloc(self, n: int) -> int | None:
        self.progress()
        size = self.staging.numel()
        if n > size:
            return None
        tail = self.inflight[0][1] if self.inflight else None
        if tail is None or self.head >= tail:  # free: [head, size) and [0, tail)
            if self.head + n <= size:
                start = self.head
            elif n < (tail if tail is not None else size + 1):
                start = 0
            else:
                return None
        elif self.head + n < tail:  # free: [head, tail)
            start = self.head
        else:
            return None
        self.head = start + n
        return start

    def close(self) -> None:
        self.fence()


def register(sock: ClientSocket, arena: NixlArena, msg_id: int, timeout_s: float, close: bool = False) -> Message:
    """Send the arena's registration (or its withdrawal) on the delta socket and
    return the reply; a successful one also fences: the server has finished every
    write to us, so every region is free again."""
    sock.send({"kind": "nixl", "id": msg_id, **({"close": True} if close else arena.hello())})
    msg = sock.recv(timeout_s, want_id=msg_id)
    if msg.kind != "error":
        arena.reset()
    return msg
