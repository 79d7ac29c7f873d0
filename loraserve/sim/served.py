"""Real instances on the simulated disaggregated cluster.

The decision-log test puts the real engine's mechanism on both sides of the
simulated exchange: each instance runs its step's forward pass (the
TorchExecutor over real weights and KV) and the LoRA server computes every
delta with a real `AdapterStore`, while the cluster's event loop on virtual
time decides when each happens. The forward pass runs in a worker thread
(`ThreadedExecutor`) because it needs its deltas mid-pass: `ServedBackend`
hands each projection's adapter rows to the loop and blocks, and when the
simulated server runs the batch holding that instance's layer, `serve_batch`
answers every instance of the batch with one batched kernel over the store's
slots, as the real server's `_compute` does. So the deltas come from the
weights that were in the slots at the modelled moment, and the tokens show
whether they were right.
"""

from __future__ import annotations

import queue
import threading
from concurrent.futures import Future
from dataclasses import dataclass, field

import torch

from loraserve.engine.plan import StepPlan
from loraserve.lora.adapter import LoraAdapter
from loraserve.kernels import combine_rows
from loraserve.lora_server.compute import store_delta
from loraserve.model.lora import Routing
from loraserve.model.spec import ModelSpec
from loraserve.model.targets import Target, layer_targets
from loraserve.remote.backend import Picked, ServerRows
from loraserve.remote.protocol import position
from loraserve.threads import alone_pool

WAIT_S = 120.0
"""Longest wait for the other side (a forward pass's next request, or its answer): a bug, not load."""


@dataclass
class Ask:
    """One projection's adapter rows of one instance, waiting for their delta."""

    layer: int
    target: Target
    x: torch.Tensor
    adapters: list[str]
    row_adapter: torch.Tensor
    expert: torch.Tensor | None
    picked: Picked
    """Where the delta goes back (and, for down, how the server combines it per token)."""

    delta: torch.Tensor | None = None
    answered: threading.Event = field(default_factory=threading.Event)


PASS_OVER = object()
"""Posted when a forward pass ends (or fails): it will ask for nothing more."""


class ServedBackend(ServerRows):
    """The instance's `LoraBackend`: rows go to the cluster's loop, not a socket."""

    def __init__(self, spec: ModelSpec, adapters: dict[str, LoraAdapter]) -> None:
        super().__init__(spec, adapters)
        self.asks: queue.Queue = queue.Queue()
        self._next: Ask | object | None = None
        self.made: list[Ask] = []
        """This step's requests, so that a cluster that stops can release a pass waiting on one."""

    def begin(self, adapters, rows, loads) -> list[int]:
        self.made = []
        return super().begin(adapters, rows, loads)

    def submit(self, layer: int, target: Target, x: torch.Tensor, routing: Routing | None = None):
        picked = self.rows(layer, target, x, routing)
        if picked is None:
            return None
        xs = picked.xs if picked.gather is None else picked.xs[picked.gather.long()]  # as the server parses it
        ask = Ask(layer, target, xs, self.step_adapters, picked.row_adapter, picked.expert, picked)
        self.made.append(ask)
        self.asks.put(ask)
        return ask

    def wait(self, ask: Ask, out: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
        if not ask.answered.wait(WAIT_S):
            raise TimeoutError(f"no delta for layer {ask.layer} {ask.target.value} within {WAIT_S} s")
        if ask.delta is None:
            raise RuntimeError("the cluster stopped before answering")
        p, delta = ask.picked, ask.delta
        if p.tokens is not None:  # combined per token, as the server replies (lora_server/server.py)
            delta = combine_rows(delta, p.scatter, p.weight, len(p.tokens))
        return self.add(out, delta, p)

    def abandon(self) -> None:
        """Release a pass waiting for an answer that will not come (its wait raises)."""
        for ask in self.made:
            ask.answered.set()

    # -- the loop's side ---------------------------------------------------------

    def peek(self) -> Ask | None:
        """The forward pass's next request (waiting for it to be made); None once the pass is over."""
        if self._next is None:
            try:
                self._next = self.asks.get(timeout=WAIT_S)
            except queue.Empty:
                raise TimeoutError(f"a forward pass made no request within {WAIT_S} s") from None
        return None if self._next is PASS_OVER else self._next

    def take(self) -> None:
        self._next = None


class ThreadedExecutor:
    """Runs an executor's steps in a worker thread: `execute` returns a Future
    (the cluster takes its result when the modelled step ends)."""

    def __init__(self, inner, backend: ServedBackend) -> None:
        self.inner = inner
        self.backend = backend
        self.pool = alone_pool(1, "served-instance")  # several instances' threads: no OpenMP team each

    def execute(self, plan: StepPlan) -> Future:
        return self.pool.submit(self._run, plan)

    def _run(self, plan: StepPlan):
        try:
            return self.inner.execute(plan)
        finally:
            self.backend.asks.put(PASS_OVER)

    def finish(self, result: Future):
        """The step's result once its modelled end has come (it raises what the pass raised)."""
        if self.backend.peek() is not None:  # at once, not after the pass's own wait times out
            raise RuntimeError("a forward pass asked for a delta no batch of the server answered")
        self.backend.take()
        return result.result(timeout=WAIT_S)

    def __getattr__(self, name: str):
        return getattr(self.inner, name)

    def close(self) -> None:
        self.backend.abandon()
        self.pool.shutdown(wait=False, cancel_futures=True)


def serve_batch(store, spec: ModelSpec, layers, backends: list[ServedBackend]) -> int:
    """Answer every request the batch's instances make in `layers`, one batched
    kernel per projection over all of them (weights must be in the store's
    slots: the simulated server runs a batch only then). Returns the kernels run."""
    kernels = 0
    for layer in layers:
        for target in layer_targets(spec, layer):
            asks: list[Ask] = []
            for b in backends:
                ask = b.peek()
                if ask is not None and (ask.layer, ask.target) == (layer, target):
                    asks.append(ask)
                    b.take()
                elif ask is not None and position(spec, ask.layer, ask.target) < position(spec, layer, target):
                    raise RuntimeError(f"layer {ask.layer} {ask.target.value} was asked for after its batch ran")
            if not asks:
                continue
            adapters = list(dict.fromkeys(a for ask in asks for a in ask.adapters))
            index = torch.tensor([adapters.index(a) for ask in asks for a in ask.adapters])
            offsets = [0]
            for ask in asks:
                offsets.append(offsets[-1] + len(ask.adapters))
            row_adapter = torch.cat([index[offsets[k] + ask.row_adapter.long()] for k, ask in enumerate(asks)])
            expert = None if asks[0].expert is None else torch.cat([ask.expert for ask in asks])
            y = store_delta(store, layer, target, torch.cat([ask.x for ask in asks]), adapters, row_adapter, expert)
            if y is None:
                raise RuntimeError(f"the server ran layer {layer} without every adapter's weights in a slot")
            kernels += 1
            start = 0
            for ask in asks:
                n = ask.x.shape[0]
                ask.delta = y[start:start + n]
                start += n
                ask.answered.set()
    return kernels
