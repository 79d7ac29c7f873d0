"""The real engine's mover: block copies on a worker thread.

Copies run while the engine thread computes steps (torch releases the GIL in
copies; on CUDA they go on their own stream, ordered after the compute
stream's work when they were asked for), so a request waiting for its
adapter or history KV blocks no one. The cache manager guarantees that no
running request reads or writes the blocks of a copy in flight.
"""

from __future__ import annotations

import contextlib
import queue
import threading
import weakref
from typing import Callable

import torch

from loraserve.cache.mover import CopyJob
from loraserve.engine.tier_memory import TierMemory
from loraserve.gpu.host_memory import CopyOrder
from loraserve.lora.adapter import LoraAdapter
from loraserve.lora.packing import pack
from loraserve.threads import compute_alone


class TorchMover:
    def __init__(self, memory: TierMemory, read_adapter: Callable[[str], LoraAdapter]) -> None:
        self.memory = memory
        self.read_adapter = read_adapter
        """Reads an adapter from its directory by id (the disk tier)."""
        self._jobs: queue.Queue[tuple[CopyJob, CopyOrder | None] | None] = queue.Queue()
        self._done: list[int] = []
        self._finished: set[int] = set()
        self._error: BaseException | None = None
        self._cond = threading.Condition()
        device = memory.kv_cache.device
        self._stream = torch.cuda.Stream(device) if device.type == "cuda" else None
        # the thread holds the mover weakly, so an engine that is dropped frees its tiers
        self._thread = threading.Thread(target=_serve, args=(weakref.ref(self), self._jobs),
                                        name="loraserve-mover", daemon=True)
        self._thread.start()

    def submit(self, job: CopyJob) -> None:
        order = CopyOrder(self._stream.device) if self._stream is not None else None
        self._jobs.put((job, order))

    def poll(self) -> list[int]:
        with self._cond:
            if self._error is not None:
                raise RuntimeError(f"a cache copy failed: {self._error}") from self._error
            done, self._done = self._done, []
            self._finished.difference_update(done)  # polled jobs are never waited for
        return done

    def wait(self, job_id: int) -> None:
        with self._cond:
            self._cond.wait_for(lambda: job_id in self._finished or self._error is not None)

    def close(self) -> None:
        self._jobs.put(None)
        self._thread.join(timeout=10)

    def _handle(self, job: CopyJob, order: CopyOrder | None) -> bool:
        """Run one job; False once a copy has failed (the thread then stops)."""
        try:
            self._copy(job, order)
        except BaseException as e:  # reported to the engine thread by poll()
            with self._cond:
                self._error = e
                self._cond.notify_all()
            return False
        with self._cond:
            self._done.append(job.id)
            self._finished.add(job.id)
            self._cond.notify_all()
        return True

    def _copy(self, job: CopyJob, order: CopyOrder | None) -> None:
        mem = self.memory
        if order is not None:  # after the steps that wrote (or still read) these blocks
            order.wait(self._stream)
        with torch.cuda.stream(self._stream) if self._stream is not None else contextlib.nullcontext():
            if job.src_tier == "disk":
                mem.write_blocks(job.dst_tier, list(job.dst_blocks), pack(self.read_adapter(job.adapter)))
            else:
                mem.copy_blocks(job.src_tier, job.dst_tier, list(zip(job.src_blocks, job.dst_blocks)))
        if self._stream is not None:
            self._stream.synchronize()



def _serve(ref: weakref.ref, jobs: queue.Queue) -> None:
    compute_alone()  # copies need no OpenMP team, and a second one slows the engine's (loraserve/threads.py)
    while True:
        try:
            job = jobs.get(timeout=1.0)
        except queue.Empty:
            if ref() is None:  # the engine is gone
                return
            continue
        mover = ref()
        if job is None or mover is None or not mover._handle(*job):
            return
        del mover
