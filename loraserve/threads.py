"""One thread computes with the CPU's cores; every other thread computes alone.

torch's CPU kernels split work over an OpenMP team, and GNU OpenMP gives each
thread that opens a parallel region a team of its own, kept until that thread
exits. Once a process holds more team threads than CPUs, libgomp stops
spinning between regions: an idle worker goes to sleep and must be woken for
every region, tens of microseconds each time. A decode step is hundreds of
small parallel ops, so on a 2-core machine one extra team (the block
mover's, or the one left by the thread that loaded the model while another
thread steps it) made decode steps 1.1-1.5x slower (`benchmarks/omp_teams.py`)
and a served request's tokens up to 2x.

So the thread that steps the engine keeps the team, and every other thread
that touches tensors calls `compute_alone` first: its parallel regions then
run on itself, and no second team is made. A thread that loads a model for
another thread to step runs in `apart`, a thread that exits when it is done
and takes its team with it.
"""

from __future__ import annotations

import ctypes
import logging
import os
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Callable, TypeVar

import torch

T = TypeVar("T")

log = logging.getLogger(__name__)

_local = threading.local()
_lock = threading.Lock()
_setters: list[Callable[[int], object]] | None = None
"""Per-thread thread-count setters of the runtimes torch computes with (None: not looked up yet)."""


def _thread_setters() -> list[Callable[[int], object]]:
    """omp_set_num_threads and MKL's per-thread setting, looked up through torch's
    own library, so that they are the copies torch runs on (another libgomp in
    the process would take a setting and change nothing). MKL needs its own:
    once torch.set_num_threads has been called, each new thread gets that many
    MKL threads whatever OpenMP says, and an MKL product would make a team."""
    global _setters
    with _lock:
        if _setters is None:
            found = []
            try:
                lib = ctypes.CDLL(os.path.join(os.path.dirname(torch.__file__), "lib", "libtorch_cpu.so"))
            except OSError:
                lib = None
            for name in ("omp_set_num_threads", "MKL_Set_Num_Threads_Local"):
                fn = getattr(lib, name, None) if lib is not None else None
                if fn is not None:
                    fn.argtypes, fn.restype = [ctypes.c_int], ctypes.c_int
                    found.append(fn)
            if not found:
                log.info("no OpenMP runtime found in torch's library: side threads compute as torch sets them")
            _setters = found
        return _setters


def compute_alone() -> None:
    """This thread's tensor ops run on this thread only (idempotent)."""
    if getattr(_local, "alone", False):
        return
    setters = _thread_setters()
    torch.get_num_threads()  # torch sets a new thread's OpenMP threads on first use: after that, not before
    for set_threads in setters:
        set_threads(1)
    _local.alone = True


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

    t = threading.Thread(target=run, name="loraserve-load", daemon=True)  # Ctrl-C ends the process mid-load
    t.start()
    t.join()
    if "error" in box:
        raise box["error"]
    return box["value"]
