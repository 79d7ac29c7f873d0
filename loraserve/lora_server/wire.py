"""Messages between the ranks of a parallel LoRA server, over torch.distributed.

Rank 0 (the front) talks to each other rank point to point; other ranks only
ever answer rank 0. A message is a fixed int64 header ([HEADER] numbers: an
op or status code, then its fields) and at most one payload: the payload's
tensors packed into one byte tensor, each 8-byte aligned, whose layout the
receiver derives from the header. So a delta request is two messages and its
answer two (one if not ready), whatever the number of tensors, and nothing is
pickled. Control messages carry JSON bytes.

The process group is built directly (`ProcessGroupGloo`, or `ProcessGroupNCCL`
on CUDA with a GPU per rank) over a TCPStore on rank 0's address (127.0.0.1
when the ranks are its own processes, its node's address when they are Ray
actors that may sit on other nodes), not as the process-wide default group: a process may hold several servers (the tests do).
Two properties of gloo shape the rest: a send completes only once the peer
has posted the matching receive, and a posted receive cannot be polled
(`is_completed` stays false until it is waited on). So a rank > 0 blocks in
a receive between messages (its idle work runs on another thread), and
every wait is bounded by the group's timeout; a timed-out or closed pair
breaks the group, which is then fatal (rank 0 pings idle ranks, so only a
silent peer times out).
"""

from __future__ import annotations

import datetime
import json
import math
import socket

import torch
import torch.distributed as dist

from loraserve.model.targets import Target

HEADER = 8

# ops, rank 0 → rank
DELTA = 1
"""[DELTA, layer, target index, rows, id bytes, has expert]; payload: row_adapter
int64[rows], (expert int64[rows],) x [rows, in], adapter ids ("\\n"-joined)."""
CALL = 2
"""[CALL, bytes]; payload: a JSON request (load, unload, stats). Answered."""
TELL = 3
"""[TELL, bytes]; payload: a JSON notice (hint). Not answered."""
PING = 4
"""Keeps an idle pair alive. Not answered."""
STOP = 5
"""Exit. Not answered."""

# statuses, rank → rank 0
OK = 0
"""[OK, ...]; payload: the delta [rows, out], or JSON bytes ([OK, bytes]) for a CALL."""
NOT_READY = 1
"""The rank's weights for this layer are not in a slot yet: ask again later."""
FAILED = 2
"""[FAILED, HTTP-like status, bytes]; payload: the message (UTF-8)."""


TARGETS = list(Target)
"""A target's number in a header."""


def rank_device(device: str, rank: int) -> torch.device:
    """A rank's device: on CUDA, one GPU per rank (counting from the given one)."""
    dev = torch.device(device)
    if dev.type != "cuda" or not torch.cuda.is_available():
        return dev
    return torch.device("cuda", ((dev.index or 0) + rank) % torch.cuda.device_count())


def rendezvous(timeout_s: float, host: str = "127.0.0.1") -> dist.TCPStore:
    """Rank 0's store, listening on a free port of `host` (`.port`)."""
    sock = socket.socket()
    sock.bind((host, 0))
    sock.listen(64)
    port = sock.getsockname()[1]
    return dist.TCPStore(host, port, None, True, timeout=datetime.timedelta(seconds=timeout_s),
                         wait_for_workers=False, master_listen_fd=sock.detach())


def join(host: str, port: int, timeout_s: float) -> dist.TCPStore:
    """Another rank's handle on rank 0's store."""
    return dist.TCPStore(host, port, None, False, timeout=datetime.timedelta(seconds=timeout_s))


class Channel:
    """Headers and payloads to and from the peers of one process group.

    NCCL when every rank has its own GPU among those this process sees (the
    local launcher's ranks see them all; a Ray actor sees only its own, so Ray's
    ranks take gloo), tensors then travelling from device memory; otherwise gloo (tensors travel from host memory) over `host`, this rank's
    address as the others reach it."""

    def __init__(self, store: dist.Store, rank: int, world: int, device: torch.device, timeout_s: float,
                 host: str = "127.0.0.1") -> None:
        timeout = datetime.timedelta(seconds=timeout_s)
        store = dist.PrefixStore("group", store)
        if device.type == "cuda" and torch.cuda.device_count() >= world:
            opts = dist.ProcessGroupNCCL.Options()
            opts._timeout = timeout
            self.group = dist.ProcessGroupNCCL(store, rank, world, opts)
            self.device = device
        else:
            opts = dist.ProcessGroupGloo._Options()
            opts._timeout = timeout
            opts._devices = [dist.ProcessGroupGloo.create_device(hostname=host)]
            self.group = dist.ProcessGroupGloo(store, rank, world, opts)
            self.device = torch.device("cpu")

    def send(self, dst: int, header: list[int], payload: torch.Tensor | None = None) -> None:
        h = torch.zeros(HEADER, dtype=torch.int64)
        h[:len(header)] = torch.tensor(header, dtype=torch.int64)
        works = [self.group.send([h.to(self.device)], dst, 0)]
        if payload is not None:
            works.append(self.group.send([payload.to(self.device)], dst, 0))
        for w in works:
            w.wait()

    def recv_header(self, src: int) -> list[int]:
        h = torch.empty(HEADER, dtype=torch.int64, device=self.device)
        self.group.recv([h], src, 0).wait()
        return h.tolist()

    def recv_bytes(self, src: int, nbytes: int) -> torch.Tensor:
        buf = torch.empty(nbytes, dtype=torch.uint8, device=self.device)
        self.group.recv([buf], src, 0).wait()
        return buf

    def recv_tensor(self, src: int, shape: list[int], dtype: torch.dtype) -> torch.Tensor:
        t = torch.empty(shape, dtype=dtype, device=self.device)
        self.group.recv([t], src, 0).wait()
        return t


def pack(parts: list[torch.Tensor]) -> torch.Tensor:
    """Tensors as one byte tensor, each starting at a multiple of 8 bytes."""
    sizes = [t.numel() * t.element_size() for t in parts]
    out = torch.zeros(sum(_aligned(n) for n in sizes), dtype=torch.uint8, device=parts[0].device)
    at = 0
    for t, n in zip(parts, sizes):
        out[at:at + n] = t.contiguous().view(-1).view(torch.uint8)
        at += _aligned(n)
    return out


def unpack(buf: torch.Tensor, specs: list[tuple[torch.dtype, list[int]]]) -> list[torch.Tensor]:
    """`pack`'s tensors back, as views of `buf`, given their dtypes and shapes."""
    out, at = [], 0
    for dtype, shape in specs:
        n = math.prod(shape) * dtype.itemsize
        out.append(buf[at:at + n].view(dtype).view(shape))
        at += _aligned(n)
    return out


def packed_size(specs: list[tuple[torch.dtype, list[int]]]) -> int:
    return sum(_aligned(math.prod(shape) * dtype.itemsize) for dtype, shape in specs)


def _aligned(n: int) -> int:
    return -(-n // 8) * 8


def encode_text(text: str) -> torch.Tensor:
    return torch.frombuffer(bytearray(text.encode() or b" "), dtype=torch.uint8)


def decode_text(buf: torch.Tensor) -> str:
    return bytes(buf.cpu().numpy()).decode()


def encode_json(obj) -> torch.Tensor:
    return encode_text(json.dumps(obj))


def decode_json(buf: torch.Tensor):
    return json.loads(decode_text(buf))
