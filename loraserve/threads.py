"""One thread computes with the CPU's cores; every other thread computes alone.

torch's CPU kernels split work over an OpenMP team, and GNU OpenMP gives each
thread that opens a parallel region a team of its own, kept until that thread
exits. Once a process holds more team threads than CPUs, libgomp stops
spinning between regions: an idle worker goes to sleep and must be woken for
every region, tens of microseconds each time. A decode step is hundreds of
small matmuls, so on a 2-core machine one extra team (the block mover's, or
the one left by the thread that loaded the model while another thread steps
it) made the engine's small products 2.3x slower (`benchmarks/omp_teams.py`).

So the thread that steps the engine keeps the team, and every other thread
that touches tensors calls `compute_alone` first: its parallel regions then
run on itself, and no second team is made. A thread that loads a model for
another thread to step runs in `apart`, a thread that exits when it is done
and takes its team with it.
"""

from __future__ import annotations

import ctypes
import re
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Callable, TypeVar

import torch

T = TypeVar("T")

_local = threading.local()
_omp: ctypes.CDLL | None | bool = False
"""The OpenMP runtime torch runs on (False: not looked for yet; None: none found)."""


def _runtime() -> ctypes.CDLL | None:
    global _omp
    if _omp is False:
        _omp = None
        try:
            maps = open("/proc/self/maps").read()
        except OSError:  # not Linux: nothing to do
            return None
        for path in sorted(set(re.findall(r"/\S*lib(?:gomp|iomp5)[^/\s]*\.so[^/\s]*", maps))):
            try:
                lib = ctypes.CDLL(path)  # the mapped library itself: dlopen hands back the loaded copy
                lib.omp_set_num_threads.argtypes = [ctypes.c_int]
                _omp = lib
                break
            except (OSError, AttributeError):
                continue
    return _omp


def compute_alone() -> None:
    """This thread's tensor ops run on this thread only (idempotent)."""
    if getattr(_local, "alone", False):
        return
    _local.alone = True
    lib = _runtime()
    if lib is not None:
        torch.get_num_threads()  # torch sets a new thread's OpenMP threads on first use: after that, not before
        lib.omp_set_num_threads(1)


def alone_pool(workers: int, name: str) -> ThreadPoolExecutor:
    """Worker threads for side work on tensors (reading adapters, say) that compute alone."""
    return ThreadPoolExecutor(workers, thread_name_prefix=name, initializer=compute_alone)


def apart(fn: Callable[..., T], *args, **kwargs) -> T:
    """fn's result, computed on a thread that then exits (and so leaves no team
    behind); what fn raises is raised here."""
    box: dict[str, object] = {}

    def run() -> None:
        try:
            box["value"] = fn(*args, **kwargs)
        except BaseException as e:
            box["error"] = e

    t = threading.Thread(target=run, name="loraserve-load")
    t.start()
    t.join()
    if "error" in box:
        raise box["error"]
    return box["value"]
