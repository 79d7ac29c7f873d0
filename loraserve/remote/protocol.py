"""The wire format between base-model instances and the LoRA server.

A message is a list of frames: one JSON header, then raw tensor bytes (never
pickled: a peer can only ever hand us numbers). The header says what each
tensor frame is (dtype and shape), so a receiver checks sizes before it
touches the bytes, and a frame that does not match is refused with an error,
not a crash.

Header fields every message has: `v` (PROTOCOL_VERSION; another version is
refused) and `kind`. Kinds, instance → server:

- hello: who is asking (`instance`); the reply carries the server's identity
  and the catalogue version.
- catalogue: the adapters the server serves (name, id, rank, layout).
- load (`name`, `path`) / unload (`name`): forwarded from the instance's API.
- hint (`adapters`): requests for these adapters were queued or admitted;
  start bringing them to the device (scheduler-driven prefetch).
- delta: one (layer, target)'s LoRA input rows. Fields: `id` (the sender's
  sequence number, echoed in the reply), `layer`, `target`, `dtype`, `rows`,
  `adapters` [ids] with a per-row frame `adapter` (an index into
  `adapters`), and for expert targets one row per (token, expert) with a
  per-row frame `expert`; an expert delta may carry `unique` and a last
  per-row frame `gather` (an index into its `unique` input rows: gate|up
  sends a token's hidden state once, not once per routed expert); an
  experts_down delta may carry `combine` (its number of tokens) and two
  last per-row frames, `weight` (the routing weight, in `dtype`) and
  `scatter` (an index into its `combine` tokens): the reply then has one
  row per token, the sum of its rows' deltas times their weights, as the
  model combines its experts' outputs; `push` (reply at once)
  or pull (keep the result until a `pull` for the same `id`). A step's
  first delta also carries `plan`: the `position`s of every delta the step
  will send, so the server knows whom a batch is worth waiting for.
- pull (`id`): send the result of a pull-mode delta when it is ready.
- nixl (`agent`, `arena`, `memory`, or `close`): register (or withdraw) the
  NIXL arena pushed results are written into; a push delta may then carry
  `at`, its result's offset in the arena (`remote/nixl_transport.py`).
- ping: liveness and the catalogue version; stats: the server's counters.

Server → instance: result (`id`, one frame: the delta [rows, out], or
[combine, out] for a delta that asked it combined; or, for a
delta with `at`, a NIXL write of it with the id as notification), error
(`id` if any, `status` HTTP-like, `message`), and each request's reply.
"""

from __future__ import annotations

import json
import math
import warnings
from dataclasses import dataclass

import numpy as np
import torch

from loraserve.errors import InvalidRequest, UnknownModel
from loraserve.model.spec import ModelSpec
from loraserve.model.targets import Target, layer_targets

PROTOCOL_VERSION = 3

MAX_ROWS = 1 << 16
"""Most rows one delta may carry (a step's tokens times top-k: 2048 × 8 is
16,384): with the model's widths it bounds a message's size, so a hostile
peer cannot make the server allocate without limit."""

MAX_HEADER = 1 << 20
"""Most bytes of a JSON header (a catalogue of thousands of adapters fits)."""

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16,
          "int32": torch.int32}
NAMES = {v: k for k, v in DTYPES.items()}


class ProtocolError(ValueError):
    """A message we refuse; `status` is what the reply says (400 bad frame,
    403 a load from outside --lora-dir, 404 unknown adapter, 426 another
    protocol version, 503 not servable now)."""

    def __init__(self, message: str, status: int = 400) -> None:
        super().__init__(message)
        self.status = status


@dataclass
class Message:
    header: dict
    tensors: list[torch.Tensor]

    @property
    def kind(self) -> str:
        return self.header["kind"]


def encode(header: dict, tensors: list[torch.Tensor] = ()) -> list:
    """Frames for a message: the header (with each tensor's dtype and shape) then the tensors' bytes."""
    header = {"v": PROTOCOL_VERSION, **header,
              "tensors": [[NAMES[t.dtype], list(t.shape)] for t in tensors]}
    frames = [json.dumps(header, separators=(",", ":")).encode()]
    for t in tensors:
        t = t.detach().contiguous().cpu()
        # bf16 has no numpy dtype: its bytes travel as int16
        frames.append(memoryview(t.view(torch.int16).numpy() if t.dtype == torch.bfloat16 else t.numpy()))
    return frames


def decode(frames: list) -> Message:
    """Parse and check frames; raises ProtocolError for anything malformed."""
    if not frames:
        raise ProtocolError("empty message")
    raw = bytes(frames[0])
    if len(raw) > MAX_HEADER:
        raise ProtocolError(f"header of {len(raw)} bytes is over the {MAX_HEADER} limit")
    try:
        header = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ProtocolError(f"header is not JSON: {e}") from None
    if not isinstance(header, dict) or not isinstance(header.get("kind"), str):
        raise ProtocolError("header must be a JSON object with a 'kind'")
    if header.get("v") != PROTOCOL_VERSION:
        raise ProtocolError(f"protocol version {header.get('v')!r} is not spoken here (this is "
                            f"version {PROTOCOL_VERSION})", 426)
    specs = header.get("tensors", [])
    if not isinstance(specs, list) or len(specs) != len(frames) - 1:
        raise ProtocolError(f"header describes {len(specs) if isinstance(specs, list) else '?'} tensors, "
                            f"{len(frames) - 1} frames came")
    tensors = []
    for i, (spec, frame) in enumerate(zip(specs, frames[1:])):
        if (not isinstance(spec, list) or len(spec) != 2 or spec[0] not in DTYPES or not isinstance(spec[1], list)
                or not all(isinstance(d, int) and 0 <= d <= MAX_ROWS * 65536 for d in spec[1])):
            raise ProtocolError(f"tensor {i}: bad dtype or shape {spec!r}")
        dtype, shape = DTYPES[spec[0]], spec[1]
        buf = memoryview(frame)
        want = math.prod(shape) * dtype.itemsize
        if buf.nbytes != want:
            raise ProtocolError(f"tensor {i}: {buf.nbytes} bytes for {spec[0]}{shape} (wants {want})")
        tensors.append(as_tensor(buf, dtype, shape))
    return Message(header, tensors)


def as_tensor(buf: memoryview, dtype: torch.dtype, shape: list[int]) -> torch.Tensor:
    """A tensor over received bytes (no copy; bf16 travels as int16)."""
    np_dtype = np.int16 if dtype == torch.bfloat16 else torch.empty(0, dtype=dtype).numpy().dtype
    arr = np.frombuffer(buf, dtype=np_dtype).reshape(shape) if buf.nbytes else np.zeros(shape, np_dtype)
    with warnings.catch_warnings():  # received bytes are read-only, and only ever read
        warnings.simplefilter("ignore", UserWarning)
        t = torch.from_numpy(arr)
    return t.view(torch.bfloat16) if dtype == torch.bfloat16 else t


def result_rows(header: dict) -> int:
    """Rows of a delta's result: one per token if it asked them combined, else one per row sent."""
    return header.get("combine") or header["rows"]


def position(spec: ModelSpec, layer: int, target: Target) -> int:
    """Where (layer, target) comes in a forward pass: a step's deltas are sent in this order."""
    return layer * len(Target) + layer_targets(spec, layer).index(target)


def refusal(e: Exception) -> tuple[int, str, dict]:
    """The status, message and extra fields an error reply gives for what
    handling a message raised (anything unexpected is a 500)."""
    if isinstance(e, ProtocolError):
        return e.status, str(e), {}
    if isinstance(e, UnknownModel):
        return 404, f"no adapter named {e.name!r}", {}
    if isinstance(e, InvalidRequest):  # AdapterError: a bad adapter or name
        return 400, str(e), {"field": e.field}
    return 500, f"{type(e).__name__}: {e}", {}


def error(message: str, status: int = 400, **fields) -> list:
    return encode({"kind": "error", "status": status, "message": message, **fields})


def field(header: dict, name: str, kind: type | tuple[type, ...]):
    """A required header field of the given type (bool is not an int here)."""
    value = header.get(name)
    if not isinstance(value, kind) or (isinstance(value, bool) and bool not in (kind if isinstance(kind, tuple)
                                                                                 else (kind,))):
        raise ProtocolError(f"'{name}' must be {getattr(kind, '__name__', kind)}, got {value!r}")
    return value
