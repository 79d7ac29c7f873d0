"""The model's `LoraBackend` when adapters live on the LoRA server: every
delta is computed there (see `remote/client.py` for liveness, and
`lora_server/` for the other side)."""

from __future__ import annotations

import bisect
import itertools
import time
from dataclasses import dataclass, field
from typing import Sequence

import torch

from loraserve.errors import Unavailable, UnknownModel
from loraserve.lora.adapter import LoraAdapter
from loraserve.model.lora import Routing
from loraserve.model.spec import ModelSpec
from loraserve.model.targets import Target, out_dim
from loraserve.remote import nixl_transport
from loraserve.remote.client import LoraServerClient, LoraServerError, answer
from loraserve.remote.protocol import position, result_rows
from loraserve.remote.transport import ClientSocket, Unreachable


@dataclass
class Picked:
    """A projection's adapter rows as they travel, and where their deltas go back."""

    xs: torch.Tensor
    """The input rows sent: [N, in], or for gate|up [U, in], one per token."""

    row_adapter: torch.Tensor
    """[N] int32: each row's index into the step's adapters."""

    expert: torch.Tensor | None = None
    """[N] int32: each row's expert (expert targets)."""

    rows: torch.Tensor | None = None
    """Where each row's delta goes in the projection's output (None: its tail, the adapter rows)."""

    gather: torch.Tensor | None = None
    """gate|up: [N] int32, each (token, expert) row's token in `xs`: a token's hidden state is
    the input whichever expert it goes to, so it is sent once, not top-k times."""

    tokens: torch.Tensor | None = None
    """down: [U] the step rows (tokens) of the rows. The server combines a token's k expert
    deltas with their routing `weight`s, as the model combines the experts' outputs, and sends
    one row per token back, not top-k."""

    scatter: torch.Tensor | None = None
    """down: [N] int32, each row's token in `tokens`."""

    weight: torch.Tensor | None = None
    """down: [N] each row's routing weight."""


class ServerRows:
    """The half of a `LoraBackend` whose deltas are computed elsewhere that does
    not depend on how rows travel: `begin` lays a step's rows out base model
    first, then by adapter, and notes each adapter row's adapter; `rows` picks
    a projection's adapter rows (for experts, the adapter rows' (token,
    expert) pairs with their expert ids). Base-model rows never travel.
    `RemoteLoraBackend` sends them over the wire; the simulator's real
    instances (`sim/served.py`) hand them to a store on virtual time."""

    def __init__(self, spec: ModelSpec, adapters: dict[str, LoraAdapter]) -> None:
        self.spec = spec
        self.adapters = adapters
        """id → metadata (the layout says which projections each adapter adapts)."""
        self.slots = UnboundedBudget()
        self.num_base = 0
        self.step_adapters: list[str] = []
        self.row_adapter: torch.Tensor | None = None
        self.targets: set[tuple[int, Target]] = set()

    @property
    def active(self) -> bool:
        return self.row_adapter is not None

    def begin(self, adapters: Sequence[str | None], rows: Sequence[int], loads: Sequence) -> list[int]:
        order = sorted(range(len(adapters)), key=lambda i: "" if adapters[i] is None else adapters[i])
        self.num_base = sum(rows[i] for i in order if adapters[i] is None)
        ids = list(dict.fromkeys(adapters[i] for i in order if adapters[i] is not None))
        self.step_adapters = ids
        self.row_adapter = None
        self.targets = set()
        if ids:
            self.start_step()
            index = {a: k for k, a in enumerate(ids)}
            self.row_adapter = torch.tensor([index[adapters[i]] for i in order if adapters[i] is not None
                                             for _ in range(rows[i])], dtype=torch.int32)
            for a in ids:
                meta = self.adapters.get(a)
                if meta is None:
                    raise UnknownModel(a, f"adapter {a} is not in the LoRA server's catalogue")
                self.targets.update(key for key, _, _ in meta.layout)
        return order

    def start_step(self) -> None:
        """A step with adapter rows begins (before its rows are laid out)."""

    def rows(self, layer: int, target: Target, x: torch.Tensor, routing: Routing | None = None) -> Picked | None:
        """The projection's adapter rows and where their deltas go (see `Picked`); None if the step
        has none for it."""
        if self.row_adapter is None or (layer, target) not in self.targets:
            return None
        if routing is None:
            return Picked(x[self.num_base:], self.row_adapter)
        rows = (routing.token >= self.num_base).nonzero().flatten()
        if not len(rows):
            return None
        token = routing.token[rows]
        row_adapter = self.row_adapter[(token - self.num_base).cpu()]
        expert = routing.expert[rows].to(torch.int32).cpu()
        picked = Picked(x[rows], row_adapter, expert, rows)
        if target in (Target.EXPERTS_GATE_UP, Target.EXPERTS_DOWN):
            unique, index = torch.unique(token, return_inverse=True)
            if target is Target.EXPERTS_GATE_UP:
                # a token's rows are equal, so whichever one lands is the token's hidden state
                picked.xs = picked.xs.new_empty(len(unique), x.shape[1]).index_copy_(0, index, picked.xs)
                picked.gather = index.to(torch.int32).cpu()
            else:
                picked.tokens, picked.scatter = unique, index.to(torch.int32).cpu()
                picked.weight = routing.weight[rows].cpu()
        return picked

    def add(self, out: torch.Tensor, delta: torch.Tensor, picked: Picked) -> tuple[torch.Tensor, torch.Tensor] | None:
        """Add the deltas of `picked`'s rows into the projection's output; or, for a delta the
        server combined per token, return (token rows, deltas) for the model to add after its
        MoE combine (`LoraBackend.wait`)."""
        delta = delta.to(out.device)
        if picked.tokens is not None:
            return picked.tokens, delta
        if picked.rows is None:
            out[self.num_base:] += delta
        else:
            out.index_add_(0, picked.rows, delta.to(out.dtype))
        return None

    def end_step(self) -> None:
        pass

    def hint(self, adapter_ids: list[str]) -> None:
        pass

    def forget(self, adapter_id: str) -> None:
        """Nothing to drop here: the adapter's weights live on the server."""


class RemoteLoraBackend(ServerRows):
    """The model's `LoraBackend` with every delta computed on the LoRA server.

    `submit` sends a projection's adapter rows (`ServerRows.rows`) before the
    base matmul, or, without overlap, `wait` sends them after it; `wait` takes
    the delta (pushed into the buffer registered for it, or pulled) and adds
    it in place; an expert down delta comes back combined per token, and
    `wait` returns it for the model to add after its combine.
    """

    def __init__(self, spec: ModelSpec, client: LoraServerClient, adapters: dict[str, LoraAdapter]) -> None:
        super().__init__(spec, adapters)
        self.client = client
        self.config = client.config
        self.sock = ClientSocket(client.config.endpoint)
        self._ids = itertools.count(1)
        self.plan: list[int] | None = None
        """Positions of the step's deltas, sent with its first one (then None)."""
        self.wait_s = 0.0
        """Seconds the engine thread spent waiting for deltas (the remote-LoRA wait, for metrics)."""
        self.steps = 0
        """Steps with adapter rows (wait_s / steps: the mean remote-LoRA wait per step)."""
        self.step_waits = StepWaits()
        """Each such step's wait, as a histogram (exported by the instance's /metrics)."""
        self._step_wait: float | None = None
        self.nixl: nixl_transport.NixlArena | None = None
        """With the nixl transport: the arena pushed deltas are written into (`remote/nixl_transport.py`)."""
        self.nixl_ready = False
        """Whether the server holds our arena's registration (and no late write can land in a region in use)."""
        if self.config.transport == "nixl":
            self.nixl = nixl_transport.NixlArena(self.config.arena_bytes)
            self._nixl_register()

    def begin(self, adapters: Sequence[str | None], rows: Sequence[int], loads: Sequence) -> list[int]:
        self.sock.buffers.clear()  # landing buffers of an earlier step that raised midway
        order = super().begin(adapters, rows, loads)
        if self.active:
            self.plan = sorted(position(self.spec, layer, target) for layer, target in self.targets)
        return order

    def start_step(self) -> None:
        if not self.client.up:
            raise Unavailable(f"the LoRA server at {self.config.endpoint} is down")
        if self.nixl is not None and not self.nixl_ready:
            try:
                self._nixl_register()
            except LoraServerError as e:
                raise Unavailable(str(e)) from None
        self.steps += 1
        self._step_wait = self._step_wait or 0.0

    def submit(self, layer: int, target: Target, x: torch.Tensor, routing: Routing | None = None):
        picked = self.rows(layer, target, x, routing)
        if picked is None:
            return None
        header = {"kind": "delta", "id": next(self._ids), "layer": layer, "target": target.value,
                  "dtype": str(x.dtype).removeprefix("torch."), "rows": len(picked.row_adapter),
                  "adapters": self.step_adapters, "push": self.config.mode == "push"}
        if self.plan is not None:
            header["plan"], self.plan = self.plan, None
        tensors = [picked.xs.cpu(), picked.row_adapter] + ([picked.expert] if picked.expert is not None else [])
        if picked.gather is not None:
            header["unique"] = picked.xs.shape[0]
            tensors.append(picked.gather)
        if picked.tokens is not None:
            header["combine"] = len(picked.tokens)
            tensors += [picked.weight.to(x.dtype), picked.scatter]
        handle = (header, tensors, picked, target)
        if self.config.overlap:
            self._send(header, tensors, target)
        return handle

    def wait(self, handle, out: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
        header, tensors, picked, target = handle
        if not self.config.overlap:
            self._send(header, tensors, target)
        start = time.perf_counter()
        try:
            if self.config.mode == "pull":
                self.sock.send({"kind": "pull", "id": header["id"]})
            if self.nixl is not None:
                msg = answer(nixl_transport.wait_result(self.sock, self.nixl, header["id"], tensors[0].dtype,
                                                         [result_rows(header), out_dim(self.spec, target)],
                                                         self.config.timeout_s))
                if msg.header.get("nixl") == "unregistered":  # the server restarted: register before the next step
                    self.nixl_ready = False
            else:
                msg = answer(self.sock.recv(self.config.timeout_s, want_id=header["id"]))
        except Unreachable as e:
            self.client.mark_down()
            self.nixl_ready = False  # regions in flight stay taken until the next fence
            raise Unavailable(str(e)) from None
        except LoraServerError as e:
            self.sock.buffers.pop(header["id"], None)
            if self.nixl is not None:
                self.nixl.release(header["id"])
            if e.status in (426, 503):
                raise Unavailable(str(e)) from None
            raise
        finally:
            waited = time.perf_counter() - start
            self.wait_s += waited
            self._step_wait = (self._step_wait or 0.0) + waited
        delta = msg.tensors[0]
        if tuple(delta.shape) != (result_rows(header), out_dim(self.spec, target)):
            if self.nixl is not None:
                self.nixl.release(header["id"])
            raise LoraServerError(500, f"a {target.value} result of shape {tuple(delta.shape)} for "
                                       f"{result_rows(header)} rows")
        if self.nixl is not None and picked.tokens is not None:
            delta = delta.clone()  # the model adds it after this returns: not a view of a region released below
        combined = self.add(out, delta, picked)
        if self.nixl is not None:
            self.nixl.release(header["id"])
        return combined

    def _send(self, header: dict, tensors: list[torch.Tensor], target: Target) -> None:
        if self.config.mode == "push":
            dtype, shape = tensors[0].dtype, (result_rows(header), out_dim(self.spec, target))
            if self.nixl is None:
                self.sock.register(header["id"], torch.empty(shape, dtype=dtype))
            elif (at := self.nixl.alloc(header["id"], shape[0] * shape[1] * dtype.itemsize)) is not None:
                header["at"] = at
        try:
            self.sock.send(header, tensors, timeout_s=self.config.timeout_s)
        except Unreachable as e:
            self.client.mark_down()
            raise Unavailable(str(e)) from None

    def end_step(self) -> None:
        """The engine step is over: record its remote-LoRA wait (all its passes, reruns included)."""
        if self._step_wait is not None:
            self.step_waits.observe(self._step_wait)
            self._step_wait = None

    def hint(self, adapter_ids: list[str]) -> None:
        """Requests for these adapters were queued: the server may start loading them."""
        if adapter_ids and self.client.up:
            try:
                self.sock.send({"kind": "hint", "adapters": adapter_ids}, timeout_s=0)
            except Unreachable:
                pass  # a hint is advice: the delta will ask again

    def _nixl_register(self, close: bool = False) -> None:
        """Register the arena with the server (or withdraw it); its answer is also the fence
        after which no write of an earlier request can land."""
        try:
            answer(nixl_transport.register(self.sock, self.nixl, next(self._ids),
                                            1.0 if close else self.config.timeout_s, close))
        except Unreachable as e:
            self.client.up = False
            raise Unavailable(str(e)) from None
        self.nixl_ready = not close

    def close(self) -> None:
        if self.nixl is not None:
            try:
                self._nixl_register(close=True)
            except (Unavailable, LoraServerError):
                pass
            self.nixl.close(fenced=not self.nixl.regions)
        self.sock.close()


@dataclass
class StepWaits:
    """A fixed-bucket histogram the engine thread fills and the metrics thread
    reads as a snapshot (`cumulative`)."""

    bounds: tuple[float, ...] = (1e-4, 2.5e-4, 5e-4, 1e-3, 2.5e-3, 5e-3, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0)
    counts: list[int] = field(default_factory=lambda: [0] * 13)
    total: float = 0.0

    def observe(self, value: float) -> None:
        self.counts[bisect.bisect_left(self.bounds, value)] += 1
        self.total += value

    def cumulative(self) -> tuple[list[tuple[str, int]], float]:
        """Prometheus buckets (upper bound, count at or below it), +Inf last, and the sum."""
        out, running = [], 0
        for bound, n in zip([*map(str, self.bounds), "+Inf"], list(self.counts)):
            running += n
            out.append((bound, running))
        return out, self.total


class UnboundedBudget:
    """The scheduler's adapter budget when adapters live on the LoRA server:
    any number of distinct adapters may run, and none is ever loaded here."""

    def can_acquire(self, adapter: str) -> bool:
        return True

    def acquire(self, adapter: str) -> bool:
        return False

    def release(self, adapter: str) -> None:
        pass

    def resident(self) -> dict[str, int]:
        return {}

