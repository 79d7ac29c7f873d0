"""The LoRA server's knobs, and an instance's knobs for reaching it."""

from __future__ import annotations

from dataclasses import dataclass

from loraserve.cache.config import CacheConfig
from loraserve.dtypes import check_dtype

MODES = ("push", "pull")
TRANSPORTS = ("zmq", "nixl")


@dataclass(frozen=True)
class LoraServerConfig:
    model: str
    """The base model's directory: only its config.json is read (dimensions and
    expert layout); the server never loads base weights."""

    device: str = "cpu"
    """Torch device of the adapter slots and the delta kernels: cpu, cuda."""

    dtype: str = "float32"
    """Dtype of adapter weights and LoRA math; auto as the engine's --dtype (see
    `dtypes.resolve_dtype`). float32 by default: deltas as exact as the fp32 oracle."""

    max_lora_rank: int = 64
    """Adapters above this rank are refused at load."""

    max_loras: int = 32
    """Adapter slots: the most distinct adapters one batched kernel can serve.
    Deltas for adapters without a slot wait for one; a single delta naming
    more adapters than this is refused (503): size it to at least the
    instances' --max-num-seqs."""

    batch_window_us: int = 200
    """After a delta arrives, how long to wait for deltas of the same layer
    from other instances, so they run as one batched kernel. 0: only what is
    already queued."""

    layerwise: bool = True
    """Load an adapter into its slot layer by layer: a delta for layer l waits
    only for layer l's weights. Off: the whole adapter first (the ablation)."""

    ep: int = 1
    """Expert-parallel ranks per pipeline stage: each holds 1/ep of every MoE
    layer's expert LoRA (expert e on rank e mod ep). ep * pp > 1 runs that many
    rank processes; the cache sizes are per rank."""

    pp: int = 1
    """Pipeline stages: each owns a contiguous range of layers."""

    cache: CacheConfig = CacheConfig(device_bytes=1 << 30, host_bytes=2 << 30)

    def __post_init__(self) -> None:
        check_dtype(self.dtype)
        for name in ("max_lora_rank", "max_loras", "ep", "pp"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.batch_window_us < 0:
            raise ValueError(f"batch_window_us must be >= 0, got {self.batch_window_us}")


@dataclass(frozen=True)
class RemoteLoraConfig:
    endpoint: str
    """Where the LoRA server listens: tcp://HOST:PORT or ipc://PATH."""

    mode: str = "push"
    """push: the server sends each delta as soon as it is computed, into a
    buffer the instance registered for it; pull: the instance asks for it when
    it needs it (one more message each way)."""

    overlap: bool = True
    """Send a projection's input before the base matmul, so the round trip
    overlaps it. Off: send after the matmul and wait ("naive" disaggregation)."""

    timeout_s: float = 10.0
    """How long a step waits for a delta before the LoRA server counts as down:
    requests that need it then fail with a 503 and base-model requests go on."""

    transport: str = "zmq"
    """How pushed deltas come back: zmq (over the request socket), or nixl (the
    server writes each one into a registered arena here, one-sided, plus a
    notification; needs `pip install 'loraserve[nixl]'` on both sides, and push).
    Requests, control and errors always travel over ZeroMQ."""

    arena_bytes: int = 64 << 20
    """NIXL: bytes of the receive arena deltas are written into; a delta that
    does not fit comes over ZeroMQ."""

    heartbeat_s: float = 0.5
    """How often the instance checks that the server is there (and whether its
    catalogue of adapters changed)."""

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"mode must be push or pull, got {self.mode!r}")
        if self.transport not in TRANSPORTS:
            raise ValueError(f"transport must be zmq or nixl, got {self.transport!r}")
        if self.transport == "nixl" and self.mode != "push":
            raise ValueError("the nixl transport carries pushed deltas: pull mode travels over ZeroMQ only")
        if self.arena_bytes < 1:
            raise ValueError(f"arena_bytes must be >= 1, got {self.arena_bytes}")
        if not self.endpoint.startswith(("tcp://", "ipc://")):
            raise ValueError(f"the LoRA server address must be tcp://HOST:PORT or ipc://PATH, got {self.endpoint!r}")
        if self.timeout_s <= 0 or self.heartbeat_s <= 0:
            raise ValueError("timeout_s and heartbeat_s must be > 0")
